"""Exponential backoff with jitter, for every loop that retries a peer.

The n-th consecutive failure waits ``min(base * 2**(n-1), cap)``, less a random
part of up to ``jitter`` of it (the "equal jitter" of the AWS architecture
note on backoff): with the default 0.5, between half the delay and all of it.
Without jitter, nodes that lost a peer at the same moment would all retry it
in lockstep, at the same instants, for as long as it is down; with it, their
attempts spread out while the doubling still bounds how often each one tries.

It computes delays only; callers wait on trio's clock, so tests run on
``MockClock`` and pass ``jitter=0`` (or their own ``random.Random``) to make
delays exact. A library such as tenacity wraps a function in a retry loop;
dfs's peers instead gate calls until a retry time, so a few lines fit better.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

DEFAULT_JITTER = 0.5


@dataclass(slots=True)
class Backoff:
    """The delays after consecutive failures; ``reset`` after a success."""

    base: float
    cap: float
    jitter: float = DEFAULT_JITTER  # the fraction of each delay that may be taken off at random
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0  # consecutive, so far

    def __post_init__(self) -> None:
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter {self.jitter} is not a fraction")
        if not 0 < self.base <= self.cap:
            raise ValueError(f"need 0 < base <= cap, got base {self.base}, cap {self.cap}")

    def ceiling(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures, before jitter."""
        return min(self.base * 2.0 ** min(failures - 1, 64), self.cap)

    def failed(self) -> float:
        """Count a failure; the delay to wait before the next attempt."""
        self.failures += 1
        return self.ceiling(self.failures) * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.failures = 0
