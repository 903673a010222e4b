"""Ground truth: the simulator's own probability that a user is engaged next week.

At a cutoff each user's full hidden state is replicated K times and the *same* `day_step`
as the main simulation runs the replicas through the label horizon, so everything random
that moves activity (motivation noise, illness, new trips, habit feedback, coach nudges
triggered by sampled silence, churn) is integrated out. The share of replicas meeting the
label rule is `p_engaged`: calibrated by construction, and the ceiling for any model.
"""

from __future__ import annotations

import numpy as np

from features.contract import DEFAULT_HORIZON_DAYS as HORIZON_DAYS
from features.contract import DEFAULT_MIN_ACTIVE_DAYS as MIN_ACTIVE_DAYS
from pipeline.simulator.dynamics import State, Traits, day_step

# The truth is of the contract's default label (docs/design.md §3), not retyped here.
# Replicas are stepped in chunks of rows to bound memory at large users x K.
MAX_ROWS = 1 << 20


def p_engaged(
    tr: Traits, st: State, day: int, weekday0: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """P(active on >= MIN_ACTIVE_DAYS of days [day, day + HORIZON_DAYS)) per row of `st`,
    estimated from `k` replicas. `st` is the state at the start of `day`; it is not changed.
    `weekday0` is the weekday of day 0 (0 = Monday)."""
    n = len(st)
    out = np.empty(n)
    per_chunk = max(1, MAX_ROWS // k)
    for lo in range(0, n, per_chunk):
        rows = np.arange(lo, min(n, lo + per_chunk))
        idx = np.repeat(rows, k)  # (rows * k,): replica j of row i sits at i * k + j
        tr_k, st_k = tr.take(idx), st.take(idx)  # take copies: `st` stays untouched
        active_days = np.zeros(len(idx), dtype=np.int64)
        for j in range(HORIZON_DAYS):
            d = day + j
            active_days += day_step(tr_k, st_k, d, (weekday0 + d) % 7, rng).active
        out[rows] = (active_days >= MIN_ACTIVE_DAYS).reshape(len(rows), k).mean(axis=1)
    return out
