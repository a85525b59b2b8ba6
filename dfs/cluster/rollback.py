"""Rolling a site back to its primary's journal: what an old primary made that nobody acknowledged.

A primary cut off from its sites may have made updates that a majority never applied (their
callers got ``ETIMEDOUT`` or nothing: they were never acknowledged); meanwhile the majority
elected a new primary whose journal goes on without them. When the old primary comes back as a
site, the new primary finds that its journal parts from its own after sequence ``to``
(``EpochState.end_of``) and asks it to roll back (``repl.rollback``). The site then:

1. keeps what it is about to undo where an admin finds it: ``DATA/rolled-back/vol<V>-<from>-
   <to>-<time>/`` holds the journal records (``records.msgpack``), a copy of each data file they
   touched (``files/<inode>``) and ``manifest.json`` (what, when, whose); ``dfs rollbacks`` lists
   them, and the log says where;
2. asks the primary (``repl.fetch``) for the current value of every key those records wrote and
   for the data files they touched, as of one sequence ``P`` of the primary's journal;
3. installs them and its sequence back to ``to`` in one transaction, drops the records after
   ``to`` from its journal, and tells its kernel to forget what they changed.

Then it catches up from ``to`` like any site. Why that gives the primary's replica: every key
the undone records wrote now has the primary's value as of ``P``, every other key still has the
value both journals agree on as of ``to``, and applying the primary's records ``to + 1 .. P``
(each sets whole values) leaves every key as the primary has it at ``P``. A crash in the middle
leaves the site diverged or at ``to`` with some newer values: both are handled again (the
primary asks again; catching up from ``to`` overwrites).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from dfs.cluster.applier import Inval, Notifier, invalidations
from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.meta import schema as S
from dfs.meta.replica import ReplicaError, decode_record
from dfs.meta.store import MetaStore
from dfs.net.frames import Field
from dfs.net.rpc import Methods
from dfs.types import VolumeId

log = logging.getLogger("dfs.cluster.rollback")

Call = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
MAX_KEYS = 100_000
CHUNK = 1 << 20
_DIRENTS = S.DB_NAMES.index("dirents")
DIR = "rolled-back"


def rolled_back_dir(data: DataStore) -> Path:
    return data.root.parent / DIR


def list_rolled_back(data_dir: Path) -> list[dict[str, Any]]:
    """The manifests kept under ``data_dir`` (newest last)."""
    out = []
    for d in sorted((data_dir / DIR).glob("vol*")):
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            m = {"error": "no readable manifest.json"}
        m["dir"] = str(d)
        out.append(m)
    return out


class Rollback:
    """Both sides: ``register`` offers the primary's (``repl.fetch``, ``repl.fetch_data``)
    and the site's (``repl.rollback``); ``admit(vol, peer, epoch)`` raises unless this node
    follows ``peer`` as the primary of ``vol`` in ``epoch``."""

    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        call: Call,
        admit: Callable[[VolumeId, str, int | None], None],
        last_epoch: Callable[[VolumeId], int],
        forget: Callable[[VolumeId, int], Awaitable[None]],
        notify: Notifier | None,
        *,
        timeout: float,
    ) -> None:
        """``forget(vol, to)``: the site's epoch history loses what follows ``to``."""
        self.meta = meta
        self.data = data
        self._call = call
        self._admit = admit
        self._last_epoch = last_epoch
        self._forget = forget
        self.notify = notify
        self.timeout = timeout
        self._lock = trio.Lock()
        self.count = 0

    def register(self, methods: Methods) -> None:
        vol = {"vol": Field(int)}
        methods.add(
            "repl.fetch",
            {**vol, "keys": Field(list, max_len=MAX_KEYS), "inos": Field(list, max_len=MAX_KEYS)},
            self._fetch,
        )
        methods.add(
            "repl.fetch_data",
            {**vol, "ino": Field(int), "off": Field(int), "size": Field(int)},
            self._fetch_data,
        )
        methods.add(
            "repl.rollback",
            {**vol, "epoch": Field(int), "to": Field(int)},
            self._rollback,
        )

    # --- the primary's side ---------------------------------------------------------------------

    async def _fetch(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """Values of ``keys`` ([db index, key]) and sizes of the data files of ``inos``, as of
        one sequence of this node's journal of ``vol``."""
        dbs = [self.meta.dbs[name] for name in S.DB_NAMES]
        values: list[bytes | None] = []
        with self.meta.read() as txn:
            seq = self.meta.seq(VolumeId(args["vol"]))
            for item in args["keys"]:
                if not (isinstance(item, list) and len(item) == 2):
                    raise FsError(errno.EINVAL, "malformed key")
                idx, key = item
                if idx not in S.REPLICATED or not isinstance(key, bytes):
                    raise FsError(errno.EINVAL, f"not a replicated key: {idx}")
                raw = txn.get(key, db=dbs[idx])
                values.append(None if raw is None else bytes(raw))
        sizes: list[int | None] = []
        for ino in args["inos"]:
            try:
                sizes.append(os.stat(self.data.fspath(int(ino))).st_size)
            except FileNotFoundError:
                sizes.append(None)
        return {"seq": seq, "values": values, "sizes": sizes}

    async def _fetch_data(self, peer: str, args: dict[str, Any]) -> bytes:
        size = min(int(args["size"]), CHUNK)
        fd = self.data.open(int(args["ino"]), create=False)
        if fd is None:
            return b""
        try:
            return await trio.to_thread.run_sync(
                DataStore.pread, fd, int(args["off"]), size, int(args["off"]) + size
            )
        finally:
            self.data.close(fd)

    # --- the site's side ------------------------------------------------------------------------

    async def _rollback(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        vol, to = VolumeId(args["vol"]), int(args["to"])
        self._admit(vol, peer, args["epoch"])
        async with self._lock:
            have = self.meta.seq(vol)
            if 0 <= to < have:
                await self._undo(vol, peer, to, have)
        return {"have": self.meta.seq(vol), "last": self._last_epoch(vol)}

    async def _undo(self, vol: VolumeId, primary: str, to: int, have: int) -> None:
        records = [(s, bytes(raw)) for s, raw in self.meta.journal_entries(vol, to) if s <= have]
        if [s for s, _ in records] != list(range(to + 1, have + 1)):
            raise FsError(
                errno.EIO,
                f"volume {vol}: records {to + 1}..{have} to roll back are not all in the "
                "journal: this replica needs `dfs heal`",
            )
        try:
            decoded = [decode_record(raw) for _s, raw in records]
        except ReplicaError as exc:
            raise FsError(errno.EIO, f"volume {vol}: unreadable journal record: {exc}") from None
        keys = sorted({(idx, bytes(key)) for rec in decoded for idx, key, _v in rec.ws})
        inos = sorted({int(op[1]) for rec in decoded for op in rec.data})
        kept = await trio.to_thread.run_sync(self._keep, vol, primary, to, records, decoded, inos)
        log.warning(
            "volume %d: rolling back updates %d..%d (never acknowledged: the primary %s does not "
            "have them); what they changed is kept in %s",
            vol,
            to + 1,
            have,
            primary,
            kept,
        )
        got = await self._call(
            primary,
            "repl.fetch",
            {"vol": int(vol), "keys": [[i, k] for i, k in keys], "inos": inos},
            self.timeout,
        )
        values, sizes = got["values"], got["sizes"]
        if len(values) != len(keys) or len(sizes) != len(inos):
            raise FsError(errno.EPROTO, "malformed fetch answer")
        for ino, size in zip(inos, sizes, strict=True):
            await self._copy_file(vol, primary, ino, size)
        files = [ino for ino, size in zip(inos, sizes, strict=True) if size is not None]
        await trio.to_thread.run_sync(self._install, vol, to, have, keys, values, files)
        await self._forget(vol, to)
        self.count += 1
        changed: list[Inval] = []
        for rec in decoded:
            changed.extend(invalidations(rec.ws, rec.data))
        if changed and self.notify is not None:
            await self.notify.flush(self.notify.put(changed))
        log.warning("volume %d: rolled back to update %d; catching up from there", vol, to)

    def _keep(
        self,
        vol: VolumeId,
        primary: str,
        to: int,
        records: list[tuple[int, bytes]],
        decoded: list[Any],
        inos: list[int],
    ) -> Path:
        """Write what is rolled back under ``DATA/rolled-back/``; its directory."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        d = rolled_back_dir(self.data) / f"vol{vol}-{to + 1}-{records[-1][0]}-{stamp}"
        (d / "files").mkdir(parents=True, exist_ok=True)
        (d / "records.msgpack").write_bytes(msgpack.packb(records, use_bin_type=True))
        copied = []
        for ino in inos:
            src = self.data.path(ino)
            try:
                data = src.read_bytes()
            except FileNotFoundError:
                continue
            (d / "files" / f"{ino:016x}").write_bytes(data)
            copied.append(f"{ino:016x}")
        manifest = {
            "volume": int(vol),
            "updates": [to + 1, records[-1][0]],
            "new_primary": primary,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "operations": [rec.op for rec in decoded],
            "epochs": sorted({rec.epoch for rec in decoded}),
            "inodes": sorted(
                {f"{S.read_u64(k[:8]):016x}" for rec in decoded for _i, k, _v in rec.ws}
            ),
            "files": copied,
            # Directory entries the updates made (+) or removed (-): the names to look for.
            "entries": [
                ("-" if v is None else "+") + bytes(k[8:]).decode(errors="replace")
                for rec in decoded
                for i, k, v in rec.ws
                if i == _DIRENTS
            ],
        }
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return d

    async def _copy_file(self, vol: VolumeId, primary: str, ino: int, size: int | None) -> None:
        """Make the data file of ``ino`` the primary's (or remove it, if it has none)."""
        if size is None:
            await trio.to_thread.run_sync(self.data.remove, ino)
            return
        fd, _new = await trio.to_thread.run_sync(self.data.create, ino)
        try:
            await trio.to_thread.run_sync(DataStore.truncate, fd, size)
            off = 0
            while off < size:
                chunk = await self._call(
                    primary,
                    "repl.fetch_data",
                    {"vol": int(vol), "ino": ino, "off": off, "size": min(CHUNK, size - off)},
                    self.timeout,
                )
                if not isinstance(chunk, bytes) or not chunk:
                    break  # cut on the primary meanwhile: later records say so
                await trio.to_thread.run_sync(DataStore.pwrite, fd, off, chunk)
                off += len(chunk)
        finally:
            self.data.close(fd)

    def _install(
        self,
        vol: VolumeId,
        to: int,
        have: int,
        keys: list[tuple[int, bytes]],
        values: list[Any],
        files: list[int],
    ) -> None:
        dbs = [self.meta.dbs[name] for name in S.DB_NAMES]
        with self.meta.write(record=False) as wtxn:
            txn = wtxn.raw
            for (idx, key), value in zip(keys, values, strict=True):
                if value is None:
                    txn.delete(key, db=dbs[idx])
                else:
                    txn.put(key, value, db=dbs[idx])
            for seq in range(to + 1, have + 1):
                txn.delete(S.journal_key(vol, seq), db=self.meta.journal)
            for ino in files:  # their blocks may be newer than their digests: settled later
                txn.put(S.dirty_key(ino), b"", db=self.meta.dirty)
            txn.put(S.seq_key(vol), S.u64(to), db=self.meta.meta)
        self.meta.reset_seq(vol, to)
        self.meta.sync()
