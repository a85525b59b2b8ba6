"""The test of the Vagrant cluster, run from the host: `./dev vagrant test`.

Talks to the VMs over ssh (the config `vagrant ssh-config` wrote) and checks, with ordinary
shell commands inside them, that dfs deployed by deploy/install-node.sh behaves as a cluster:
a file written on each VM is read on the others, the MOUNT/.../HOST views, the nodes' view of
the volumes (`dfs volume list`; `dfs cluster status` is for the local launcher only), a clean
stop through systemd and a start through the fstab line, a daemon killed with SIGKILL and
restarted by systemd, a halted VM with the cluster going on (the halted node is not the
primary: failover is not built yet), and that VM back, caught up. Prints one PASS/FAIL line
per check and, last, "N passed, N failed"; exit status 1 if anything failed.

Everything inside the VMs runs under software emulation, many times slower than on the host:
every wait has its own deadline and polls a condition, never sleeps a fixed time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

MOUNT = "/mnt/dfs"
DIR = f"{MOUNT}/vmtest"


class Failed(Exception):
    pass


class Cluster:
    def __init__(self, ssh_config: str, nodes: list[str]) -> None:
        self.ssh_config = ssh_config
        self.nodes = nodes

    def sh(self, node: str, script: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run ``script`` as root on ``node``; its stdout (stderr too in the error)."""
        cmd = ["ssh", "-F", self.ssh_config, "-o", "ConnectTimeout=10", node,
               "sudo bash -c " + shlex.quote(script)]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"{node}: timed out after {timeout:g} s: {script}") from None
        if check and r.returncode != 0:
            raise Failed(f"{node}: exit {r.returncode}: {script}\n{r.stdout}{r.stderr}".rstrip())
        return r.stdout

    def ok(self, node: str, script: str, timeout: float = 60.0) -> bool:
        try:
            self.sh(node, script, timeout=timeout)
        except Failed:
            return False
        return True

    def vagrant(self, *args: str, timeout: float = 600.0) -> None:
        r = subprocess.run(["vagrant", *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise Failed(f"vagrant {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}")


def wait_until(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1.0)  # each poll is a round trip into an emulated VM
    raise Failed(f"not within {timeout:g} s: {what}")


def unit(node: str) -> str:
    return f"dfs-mountd@{node}.service"


def main_pid(c: Cluster, node: str) -> int:
    return int(c.sh(node, f"systemctl show -p MainPID --value {unit(node)}").strip() or 0)


def mounted(c: Cluster, node: str) -> bool:
    return c.ok(node, f"findmnt -n -t fuse.dfs {MOUNT} >/dev/null && ls {MOUNT} >/dev/null")


def check_running(c: Cluster) -> None:
    for n in c.nodes:
        state = c.sh(n, f"systemctl is-active {unit(n)}", check=False).strip()
        if state != "active":
            raise Failed(f"{n}: {unit(n)} is {state}")
        fstype = c.sh(n, f"findmnt -n -o FSTYPE {MOUNT}").strip()
        if fstype != "fuse.dfs":
            raise Failed(f"{n}: {MOUNT} is {fstype!r}, not fuse.dfs")
        fstab = c.sh(n, "grep fuse.dfs /etc/fstab")
        if f"x-systemd.requires={unit(n)}" not in fstab:
            raise Failed(f"{n}: no fstab line for the node: {fstab!r}")


def check_write_everywhere_read_everywhere(c: Cluster, token: str) -> None:
    c.sh(c.nodes[0], f"mkdir -p {DIR}")
    for n in c.nodes:
        c.sh(n, f"echo 'written on {n} {token}' > {DIR}/from-{n}")
    for reader in c.nodes:
        for writer in c.nodes:
            got = c.sh(reader, f"cat {DIR}/from-{writer}").strip()
            if got != f"written on {writer} {token}":
                raise Failed(f"{reader} reads {DIR}/from-{writer} as {got!r}")


def check_host_views(c: Cluster, token: str) -> None:
    first = c.nodes[0]
    hosts = c.sh(first, f"ls {MOUNT}/...").split()
    if sorted(hosts) != sorted(c.nodes):
        raise Failed(f"ls {MOUNT}/... on {first} lists {hosts}")
    if "..." in c.sh(first, f"ls -a {MOUNT}").split():
        raise Failed(f"{MOUNT}/... is listed by readdir")
    for reader in c.nodes:
        for host in c.nodes:
            got = c.sh(reader, f"cat {MOUNT}/.../{host}/vmtest/from-{first}").strip()
            if got != f"written on {first} {token}":
                raise Failed(f"{reader}: {host}'s copy of from-{first} is {got!r}")
    a, b = (f"{MOUNT}/.../{h}/vmtest/from-{first}" for h in (c.nodes[1], c.nodes[-1]))
    c.sh(first, f"cmp {a} {b}")  # two replicas compared with a plain shell command


def check_volume_status(c: Cluster) -> None:
    for n in c.nodes:
        vols = json.loads(c.sh(n, f"dfs volume list --json {MOUNT}"))
        root = next((v for v in vols if v["path"] == "/"), None)
        if root is None:
            raise Failed(f"{n}: no root volume in {vols}")
        if root["primary"] != c.nodes[0] or sorted(root["sites"]) != sorted(c.nodes):
            raise Failed(f"{n}: root volume {root}")
        want = "primary" if n == c.nodes[0] else "site"
        if root.get("role") != want:
            raise Failed(f"{n}: role {root.get('role')!r}, expected {want!r}")
    print(c.sh(c.nodes[0], f"dfs volume list {MOUNT}").rstrip(), file=sys.stderr)


def check_clean_stop_and_fstab_start(c: Cluster, token: str) -> None:
    n = c.nodes[1]
    c.sh(n, f"systemctl stop {unit(n)}")
    if c.ok(n, f"findmnt {MOUNT}"):
        raise Failed(f"{n}: {MOUNT} still mounted after systemctl stop")
    # Result=success: exit 0, or SIGTERM while stopping (systemd's own notion of a clean stop;
    # ExecMainStatus alone reports 15 when the unmount and systemd's SIGTERM cross).
    result = c.sh(n, f"systemctl show -p Result --value {unit(n)}").strip()
    journal = c.sh(n, f"journalctl -u {unit(n)} --no-pager -o cat | tail -n 30")
    # The fstab line brings the node back: its mount unit requires the service. Done before
    # judging the stop, so that a failure here leaves the node running for the next checks.
    c.sh(n, f"systemctl start $(systemd-escape --path --suffix=mount {MOUNT})", timeout=300)
    wait_until(f"{n} mounted again", lambda: mounted(c, n), 120)
    if result != "success":
        raise Failed(f"{n}: stop result {result!r}:\n{journal}")
    c.sh(c.nodes[0], f"echo 'after restart {token}' > {DIR}/after-stop")
    got = c.sh(n, f"cat {DIR}/after-stop").strip()
    if got != f"after restart {token}":
        raise Failed(f"{n} reads after-stop as {got!r}")


def check_kill_restarts(c: Cluster, token: str) -> None:
    n = c.nodes[-1]
    before = main_pid(c, n)
    restarts = int(c.sh(n, f"systemctl show -p NRestarts --value {unit(n)}").strip())
    c.sh(n, f"kill -9 {before}")
    wait_until(
        f"systemd restarts {unit(n)}",
        lambda: (
            main_pid(c, n) not in (0, before)
            and c.sh(n, f"systemctl is-active {unit(n)}", check=False).strip() == "active"
        ),
        240,
    )
    wait_until(f"{n} mounted again", lambda: mounted(c, n), 60)
    after = int(c.sh(n, f"systemctl show -p NRestarts --value {unit(n)}").strip())
    if after != restarts + 1:
        raise Failed(f"{n}: NRestarts {restarts} -> {after}")
    c.sh(c.nodes[0], f"echo 'after kill {token}' > {DIR}/after-kill")
    got = c.sh(n, f"cat {DIR}/after-kill").strip()
    if got != f"after kill {token}":
        raise Failed(f"{n} reads after-kill as {got!r}")
    journal = c.sh(n, f"journalctl -u {unit(n)} --no-pager -o cat | tail -n 50")
    if "did not stop cleanly" not in journal and "stale" not in journal:
        raise Failed(f"{n}: the journal does not show the recovery:\n{journal}")


def check_halted_vm(c: Cluster, token: str) -> None:
    down = c.nodes[-1]
    c.vagrant("halt", down)
    c.sh(c.nodes[0], f"echo 'while {down} was down {token}' > {DIR}/during-halt", timeout=120)
    for n in c.nodes[:-1]:
        got = c.sh(n, f"cat {DIR}/during-halt").strip()
        if got != f"while {down} was down {token}":
            raise Failed(f"{n} reads during-halt as {got!r}")
        c.sh(n, f"ls {DIR} >/dev/null")


def check_halted_vm_returns(c: Cluster, token: str) -> None:
    back = c.nodes[-1]
    c.vagrant("up", "--no-provision", back, timeout=900)
    wait_until(f"{back} mounted after boot", lambda: mounted(c, back), 300)
    want = f"while {back} was down {token}"
    path = f"{MOUNT}/.../{back}/vmtest/during-halt"  # the returning node's own replica
    wait_until(
        f"{back}'s replica has during-halt",
        lambda: c.sh(back, f"cat {path}", check=False).strip() == want,
        120,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ssh-config", required=True)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    if args.nodes < 3:
        print("vmtest: needs at least 3 nodes", file=sys.stderr)
        return 2
    c = Cluster(args.ssh_config, [f"n{i}" for i in range(1, args.nodes + 1)])
    token = secrets.token_hex(4)
    checks: list[tuple[str, Callable[[], None]]] = [
        ("every node runs under systemd with its fstab mount", lambda: check_running(c)),
        ("a file written on each VM is read on the others",
         lambda: check_write_everywhere_read_everywhere(c, token)),
        ("MOUNT/.../HOST views show each host's copy", lambda: check_host_views(c, token)),
        ("dfs volume list: primary and sites on every node", lambda: check_volume_status(c)),
        ("systemctl stop unmounts cleanly; the fstab mount starts it again",
         lambda: check_clean_stop_and_fstab_start(c, token)),
        ("kill -9 of a daemon: systemd restarts it and it serves again",
         lambda: check_kill_restarts(c, token)),
        ("a halted VM (not the primary): the cluster goes on",
         lambda: check_halted_vm(c, token)),
        ("the halted VM boots, mounts and catches up", lambda: check_halted_vm_returns(c, token)),
    ]  # fmt: skip
    passed = failed = 0
    for name, fn in checks:
        start = time.monotonic()
        try:
            fn()
        except Exception as exc:  # one failed check does not stop the others
            failed += 1
            print(f"FAIL {name} ({time.monotonic() - start:.0f} s)\n     {exc}", flush=True)
        else:
            passed += 1
            print(f"PASS {name} ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("VAGRANT_CHECKPOINT_DISABLE", "1")
    sys.exit(main())
