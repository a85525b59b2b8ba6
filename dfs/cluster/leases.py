"""A storage site's read lease on a volume (the primary's side is ``Replicator.grant``).

A site asks the primary for a lease every heartbeat (``repl.lease``), noting the time *before*
it asks; a grant lets it treat its replica as current until that time plus the granted length.
The primary notes the time of each grant, and grants no longer than it is itself sure to be
current (``Replicator.current_until``); since the site's start time precedes the grant, the
site's lease always ends before the primary's note of it does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import trio

from dfs.errors import FsError
from dfs.net.rpc import RpcError


class LeaseKeeper:
    """A site's read lease on a volume from its primary (see the module docstring).

    ``ask()`` asks the volume's current primary; its answer is True (a whole lease), a number
    (a shorter one: the primary is sure to be current only that long) or anything else (no).
    ``revoke`` ends the lease at once (this site voted in an election): an answer to a
    question asked before that is ignored."""

    def __init__(self, ask: Callable[[], Any], *, interval: float, lease: float) -> None:
        self._ask = ask
        self.interval = interval
        self.lease = lease
        self.until = -math.inf
        self._granted = trio.Event()
        self._gen = 0
        self._scope: trio.CancelScope | None = None

    def current(self) -> bool:
        return trio.current_time() < self.until

    def revoke(self) -> None:
        self.until = -math.inf
        self._gen += 1

    def stop(self) -> None:
        """This node is no longer a site following a primary (it is the primary now)."""
        self.revoke()
        if self._scope is not None:
            self._scope.cancel()

    async def wait_current(self, limit: float) -> bool:
        with trio.move_on_after(limit):
            while not self.current():
                await self._granted.wait()
        return self.current()

    async def run(self) -> None:
        with trio.CancelScope() as self._scope:
            while True:
                start = trio.current_time()
                gen = self._gen
                try:
                    granted = await self._ask()
                except (RpcError, FsError):
                    granted = False
                length: float | None = None
                if granted is True:
                    length = self.lease
                elif isinstance(granted, (int, float)) and not isinstance(granted, bool):
                    length = min(self.lease, float(granted))
                if length is not None and length > 0 and gen == self._gen:
                    self.until = start + length
                    self._granted.set()
                    self._granted = trio.Event()
                await trio.sleep(self.interval)
