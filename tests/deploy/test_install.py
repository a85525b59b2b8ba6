"""The package and the deployment scripts without a VM: wheels, an offline install into a
throwaway root (deploy/install-node.sh --root), the unit checked by ``systemd-analyze verify``,
and the Vagrant scripts' syntax. The VM cluster itself is `./dev vagrant up|test|down`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

pytestmark = pytest.mark.slow


def _run(
    cmd: list[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    _run([DEPLOY / "build-wheels.sh", out], env={**os.environ, "DFS_PYTHON": sys.executable})
    return out


@pytest.fixture(scope="module")
def installed(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("node")
    cfg = base / "cfg" / "cluster.toml"
    _run([sys.executable, "-m", "dfs_tools", "init", "n1=198.18.11.11:7800", "n2=198.18.11.12",
          "--config", cfg])  # fmt: skip
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_text("UUID=1234 / ext4 defaults 0 1\n")
    cmd: list[str | Path] = [DEPLOY / "install-node.sh", "--wheels", wheels, "--root", root,
                             "--config", cfg, "--node", "n1"]  # fmt: skip
    _run(cmd)
    _run(cmd)  # a re-run upgrades in place and rewrites its own lines only
    yield root


def test_the_wheel_has_the_three_commands(wheels: Path) -> None:
    (whl,) = wheels.glob("dfs-*.whl")
    with zipfile.ZipFile(whl) as z:
        ep = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        text = z.read(ep).decode()
    for script in ("dfs =", "dfs-mountd =", "mount.fuse.dfs ="):
        assert script in text
    # pyfuse3 has no binary wheel on PyPI: it was built here, so the directory is complete.
    assert list(wheels.glob("pyfuse3-*.whl"))


def test_offline_install_into_a_fresh_venv(wheels: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _run([venv / "bin" / "pip", "install", "-q", "--no-index", "--find-links", wheels, "dfs"],
         env={**os.environ, "PIP_CONFIG_FILE": os.devnull})  # fmt: skip
    for cmd in ("dfs", "dfs-mountd", "mount.fuse.dfs"):
        assert "Usage:" in _run([venv / "bin" / cmd, "--help"]).stdout
    # The installed package is the wheel's, not this checkout's.
    code = "import mountd; print(mountd.__file__)"
    where = _run([venv / "bin" / "python", "-c", code], cwd=tmp_path)
    assert where.stdout.startswith(str(venv))


def test_install_node_lays_out_a_node(installed: Path) -> None:
    root = installed
    assert os.readlink(root / "usr/sbin/mount.fuse.dfs") == "/opt/dfs/bin/mount.fuse.dfs"
    assert "Usage:" in _run([root / "opt/dfs/bin/dfs-mountd", "--help"]).stdout
    wants = root / "etc/systemd/system/multi-user.target.wants/dfs-mountd@n1.service"
    assert wants.is_symlink()
    secret = root / "etc/dfs/cluster.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert 'secret_file = "cluster.secret"' in (root / "etc/dfs/cluster.toml").read_text()
    fstab = (root / "etc/fstab").read_text().splitlines()
    assert fstab[0] == "UUID=1234 / ext4 defaults 0 1"  # the rest of fstab is left alone
    dfs_lines = [line for line in fstab if "fuse.dfs" in line]
    assert dfs_lines == [
        "n1 /mnt/dfs fuse.dfs _netdev,x-systemd.requires=dfs-mountd@n1.service 0 0"
    ]
    assert (root / "mnt/dfs").is_dir()


def test_the_installed_node_starts_from_its_config(installed: Path) -> None:
    """The configuration as installed loads for the node (secret found, mode accepted)."""
    code = (
        "import sys; from pathlib import Path; from mountd.daemon import load_cluster; "
        "s = load_cluster(Path(sys.argv[1]), 'n1'); print(s.node.address, s.node.port)"
    )
    out = _run([installed / "opt/dfs/bin/python", "-c", code, installed / "etc/dfs/cluster.toml"])
    assert out.stdout.split() == ["198.18.11.11", "7800"]


def test_systemd_analyze_verifies_the_unit(installed: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (installed / "etc/systemd/system/dfs-mountd@.service").read_text()
    # The unit as installed, pointing at the throwaway root's daemon (verify checks it exists).
    unit = unit.replace("/opt/dfs/bin/", f"{installed}/opt/dfs/bin/")
    path = tmp_path / "dfs-mountd@n1.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    # verify exits 0 on unknown keys too: any complaint about our unit is a failure.
    complaints = [line for line in r.stderr.splitlines() if "dfs-mountd@" in line]
    assert r.returncode == 0 and not complaints, r.stderr


def test_unit_settings() -> None:
    unit = (DEPLOY / "dfs-mountd@.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "KillSignal=SIGTERM",
                 "RestartPreventExitStatus=2 3 4", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in unit.splitlines()


@pytest.mark.parametrize(
    "script",
    ["deploy/install-node.sh", "deploy/build-wheels.sh", "vagrant/build-box.sh",
     "vagrant/cluster.sh", "vagrant/provision.sh"],
)  # fmt: skip
def test_scripts_parse(script: str) -> None:
    _run(["bash", "-n", ROOT / script])
    assert os.access(ROOT / script, os.X_OK)


def test_vmtest_compiles() -> None:
    _run([sys.executable, "-m", "py_compile", ROOT / "vagrant" / "vmtest.py"])
