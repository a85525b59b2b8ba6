"""The cluster configuration: parsing, validation errors that name the key, ``init``."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from dfs import config as C


def base(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "cluster": {"name": "lab", "id": "abc", "secret_file": "s"},
        "nodes": [
            {"name": "n1", "address": "127.0.0.1", "port": 7801, "id": 1},
            {"name": "n2", "address": "127.0.0.1", "port": 7802, "id": 2},
        ],
    }
    raw.update(over)
    return raw


def test_defaults_make_a_root_volume(tmp_path: Path) -> None:
    cfg = C.parse(base(), base=tmp_path)
    assert cfg.volumes == (C.VolumeConfig("/", "n1", ("n1", "n2")),)
    assert cfg.secret_file == tmp_path / "s"
    assert cfg.timeouts == C.Timeouts()
    assert cfg.node("n2").port == 7802
    with pytest.raises(C.ConfigError, match="no node named 'x'"):
        cfg.node("x")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(bogus=1), "unknown key"),
        (lambda r: r["cluster"].update(colour="red"), r"cluster: unknown key\(s\) colour"),
        (lambda r: r["cluster"].pop("id"), r"cluster\.id: missing"),
        (lambda r: r["nodes"][1].update(name="n1"), "duplicate name 'n1'"),
        (lambda r: r["nodes"][1].update(id=1), "duplicate id 1"),
        (lambda r: r["nodes"][1].update(port=7801), "duplicate address:port"),
        (lambda r: r["nodes"][0].update(port=70000), "port: 70000 out of range"),
        (lambda r: r["nodes"][0].update(id=0), "id: 0 out of range"),
        (lambda r: r["nodes"][0].update(port="x"), "port: expected int"),
        (lambda r: r["nodes"][0].update(name="..."), "not a valid node name"),
        (lambda r: r.update(nodes=[]), "at least one node"),
        (
            lambda r: r.update(volumes=[{"path": "/", "primary": "n9", "sites": ["n1"]}]),
            "unknown node 'n9'",
        ),
        (
            lambda r: r.update(volumes=[{"path": "/", "primary": "n2", "sites": ["n1"]}]),
            "must be one of its sites",
        ),
        (
            lambda r: r.update(volumes=[{"path": "/a", "primary": "n1", "sites": ["n1"]}]),
            "root volume",
        ),
        (
            lambda r: r.update(volumes=[{"path": "a", "primary": "n1", "sites": ["n1"]}]),
            "absolute",
        ),
        (lambda r: r.update(timeouts={"call": -1}), "must be positive"),
        (lambda r: r.update(timeouts={"nap": 1}), "unknown key"),
        (lambda r: r["cluster"].update(replicas=0), "positive integer"),
    ],
)
def test_inconsistent_files_are_clear_errors(tmp_path: Path, mutate: Any, message: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(C.ConfigError, match=message):
        C.parse(raw, base=tmp_path)


def test_load_reports_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[cluster\n")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(p)
    with pytest.raises(C.ConfigError, match="no such configuration file"):
        C.load(tmp_path / "missing.toml")


def test_init_writes_a_loadable_file_and_a_private_secret(tmp_path: Path) -> None:
    p = tmp_path / "cluster.toml"
    nodes = [("a", "127.0.0.1", 7801), ("b", "127.0.0.1", 7802), ("c", "127.0.0.1", 7803)]
    made = C.init(p, nodes, name="lab", replicas=2)
    loaded = C.load(p)
    assert loaded.id == made.id and loaded.name == "lab"
    assert [n.name for n in loaded.nodes] == ["a", "b", "c"]
    assert [n.id for n in loaded.nodes] == [1, 2, 3]
    assert loaded.volumes == (C.VolumeConfig("/", "a", ("a", "b")),)
    assert stat.S_IMODE(os.stat(loaded.secret_file).st_mode) == 0o600
    assert len(loaded.read_secret()) >= 32
    tomllib.loads(p.read_text())
    with pytest.raises(C.ConfigError, match="already exists"):
        C.init(p, nodes)
    again = C.init(p, nodes, force=True)
    assert again.id != made.id


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "cluster.toml"
    cfg = C.init(p, [("a", "127.0.0.1", 7801)])
    os.chmod(cfg.secret_file, 0o644)
    with pytest.raises(C.ConfigError, match="readable by others"):
        cfg.read_secret()


def test_dfs_init_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg_path = tmp_path / "etc" / "cluster.toml"
    cmd = [sys.executable, "-m", "dfs_tools", "init", "a", "b=127.0.0.2", "c=127.0.0.3:9000"]
    r = subprocess.run([*cmd, "--config", str(cfg_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = C.load(cfg_path)
    assert [(n.name, n.address, n.port) for n in cfg.nodes] == [
        ("a", "127.0.0.1", 7801),
        ("b", "127.0.0.2", 7802),
        ("c", "127.0.0.3", 9000),
    ]
    assert stat.S_IMODE(os.stat(cfg.secret_file).st_mode) == 0o600
    again = subprocess.run([*cmd, "--config", str(cfg_path)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run([*cmd[:4], "x=1.2.3.4:port"], capture_output=True, text=True)
    assert bad.returncode == 2 and "port is not a number" in bad.stderr


def test_values_with_control_characters_round_trip(tmp_path: Path) -> None:
    """The writer escapes what TOML requires (control characters, quotes, backslashes)."""
    p = tmp_path / "cluster.toml"
    name = 'lab\x00\x01\x08\t\n\x0b\x0c\r\x1b\x1f\x7f"\\ \u00e9 \u2028 end'
    made = C.init(p, [("a", "127.0.0.1", 7801)], name=name)
    assert made.name == name
    assert C.load(p).name == name
    assert "[[nodes]]" in p.read_text() and "[[volumes]]" in p.read_text()


@pytest.mark.parametrize(
    ("raw_change", "message"),
    [
        (
            {"nodes": [{"name": "n1", "address": "x", "port": 1, "id": 1, "zone": "a"}]},
            "nodes[0]: unknown key(s) zone",
        ),
        (
            {"nodes": [{"name": "n1", "address": "x", "port": True, "id": 1}]},
            "nodes[0].port: expected int, got bool",
        ),
        ({"nodes": [{"name": "n1", "address": "x", "id": 1}]}, "nodes[0].port: missing"),
        ({"timeouts": [1]}, "timeouts: expected table, got array"),
        (
            {"volumes": [{"path": "/", "primary": "n1", "sites": "n1"}]},
            "volumes[0].sites: expected array, got str",
        ),
        ({"cluster": {"name": "lab", "id": "abc"}}, "cluster.secret_file: missing"),
    ],
)
def test_errors_name_the_key_as_the_file_spells_it(
    tmp_path: Path, raw_change: dict[str, Any], message: str
) -> None:
    raw = base(**raw_change)
    with pytest.raises(C.ConfigError) as exc:
        C.parse(raw, base=tmp_path)
    assert str(exc.value) == message
    p = tmp_path / "c.toml"
    p.write_text(tomli_w.dumps(raw))
    with pytest.raises(C.ConfigError) as exc:
        C.load(p)
    assert str(exc.value) == f"{p}: {message}"


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    cfg = C.parse(base(), base=tmp_path)
    assert cfg.metrics is None and cfg.metrics_at("n1") is None


def test_metrics_endpoints_from_the_table_and_each_node(tmp_path: Path) -> None:
    raw = base(metrics={"port": 9480})
    raw["nodes"][1]["address"] = "10.0.0.2"
    cfg = C.parse(raw, base=tmp_path)
    assert cfg.metrics_at("n1") == ("127.0.0.1", 9480)  # the node's own address
    assert cfg.metrics_at("n2") == ("10.0.0.2", 9480)
    raw = base(metrics={"port": 9480, "address": "0.0.0.0"})
    raw["nodes"][1]["metrics_port"] = 9481  # one machine: ports differ
    cfg = C.parse(raw, base=tmp_path)
    assert (cfg.metrics_at("n1"), cfg.metrics_at("n2")) == (("0.0.0.0", 9480), ("0.0.0.0", 9481))
    raw = base()
    raw["nodes"][0]["metrics_port"] = 9500  # this node alone
    cfg = C.parse(raw, base=tmp_path)
    assert (cfg.metrics_at("n1"), cfg.metrics_at("n2")) == (("127.0.0.1", 9500), None)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(metrics={"port": 9480}), "give nodes that share an address"),
        (lambda r: r.update(metrics={"port": 7802}), "already the RPC port of node n2"),
        (lambda r: r.update(metrics={"port": 0}), r"metrics\.port: 0 out of range"),
        (lambda r: r.update(metrics={"address": "x"}), r"metrics\.port: missing"),
        (lambda r: r.update(metrics={"port": 1, "address": "nowhere"}), "not an address"),
        (lambda r: r.update(metrics={"port": 1, "colour": 2}), "unknown key"),
        (lambda r: r["nodes"][0].update(metrics_port=99999), "metrics_port: 99999 out of range"),
        (lambda r: r["nodes"][0].update(name="@admin"), "not a valid node name"),
    ],
)
def test_bad_metrics_settings_are_refused(tmp_path: Path, mutate: Any, message: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(C.ConfigError, match=message):
        C.parse(raw, base=tmp_path)


def test_init_turns_metrics_on(tmp_path: Path) -> None:
    one_machine = [("n1", "127.0.0.1", 7801), ("n2", "127.0.0.1", 7802)]
    cfg = C.init(tmp_path / "a.toml", one_machine, metrics_port=9400)
    assert [cfg.metrics_at(n) for n in ("n1", "n2")] == [("127.0.0.1", 9400), ("127.0.0.1", 9401)]
    apart = [("n1", "10.0.0.1", 7801), ("n2", "10.0.0.2", 7801)]
    cfg = C.init(tmp_path / "b.toml", apart, metrics_port=9400)
    assert cfg.metrics == C.MetricsConfig(9400)
    assert C.load(tmp_path / "b.toml").metrics_at("n2") == ("10.0.0.2", 9400)
    assert C.init(tmp_path / "c.toml", apart).metrics is None
