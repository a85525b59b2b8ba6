"""The volumes of a cluster as one node knows them: which volume an inode is in, who orders it.

The root volume (id ``ROOT_VOLUME``, root directory ``ROOT_INODE``) comes from
the configuration and is stored by every node. Every other volume is mounted on
an empty directory of the root volume by ``dfs volume create``; its ``mounts``
record (dfs/meta/schema.py) is part of the root volume, so it reaches every
node with the root volume's replication, and a node knows of a volume as soon
as it has applied the update that created it.

``VolumeTable`` reads the records from this node's store whenever their count
changed (records are only ever added), so ``covering(dir)`` (is this directory
a mount point?) and ``get(vol)`` are never behind what this node's store shows.
Volume ids are handed out in order by the root volume's primary, which knows
every volume (a volume's primary refuses an id it already has, from a creation
that failed half-way, and the next is tried).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.types import ROOT_VOLUME, InodeId, VolumeId

MAX_VOLUME_ID = (1 << 31) - 1
MAX_FAILOVER_AFTER = 3600.0


@dataclass(frozen=True)
class Volume:
    vol: VolumeId
    path: str  # where it was mounted when created (renames of parents do not update it)
    root: InodeId  # its root directory
    primary: str
    sites: tuple[str, ...]  # storage sites, the primary included
    mount_dir: InodeId  # the root volume's directory it covers (ROOT_INODE for the root)
    mount_parent: InodeId = InodeId(0)  # that directory's parent (mount points never move)
    # Seconds without its primary before its sites elect another (None: the cluster's
    # ``[timeouts] failover_after``). Set at creation.
    failover_after: float | None = None

    def stored_on(self, node: str) -> bool:
        return node == self.primary or node in self.sites

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "vol": int(self.vol),
            "path": self.path,
            "root": int(self.root),
            "primary": self.primary,
            "sites": list(self.sites),
        }
        if self.failover_after is not None:
            d["failover_after"] = self.failover_after
        return d

    def wire(self) -> dict[str, Any]:
        """``as_dict`` plus where it is mounted (``vol.list``)."""
        return {**self.as_dict(), "dir": int(self.mount_dir), "parent": int(self.mount_parent)}


class MountRecord(msgspec.Struct, omit_defaults=True):
    """A ``mounts`` record (schema.py), and with ``dir`` a volume on the wire (``vol.list``).
    Unknown fields are kept for later versions: a record is never refused for having more."""

    vol: Annotated[int, msgspec.Meta(ge=1, le=MAX_VOLUME_ID)]
    root: Annotated[int, msgspec.Meta(ge=0)]
    path: str
    primary: str
    sites: list[str]
    parent: Annotated[int, msgspec.Meta(ge=0)] = 0
    dir: int | None = None
    failover_after: Annotated[float, msgspec.Meta(gt=0, le=MAX_FAILOVER_AFTER)] | None = None


def from_wire(d: Any) -> Volume:
    """A ``Volume.wire()`` map from another node; ValueError if malformed."""
    try:
        r = msgspec.convert(d, MountRecord, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed volume: {exc}") from None
    if r.dir is None:
        raise ValueError("malformed volume: no mount directory")
    return _volume(r.dir, r)


def encode_mount(v: Volume) -> bytes:
    """The ``mounts`` record of ``v`` (schema.py)."""
    return _encoder.encode(
        MountRecord(
            int(v.vol),
            int(v.root),
            v.path,
            v.primary,
            list(v.sites),
            int(v.mount_parent),
            failover_after=v.failover_after,
        )
    )


def decode_mount(mount_dir: int, raw: bytes) -> Volume:
    """A ``mounts`` record; ValueError if it is malformed."""
    try:
        r = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"mount record of {mount_dir:#x}: {exc}") from None
    return _volume(mount_dir, r)


def _volume(mount_dir: int, r: MountRecord) -> Volume:
    return Volume(
        VolumeId(r.vol),
        r.path,
        InodeId(r.root),
        r.primary,
        tuple(r.sites),
        InodeId(mount_dir),
        InodeId(r.parent),
        r.failover_after,
    )


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(MountRecord)


class VolumeTable:
    """See the module docstring."""

    def __init__(self, meta: MetaStore, root: Volume, *, local: bool = True) -> None:
        self.meta = meta
        self.root = root
        # local: this node stores the root volume and reads the records from its store;
        # else the table is what ``load`` was last given (from a node that stores it).
        self.local = local
        self._vols: dict[VolumeId, Volume] = {ROOT_VOLUME: root}
        self._covered: dict[InodeId, Volume] = {}
        self._records = 0  # mount records read so far (they are never changed or removed)
        self.refresh()

    def load(self, volumes: list[Volume]) -> list[Volume]:
        """Replace the table by ``volumes`` (not the root); returns those not known before."""
        new = [v for v in volumes if v.vol not in self._vols]
        self._vols = {ROOT_VOLUME: self.root, **{v.vol: v for v in volumes}}
        self._covered = {v.mount_dir: v for v in volumes}
        return new

    def add(self, v: Volume) -> bool:
        """A volume this node was told of (a table not ``local``); True if it is new."""
        if self.local or v.vol == ROOT_VOLUME:
            return False
        new = v.vol not in self._vols
        self._vols[v.vol] = v
        self._covered[v.mount_dir] = v
        return new

    def refresh(self) -> list[Volume]:
        """Read the mount records if there are new ones; returns the volumes not known before.

        Mount records are only ever added, so their count says whether any is new: the
        check is one lmdb stat, cheap enough for every lookup that may cross a mount."""
        if not self.local:
            return []
        new: list[Volume] = []
        with self.meta.read() as txn:
            count = txn.stat(self.meta.mounts)["entries"]
            if count == self._records:
                return new
            self._records = count
            for key, raw in txn.cursor(db=self.meta.mounts):
                try:
                    v = decode_mount(S.read_u64(key), raw)
                except ValueError:
                    continue  # fsck reports it
                if v.vol not in self._vols:
                    new.append(v)
                self._vols[v.vol] = v
                self._covered[v.mount_dir] = v
        return new

    def get(self, vol: VolumeId) -> Volume | None:
        v = self._vols.get(vol)
        if v is None:
            self.refresh()
            v = self._vols.get(vol)
        return v

    def all(self) -> list[Volume]:
        self.refresh()
        return sorted(self._vols.values(), key=lambda v: (v.path, v.vol))

    def covering(self, ino: InodeId) -> Volume | None:
        """The volume mounted on directory ``ino`` of the root volume, if any."""
        self.refresh()
        return self._covered.get(ino)

    def new_id(self, after: int = 0) -> VolumeId:
        """The next volume id after every known one (and after ``after``)."""
        self.refresh()
        vol = max([after, *self._vols, *self.meta.stored_volumes()]) + 1
        if vol > MAX_VOLUME_ID:
            raise ValueError("volume ids exhausted")
        return VolumeId(vol)
