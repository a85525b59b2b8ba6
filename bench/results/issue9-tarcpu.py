"""Issue 9 check: daemon CPU and wall time per `tar x` on a fresh 3-node cluster (no harness).

    cd WORKTREE && python3 issue9-tarcpu.py SIDE WORKTREE OUT.json [--rm]

Brings up `dfs cluster up --dir /tmp/b9cl-SIDE --nodes 3` with WORKTREE's venv (run it
from WORKTREE: the daemons are `python -m mountd`), extracts the quick benchmark's
1,000-file tarball (bench/.cache) on n1's mount and then on n2's, and records for each
extraction the wall time and the CPU time (utime+stime) of the three daemons together.
Without --rm: 4 extractions per node into new directories (tarcpu-*.json). With --rm:
5 per node into one directory that is `rm -rf`ed before each later one, as the
benchmark's tar rounds do (tarcpu-rm-*.json). Always brings the cluster down.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

side, tree, out = sys.argv[1], sys.argv[2], sys.argv[3]
rm_between = "--rm" in sys.argv[4:]
TAR = f"{tree}/bench/.cache/stdlib-3.11.7-first1000.tar"
cdir = f"/tmp/b9cl-{side}"
shutil.rmtree(cdir, ignore_errors=True)
dfs = f"{tree}/.venv/bin/dfs"
TCK = os.sysconf("SC_CLK_TCK")


def daemons() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mountd" in b" ".join(cmd) and any(cdir.encode() in c for c in cmd):
            pids.append(int(p))
    return pids


def cpu(pids: list[int]) -> float:
    t = 0
    for p in pids:
        f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    return t / TCK


subprocess.run([dfs, "cluster", "up", "--dir", cdir, "--nodes", "3"], cwd=tree, check=True)
res = []
try:
    pids = daemons()
    assert len(pids) == 3, pids
    for node in ("n1", "n2"):
        for i in range(5 if rm_between else 4):
            d = f"{cdir}/{node}/mnt/tree{node}" if rm_between else f"{cdir}/{node}/mnt/t{i}{node}"
            r0, rc0 = time.monotonic(), cpu(pids)
            if os.path.exists(d):
                subprocess.run(["rm", "-rf", d], check=True)
            rw, rc = time.monotonic() - r0, cpu(pids) - rc0
            os.sync()
            os.mkdir(d)
            c0, w0 = cpu(pids), time.monotonic()
            subprocess.run(["tar", "-xf", TAR, "-C", d], check=True)
            w, c = time.monotonic() - w0, cpu(pids) - c0
            s = {"node": node, "i": i, "wall_s": w, "daemons_cpu_s": c}
            if rm_between:
                s |= {"rm_wall_s": rw, "rm_cpu_s": rc}
            res.append(s)
            print(side, node, i, f"tar wall {w:.1f} s, daemons cpu {c:.2f} s", flush=True)
finally:
    subprocess.run([dfs, "cluster", "down", "--dir", cdir], cwd=tree)
    shutil.rmtree(cdir, ignore_errors=True)
load = Path("/proc/loadavg").read_text()
Path(out).write_text(json.dumps({"side": side, "loadavg": load, "samples": res}, indent=1))
