"""Updates this node sends to a volume's primary (``fs.op``), and waiting to see them here.

``Forwarder.call`` sends one operation to the primary that ``VolumeRoles`` names and returns
its result. The primary answers once every storage site in sync applied the update — except
this node, when it is a site in sync itself — and its answer carries the volume's sequence
after the update. When this node stores the volume and its replica has not applied that
sequence yet, the volume is *behind* here (``behind``): its reads go to the primary, and never
to this replica, not even when the primary stops answering, until the replica has caught up —
so this node never answers with state older than an update it has acknowledged. A site that
holds a read lease (it is in sync: the record is on its way) first waits, within the call's
deadline, for its replica to apply it (``applied_here``), so that its reads stay local; a site
out of sync does not wait (it may be far behind; the primary catches it up).

An update that the primary refused with EROFS because it stepped down meanwhile (this node
learnt of its successor before the answer: ``vol.epoch`` is announced to every node before
the old primary answers) is sent to the new primary once.

A primary that cannot be reached refuses updates with EROFS (logged at most every
``REFUSAL_LOG_EVERY`` seconds); the call's deadline (``dfs.cluster.deadline``) passing first is
ETIMEDOUT (the primary may or may not have carried the update out).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dfs.cluster import fsops
from dfs.cluster.deadline import until
from dfs.cluster.roles import VolumeRoles
from dfs.errors import FsError
from dfs.fs.ctx import Ctx
from dfs.meta.store import MetaStore
from dfs.net.rpc import PeerTimeout, PeerUnavailable, RemoteError
from dfs.types import VolumeId

log = logging.getLogger("dfs.cluster.fs")

Send = Callable[[str, str, list[Any], list[Any]], Awaitable[Any]]
"""``await send(node, op, args, ctx)``: run an operation on ``node`` (a volume's primary);
its answer ``[result, seq]``."""

REFUSAL_LOG_EVERY = 10.0
_NO_ANSWER = object()


class Forwarder:
    def __init__(
        self, roles: VolumeRoles, meta: MetaStore, send: Send | None, *, call_timeout: float
    ) -> None:
        """``call_timeout``: the longest a call waits for the primary's answer, and then for
        this node's replica (both within the deadline of the client call being served)."""
        self.roles = roles
        self.meta = meta
        self._send = send
        self.call_timeout = call_timeout
        self._applied = trio.Event()
        self._behind: dict[VolumeId, int] = {}
        self._last_refusal = -1e9

    async def call(
        self, vol: VolumeId, args: fsops._Args, ctx: Ctx | None = None, *, update: bool = True
    ) -> Any:
        """Run ``args`` on ``vol``'s primary; ``update=False`` for reads and handle operations
        that change nothing (then an unreachable primary is PeerUnavailable, not EROFS)."""
        op = fsops.name_of(args)
        if self._send is None:
            raise FsError(errno.EROFS, f"no primary for volume {vol} is known here")
        answer: Any = _NO_ANSWER
        for again in (False, True):
            primary = self.roles.primary(vol)
            try:
                with trio.move_on_at(until(self.call_timeout)):
                    answer = await self._send(primary, op, fsops.wire(args), fsops.pack_ctx(ctx))
                if answer is _NO_ANSWER:
                    raise PeerTimeout(
                        f"node {primary}: {op} got no answer within the call's deadline"
                    )
                break
            except PeerUnavailable as exc:
                if not update:
                    raise
                self.refused(op, exc)
                raise FsError(errno.EROFS, f"primary unreachable: {exc}") from None
            except PeerTimeout as exc:
                self.refused(op, exc)
                raise
            except RemoteError as exc:
                # It stepped down meanwhile (a hand-over, or it learnt of a newer epoch): an
                # update it refused with EROFS was not made; the new primary is asked once.
                if again or exc.errno != errno.EROFS or self.roles.primary(vol) == primary:
                    raise
        if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[1], int)):
            raise FsError(errno.EIO, f"malformed {op} answer from the primary")
        result, seq = answer
        if seq and self.roles.stores(vol) and self.meta.seq(vol) < seq:
            self._behind[vol] = max(self._behind.get(vol, 0), seq)
            if self.roles.current(vol):
                await self.applied_here(vol, seq)
        return result

    async def applied_here(self, vol: VolumeId, seq: int) -> bool:
        """Wait, within the call's deadline, until this node's replica applied update ``seq``
        of ``vol``; whether it has (see the module docstring)."""
        meta = self.meta
        with trio.move_on_at(until(self.call_timeout)):
            while meta.seq(vol) < seq:
                await self._applied.wait()
        return meta.seq(vol) >= seq

    def applied(self) -> None:
        """This node's replica applied records (``ReplicaApplier`` calls this)."""
        self._applied.set()
        self._applied = trio.Event()

    def behind(self, vol: VolumeId) -> bool:
        """An update this node made through ``vol``'s primary (or a later one) is not applied
        here yet: reads of ``vol`` must not be answered from this replica."""
        seq = self._behind.get(vol)
        if seq is None:
            return False
        if self.meta.seq(vol) < seq:
            return True
        del self._behind[vol]
        return False

    def refused(self, op: str, exc: Exception) -> None:
        now = trio.current_time()
        if now - self._last_refusal >= REFUSAL_LOG_EVERY:
            self._last_refusal = now
            log.warning("%s refused: the volume's primary is unreachable (%s)", op, exc)
