"""An fsync-heavy workload for crash tests, and the oracle that checks what survived.

The writer (``python tests/crashload.py MOUNT TOP JOURNAL SEED SECONDS``,
stdlib only) works in one directory (TOP) of a dfs mount: it creates files,
appends records, overwrites ranges, shrinks files, replaces files the way
editors do (write a temporary file, fsync it, rename it over the target, fsync
the directory), makes and removes directories and deletes files. Before each
operation it appends a ``begin`` line describing it to a journal kept OUTSIDE
the mount; after the operation's fsync/fsyncdir *returns* it appends an
``ack`` line with the acknowledged state (sizes and sha256 of the affected
files, directories that exist, names that are gone). Every journal line is
flushed and fsynced before the writer goes on, so the journal is the list of
promises the file system made.

``Oracle`` replays journals (file contents are regenerated from the seeds in
``begin`` lines and cross-checked against the sha256 of ``ack`` lines) and
checks a tree against them: every acknowledged state must be there exactly,
and only the one operation in flight when the daemon died may be half done.
After a check the oracle adopts what it saw of that in-flight operation, so
later checks of the same tree are exact.

``python tests/crashload.py hammer FILE SEED`` only overwrites and fsyncs one
file, as fast as it can (see ``hammer_main``).

Writers exit 0 when their time is up, 3 when the file system went away under
it (ENOTCONN, ECONNABORTED, EIO: the daemon was killed), 1 on anything else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_DONE = 0
EXIT_FS_GONE = 3
GONE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)

DIR = "dir"  # model value of a directory


def data(dseed: int, n: int) -> bytes:
    """The deterministic bytes a write with this seed puts down."""
    return random.Random(dseed).randbytes(n)


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


# --- the writer -----------------------------------------------------------------------------


class Journal:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the writer

    def add(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    def __init__(self, mount_root: Path, top: str, journal: Journal, seed: int) -> None:
        self.root = mount_root
        self.top = top
        self.j = journal
        self.rnd = random.Random(seed)
        self.files: dict[str, bytearray] = {}
        self.dirs: list[str] = [top]
        self.n = 0

    def p(self, rel: str) -> Path:
        return self.root / rel

    def new_name(self, prefix: str) -> str:
        self.n += 1
        return f"{self.rnd.choice(self.dirs)}/{prefix}{self.n}"

    def dseed(self) -> int:
        return self.rnd.getrandbits(48)

    def size(self) -> int:
        # mostly small records, sometimes several 64 KiB blocks
        return self.rnd.choice([1, 100, 4000, 20000, 65536, 70000, 200000, 600000])

    def ack_file(self, op: str, rel: str, **extra: Any) -> None:
        c = self.files[rel]
        self.j.add({"t": "ack", "op": op, "files": {rel: [len(c), sha(c)]}, **extra})

    # --- operations: each begins, does the work, fsyncs, acks ---

    def create(self) -> None:
        rel = self.new_name("f")
        n, s = self.size(), self.dseed()
        self.j.add({"t": "begin", "op": "create", "path": rel, "writes": [[0, n, s]]})
        fd = os.open(self.p(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data(s, n))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.p(rel).parent)
        self.files[rel] = bytearray(data(s, n))
        self.ack_file("create", rel)

    def append(self) -> None:
        rel = self.rnd.choice(sorted(self.files))
        c = self.files[rel]
        writes = []
        off = len(c)
        for _ in range(self.rnd.randint(1, 3)):
            n = self.rnd.choice([37, 512, 3000, 65536, 100001])
            writes.append([off, n, self.dseed()])
            off += n
        self.j.add({"t": "begin", "op": "append", "path": rel, "writes": writes})
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_APPEND)
        try:
            for _, n, s in writes:
                os.write(fd, data(s, n))
            os.fsync(fd)
        finally:
            os.close(fd)
        for _, n, s in writes:
            c += data(s, n)
        self.ack_file("append", rel)

    def overwrite(self) -> None:
        rel = self.rnd.choice(sorted(self.files))
        c = self.files[rel]
        off = self.rnd.randint(0, len(c))
        n, s = self.rnd.choice([1, 777, 4096, 65536, 131072, 300000]), self.dseed()
        self.j.add({"t": "begin", "op": "overwrite", "path": rel, "writes": [[off, n, s]]})
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            os.pwrite(fd, data(s, n), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        c[off : off + n] = data(s, n)
        self.ack_file("overwrite", rel)

    def shrink(self) -> None:
        rel = self.rnd.choice(sorted(self.files))
        c = self.files[rel]
        size = self.rnd.randint(0, len(c))
        self.j.add({"t": "begin", "op": "truncate", "path": rel, "size": size})
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        del c[size:]
        self.ack_file("truncate", rel)

    def replace(self) -> None:
        """The editor pattern: new content in a temporary file, renamed over the target."""
        if self.files and self.rnd.random() < 0.7:
            rel = self.rnd.choice(sorted(self.files))
        else:
            rel = self.new_name("e")
        parent, name = rel.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp"
        n, s = self.size(), self.dseed()
        self.j.add({"t": "begin", "op": "replace", "path": rel, "tmp": tmp, "writes": [[0, n, s]]})
        fd = os.open(self.p(tmp), os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data(s, n))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.p(tmp), self.p(rel))
        fsync_dir(self.p(parent))
        self.files[rel] = bytearray(data(s, n))
        self.ack_file("replace", rel, gone=[tmp], renamed=[tmp, rel])

    def mkdir(self) -> None:
        rel = self.new_name("d")
        self.j.add({"t": "begin", "op": "mkdir", "path": rel})
        os.mkdir(self.p(rel))
        fsync_dir(self.p(rel).parent)
        fsync_dir(self.p(rel))
        self.dirs.append(rel)
        self.j.add({"t": "ack", "op": "mkdir", "dirs": [rel]})

    def unlink(self) -> None:
        rel = self.rnd.choice(sorted(self.files))
        self.j.add({"t": "begin", "op": "unlink", "path": rel})
        os.unlink(self.p(rel))
        fsync_dir(self.p(rel).parent)
        del self.files[rel]
        self.j.add({"t": "ack", "op": "unlink", "gone": [rel]})

    def rmdir(self) -> None:
        used = {f.rsplit("/", 1)[0] for f in self.files} | {d.rsplit("/", 1)[0] for d in self.dirs}
        empty = [d for d in self.dirs[1:] if d not in used]
        if not empty:
            return
        rel = self.rnd.choice(empty)
        self.j.add({"t": "begin", "op": "rmdir", "path": rel})
        os.rmdir(self.p(rel))
        fsync_dir(self.p(rel).parent)
        self.dirs.remove(rel)
        self.j.add({"t": "ack", "op": "rmdir", "gone": [rel]})

    def step(self) -> None:
        if len(self.files) < 3:
            self.create()
            return
        ops = [
            (self.create, 3 if len(self.files) < 15 else 0),
            (self.append, 5),
            (self.overwrite, 5),
            (self.shrink, 1),
            (self.replace, 3),
            (self.mkdir, 1 if len(self.dirs) < 6 else 0),
            (self.unlink, 1),
            (self.rmdir, 1),
        ]
        fns, weights = zip(*ops, strict=True)
        self.rnd.choices(fns, weights)[0]()


def hammer_main(argv: list[str]) -> int:
    """Overwrite random ranges of one existing file, fsync after each, until the fs goes away.

    Every fsync settles the checksums, so every following write is again the
    first unsettled one: the moment a killed daemon must not get wrong.
    """
    path, rnd = Path(argv[0]), random.Random(int(argv[1]))
    try:
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        while True:
            n = min(size, rnd.choice([4096, 65536, 131072, 1 << 20]))
            off = rnd.randrange(0, size - n + 1, 4096) if size > n else 0
            os.pwrite(fd, rnd.randbytes(n), off)
            os.fsync(fd)
    except OSError as exc:
        if exc.errno in GONE_ERRNOS:
            return EXIT_FS_GONE
        raise


def writer_main(argv: list[str]) -> int:
    mount_root, top, journal, seed, seconds = (
        Path(argv[0]),
        argv[1],
        Path(argv[2]),
        int(argv[3]),
        float(argv[4]),
    )
    j = Journal(journal)
    try:
        j.add({"t": "begin", "op": "mkdir", "path": top})
        os.mkdir(mount_root / top)
        fsync_dir(mount_root)
        j.add({"t": "ack", "op": "mkdir", "dirs": [top]})
        w = Writer(mount_root, top, j, seed)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            w.step()
    except OSError as exc:
        if exc.errno in GONE_ERRNOS:
            print(f"writer: file system went away: {exc}", file=sys.stderr)
            return EXIT_FS_GONE
        raise
    return EXIT_DONE


# --- the oracle -----------------------------------------------------------------------------


Content = bytes | str  # file contents, or DIR


@dataclass
class InFlight:
    rec: dict[str, Any]
    before: dict[str, Content | None]  # state of the touched paths before it began


@dataclass
class Oracle:
    """What a tree must hold, from journals; ``check`` compares a real tree against it."""

    model: dict[str, Content] = field(default_factory=dict)
    inflight: list[InFlight] = field(default_factory=list)

    def replay(self, journal: Path) -> None:
        """Apply one writer's journal: acked operations exactly, the last unacked one as open."""
        lines = journal.read_text(encoding="utf-8").splitlines()
        pending: dict[str, Any] | None = None
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                assert i == len(lines) - 1, f"{journal}:{i + 1}: corrupt journal line"
                break
            if rec["t"] == "begin":
                assert pending is None, f"{journal}:{i + 1}: two operations in flight"
                pending = rec
                continue
            if pending is not None:
                self._apply(pending)
            self._check_ack(journal, i + 1, rec)
            pending = None
        if pending is not None:
            touched = [pending["path"]] + ([pending["tmp"]] if "tmp" in pending else [])
            self.inflight.append(InFlight(pending, {p: self.model.get(p) for p in touched}))

    def _apply(self, rec: dict[str, Any]) -> None:
        op, path = rec["op"], rec["path"]
        if op == "mkdir":
            self.model[path] = DIR
        elif op in ("unlink", "rmdir"):
            del self.model[path]
        elif op == "truncate":
            old = self.model[path]
            assert isinstance(old, bytes)
            self.model[path] = old[: rec["size"]]
        elif op == "replace":
            self.model.pop(rec["tmp"], None)
            self.model[path] = _apply_writes(b"", rec["writes"])
        else:  # create, append, overwrite
            old = self.model.get(path, b"")
            assert isinstance(old, bytes)
            self.model[path] = _apply_writes(old, rec["writes"])

    def _check_ack(self, journal: Path, lineno: int, rec: dict[str, Any]) -> None:
        for d in rec.get("dirs", []):
            assert self.model.get(d) == DIR, f"{journal}:{lineno}: replay lacks directory {d}"
        for rel, (size, digest) in rec.get("files", {}).items():
            c = self.model.get(rel)
            assert isinstance(c, bytes) and len(c) == size and sha(c) == digest, (
                f"{journal}:{lineno}: the oracle's replay of {rel} disagrees with the writer"
            )
        for rel in rec.get("gone", []):
            assert rel not in self.model, f"{journal}:{lineno}: replay still has {rel}"

    def check(self, root: Path) -> list[str]:
        """Differences between the tree at ``root`` and the promises; adopts in-flight results."""
        errors: list[str] = []
        seen = _scan(root, errors)
        open_paths = {p for f in self.inflight for p in f.before}
        for rel, want in sorted(self.model.items()):
            if rel in open_paths:
                continue
            got = seen.get(rel)
            if got is None:
                errors.append(f"{rel}: acknowledged {_describe(want)} is missing")
            elif got != want:
                errors.append(f"{rel}: expected {_describe(want)}, found {_describe(got)}")
        for rel, got in sorted(seen.items()):
            if rel not in self.model and rel not in open_paths:
                errors.append(f"{rel}: unexpected {_describe(got)} (never acknowledged)")
        for f in self.inflight:
            errors += _check_inflight(f, seen)
            for p in f.before:
                if p in seen:
                    self.model[p] = seen[p]
                else:
                    self.model.pop(p, None)
        self.inflight.clear()
        return errors


def _apply_writes(old: bytes, writes: list[list[int]]) -> bytes:
    c = bytearray(old)
    for off, n, s in writes:
        if off > len(c):
            c += bytes(off - len(c))
        c[off : off + n] = data(s, n)
    return bytes(c)


def _describe(c: Content | None) -> str:
    if c is None:
        return "nothing"
    if c == DIR:
        return "a directory"
    assert isinstance(c, bytes)
    return f"a file of {len(c)} bytes (sha256 {sha(c)[:12]})"


def _scan(root: Path, errors: list[str]) -> dict[str, Content]:
    """Every file and directory under root (relative paths), reading every file in full."""
    out: dict[str, Content] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: errors.append(str(e))):
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel_dir, d))] = DIR
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                out[rel] = (Path(dirpath) / name).read_bytes()
            except OSError as exc:
                errors.append(f"{rel}: cannot read: {exc}")
    return out


def _check_inflight(f: InFlight, seen: dict[str, Content]) -> list[str]:
    """The operation in flight may be absent, done, or (for writes) partly done."""
    rec = f.rec
    op, path = rec["op"], rec["path"]
    old = f.before[path]
    got = seen.get(path)
    where = f"{path} (in flight: {op})"
    if op == "mkdir":
        ok = got is None or got == DIR
    elif op in ("unlink", "rmdir"):
        ok = got is None or got == old
    elif op == "truncate":
        assert isinstance(old, bytes)
        ok = got in (old, old[: rec["size"]])
    elif op == "replace":
        tmp = seen.get(rec["tmp"])
        if tmp is not None and not isinstance(tmp, bytes):
            return [f"{rec['tmp']}: temporary file became {_describe(tmp)}"]
        ok = got == old or got == _apply_writes(b"", rec["writes"])
    else:  # create, append, overwrite
        base = b"" if old is None else old
        assert isinstance(base, bytes)
        if got is None:
            ok = op == "create"
        elif not isinstance(got, bytes):
            ok = False
        else:
            ok = _partly_written(base, rec["writes"], got)
    return [] if ok else [f"{where}: found {_describe(got)}, not a state it may leave"]


def _partly_written(old: bytes, writes: list[list[int]], got: bytes) -> bool:
    """Each byte is the old one, a byte one of the writes put there, or a hole."""
    end = max([len(old)] + [off + n for off, n, _ in writes])
    if not len(old) <= len(got) <= end:
        return False
    full = _apply_writes(old, writes)
    base = old + bytes(len(got) - len(old))
    new = [(off, data(s, n)) for off, n, s in writes]
    step = 4096
    for a in range(0, len(got), step):
        g = got[a : a + step]
        if g == base[a : a + step] or g == full[a : a + step]:
            continue
        for i in range(a, a + len(g)):
            if got[i] == base[i]:
                continue
            if not any(off <= i < off + len(b) and b[i - off] == got[i] for off, b in new):
                return False
    return True


if __name__ == "__main__":
    if sys.argv[1] == "hammer":
        sys.exit(hammer_main(sys.argv[2:]))
    sys.exit(writer_main(sys.argv[1:]))
