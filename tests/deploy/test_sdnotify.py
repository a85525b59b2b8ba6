"""The sd_notify protocol: a daemon's READY reaches the supervisor's socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from mountd import sdnotify


def test_ready_reaches_the_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    with sdnotify.Listener() as listener:
        monkeypatch.setenv(sdnotify.ENV, str(listener.path))
        assert sdnotify.ready("mounted at /mnt/x\nsecond line")
        msg = listener.receive(timeout=5)
    assert msg == {"READY": "1", "STATUS": "mounted at /mnt/x second line"}


def test_a_child_process_reports_through_the_environment() -> None:
    with sdnotify.Listener() as listener:
        code = "from mountd import sdnotify; assert sdnotify.notify('READY=1')"
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **listener.env()}, check=True
        )
        assert listener.receive(timeout=5) == {"READY": "1"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dfs-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv(sdnotify.ENV, "@" + name)
        assert sdnotify.notify("STATUS=x")
        assert s.recv(100) == b"STATUS=x"


def test_without_a_supervisor_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sdnotify.ENV, raising=False)
    assert not sdnotify.ready("x")
    monkeypatch.setenv(sdnotify.ENV, "/nonexistent/notify")  # supervisor gone: not an error
    assert not sdnotify.ready("x")


def test_no_message_is_none() -> None:
    with sdnotify.Listener() as listener:
        assert listener.receive(timeout=0.01) is None
