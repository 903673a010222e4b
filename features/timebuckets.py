"""Log-scale time buckets (docs/design.md §4), defined once and used for both the time since the
previous item of a stream (`dt_bucket`) and the time from an item to `as_of` (`recency`).

Bucket ids: 0 = padding, 1 = no previous item, 2 = under one second (identical timestamps
included), then one bucket per interval [EDGES[i], EDGES[i+1]) on a log scale from one second
to 180 days, and a last bucket for anything longer.
"""

from __future__ import annotations

import numpy as np

PAD = 0
NO_PREVIOUS = 1
FIRST = 2

_DAY = 86_400.0
# 1 s .. 180 days, ~4 buckets per factor of 10 (seconds, minutes, hours, days, months).
DT_EDGES_S: np.ndarray = np.unique(np.round(np.geomspace(1.0, 180 * _DAY, 30)))
N_DT_BUCKETS: int = FIRST + len(DT_EDGES_S) + 1  # pad, none, <1s, intervals, >= last edge


def bucketize(seconds: np.ndarray) -> np.ndarray:
    """Seconds (>= 0, float or int) -> bucket ids in [FIRST, N_DT_BUCKETS). Vectorised."""
    seconds = np.asarray(seconds, dtype=np.float64)
    return (FIRST + np.searchsorted(DT_EDGES_S, seconds, side="right")).astype(np.int16)


def dt_buckets(ts: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Bucket of the time since the previous item of the same group (user).

    ts: (N,) int64 epoch seconds sorted within groups; group_start: (N,) bool, True on the
    first item of each group (which gets NO_PREVIOUS)."""
    ts = np.asarray(ts, dtype=np.int64)
    dt = np.diff(ts, prepend=ts[:1])
    out = bucketize(np.maximum(dt, 0))
    out[np.asarray(group_start, dtype=bool)] = NO_PREVIOUS
    return out


def describe() -> list[str]:
    """Human-readable interval per bucket id (for docs and attention-map plots)."""
    names = ["pad", "none", "<1s"]
    for lo, hi in zip(DT_EDGES_S[:-1], DT_EDGES_S[1:]):
        names.append(f"{_fmt(lo)}-{_fmt(hi)}")
    names.append(f">={_fmt(DT_EDGES_S[-1])}")
    return names


def _fmt(s: float) -> str:
    for unit, size in (("d", _DAY), ("h", 3600.0), ("m", 60.0)):
        if s >= size:
            return f"{s / size:.3g}{unit}"
    return f"{s:.3g}s"


# The day a message mentions (features/text_dates.py), counted from the example's cutoff:
# 0 = padding, 1 = no mention, then one id per day from MENTION_FROM to MENTION_TO days after
# the cutoff, earlier and later days clipped to the ends (a week past, three weeks ahead).
NO_MENTION = 1
MENTION_FROM, MENTION_TO = -7, 21
N_MENTION_BUCKETS: int = FIRST + MENTION_TO - MENTION_FROM + 1


def mention_buckets(days_after_cutoff: np.ndarray) -> np.ndarray:
    """Days (float, NaN = no mention) -> ids in [NO_MENTION, N_MENTION_BUCKETS). Vectorised."""
    d = np.asarray(days_after_cutoff, dtype=np.float64)
    day = np.clip(np.floor(np.nan_to_num(d, nan=0.0)), MENTION_FROM, MENTION_TO)
    return np.where(np.isnan(d), NO_MENTION, FIRST + day - MENTION_FROM).astype(np.int16)
