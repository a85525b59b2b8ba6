"""The primary's fs.op server: typed arguments checked before any handler runs, and a bug inside
a handler reported as a bug (logged with its traceback, answered EIO), not as EINVAL."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.roles import VolumeRoles
from dfs.errors import BUG_MARKER
from dfs.net.frames import MessageType
from dfs.net.rpc import Methods, dispatch
from dfs.types import ROOT_INODE
from tests.core.test_replication import Node, serve_ops


def _server(tmp_path: Path) -> tuple[Node, Methods]:
    primary = Node(tmp_path / "n1", 1)
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta))
    methods = Methods()
    serve_ops(fs, methods)
    return primary, methods


def _op(methods: Methods, op: str, args: list[Any], ctx: list[Any] | None = None) -> Any:
    body = {"m": "fs.op", "a": {"op": op, "args": args, "ctx": ctx or [0, 0, 0o22, None]}}
    return trio.run(dispatch, methods, "n2", body)


def test_an_update_runs_as_the_caller(tmp_path: Path) -> None:
    primary, methods = _server(tmp_path)
    kind, body = _op(methods, "mkdir", [ROOT_INODE, b"d", 0o777], [1000, 100, 0o022, [5, 6]])
    assert kind is MessageType.RESPONSE, body
    a = primary.vfs.peek(ROOT_INODE, b"d")
    assert a is not None and (a.uid, a.gid, a.mode & 0o777) == (1000, 100, 0o755)


@pytest.mark.parametrize(
    ("op", "args", "ctx"),
    [
        ("mkdir", [ROOT_INODE, "d", 0o755], None),  # a name must be bytes
        ("mkdir", [ROOT_INODE, b"d"], None),  # too few
        ("mkdir", [ROOT_INODE, b"d", 0o755, 0], None),  # too many
        ("mkdir", [True, b"d", 0o755], None),  # a bool is no inode
        ("mkdir", [0, b"d", 0o755], None),  # no inode 0
        ("rename", [ROOT_INODE, b"a", ROOT_INODE, b"b", -1], None),  # flags < 0
        ("read", [1, -5, 10], None),  # negative offset
        ("setattr", [ROOT_INODE, [None] * 6], None),  # setattr fields: 7
        ("mkdir", [ROOT_INODE, b"d", 0o755], [0, 0, 0o22]),  # caller context: 4 fields
        ("mkdir", [ROOT_INODE, b"d", 0o755], [0, 0, 0o22, ["wheel"]]),  # groups are numbers
    ],
)
def test_malformed_arguments_are_einval_and_change_nothing(
    tmp_path: Path, op: str, args: list[Any], ctx: list[Any] | None
) -> None:
    primary, methods = _server(tmp_path)
    seq = primary.meta.seq(1)
    kind, body = _op(methods, op, args, ctx)
    assert kind is MessageType.ERROR and body["errno"] == errno.EINVAL, body
    assert primary.meta.seq(1) == seq


def test_an_unknown_operation_is_enosys(tmp_path: Path) -> None:
    _primary, methods = _server(tmp_path)
    kind, body = _op(methods, "format", [])
    assert kind is MessageType.ERROR and body["errno"] == errno.ENOSYS


def test_a_bug_in_a_handler_is_logged_as_a_bug_and_answered_eio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    primary, methods = _server(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug inside the VFS")

    monkeypatch.setattr(primary.vfs, "mkdir", broken)
    with caplog.at_level(logging.ERROR):
        kind, body = _op(methods, "mkdir", [ROOT_INODE, b"d", 0o755])
    assert kind is MessageType.ERROR and body["errno"] == errno.EIO, body
    assert any(BUG_MARKER in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_handle_is_only_used_by_the_node_it_was_opened_for(tmp_path: Path) -> None:
    _primary, methods = _server(tmp_path)
    kind, body = _op(methods, "create", [ROOT_INODE, b"f", 0o644, 2])
    assert kind is MessageType.RESPONSE
    fh = body["r"][0][0]
    other = {"m": "fs.op", "a": {"op": "read", "args": [fh, 0, 10], "ctx": [0, 0, 0, None]}}
    kind, body = trio.run(dispatch, methods, "n3", other)
    assert kind is MessageType.ERROR and body["errno"] == errno.EBADF
