"""dfs/backoff.py: doubling to a cap, jitter within its fraction, reset after success."""

from __future__ import annotations

import random

import pytest

from dfs.backoff import Backoff


def test_without_jitter_it_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(0.1, 2.0, jitter=0)
    assert [b.failed() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    b.reset()
    assert b.failed() == pytest.approx(0.1)


def test_jitter_takes_off_at_most_its_fraction_and_spreads_the_delays() -> None:
    b = Backoff(1.0, 1.0, jitter=0.5, rng=random.Random(7))
    delays = [b.failed() for _ in range(1000)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert min(delays) < 0.55 and max(delays) > 0.95  # the whole range is used
    assert len(set(delays)) > 900


def test_many_failures_do_not_overflow() -> None:
    b = Backoff(0.1, 2.0, jitter=0)
    for _ in range(5000):
        b.failed()
    assert b.failed() == 2.0


@pytest.mark.parametrize(("base", "cap", "jitter"), [(0, 1, 0.5), (2, 1, 0.5), (1, 1, 1.5)])
def test_nonsense_is_refused(base: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap, jitter)
