"""What follows each update committed on this node: replication, and the kernel's caches.

``CommitHook`` is the one subscriber of the store's commits (``MetaStore.subscribe``). For an
update of a volume this node orders it hands the transaction to that volume's ``Replicator``
(which streams the record to the sites in sync). For an update this node carried out for
another node (``ORIGIN`` is set: a forwarded ``fs.op``), this node's own kernel may cache what
it changed: it queues the invalidations and remembers their ticket, so that the answer waits
for them (``ticket`` for the running request, ``last_ticket`` for everything queued so far).
"""

from __future__ import annotations

import contextvars

from dfs.cluster.replication import Notifier, invalidations
from dfs.cluster.roles import VolumeRoles
from dfs.meta.store import ORIGIN, WriteTxn
from dfs.types import ROOT_INODE, InodeId

# The last invalidation ticket of the forwarded update this task runs (see OpServer).
_TICKET: contextvars.ContextVar[int] = contextvars.ContextVar("dfs_inval_ticket", default=0)


class CommitHook:
    def __init__(
        self, roles: VolumeRoles, lookups: dict[InodeId, int], notify: Notifier | None
    ) -> None:
        self.roles = roles
        self.lookups = lookups  # what this node's kernel holds; nothing else is cached
        self.notify = notify
        self.last_ticket = 0  # the newest invalidation batch queued for another node's update

    def __call__(self, txn: WriteTxn) -> None:
        repl = self.roles.replicator(txn.vol) if txn.vol is not None else None
        if repl is not None:
            repl.committed(txn)
        if self.notify is not None and ORIGIN.get():
            ws = [(i, k, v) for (i, k), v in txn.ws.items()]
            lookups = self.lookups
            changed = [
                c for c in invalidations(ws, txn.data) if c[1] == ROOT_INODE or c[1] in lookups
            ]
            if changed:
                ticket = self.notify.put(changed)
                _TICKET.set(ticket)
                self.last_ticket = max(self.last_ticket, ticket)

    @staticmethod
    def start_request() -> None:
        """A forwarded update starts in this task: no invalidation queued for it yet."""
        _TICKET.set(0)

    @staticmethod
    def ticket() -> int:
        """The invalidations the update running in this task queued (0: none)."""
        return _TICKET.get()
