"""Examples and labels (docs/design.md §3), vectorised.

An example is a (user, as_of) pair. Its inputs are the user's items strictly before as_of;
its derived label looks only at [as_of, as_of + horizon): engaged (1) when the user has
their own activity on at least `min_active_days` distinct days of that window.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import UserError
from features import contract as C
from features.config import LabelConfig
from features.normalise import clean_strings, parse_timestamps, to_utc
from features.store import SPLITS, UNLABELLED

DAY = 86_400
_KEY_SHIFT = 2**34  # > any epoch second before year 2514: user_row * shift + ts is sortable


def row_keys(user_row: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """One sortable int64 per item: items sorted by (user, ts) have increasing keys."""
    return user_row.astype(np.int64) * _KEY_SHIFT + ts.astype(np.int64)


def first_at_or_after(keys: np.ndarray, user_row: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Absolute index of the first item of `user_row` with ts >= t (items before it are
    strictly earlier than t). Vectorised over examples."""
    return np.searchsorted(keys, row_keys(user_row, t), side="left")


def window_items(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every item of the windows [lo, lo + counts), window after window (int64): the flat index of
    each (window, item) pair, as `np.repeat(np.arange(len(lo)), counts)` numbers their windows."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)


def unit_hash(values, salt: str) -> np.ndarray:
    """Deterministic hash of each string into [0, 1): same id, same salt, same number on
    every machine and every build."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        d = hashlib.blake2b(f"{salt}\x00{v}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2**64
    return out


def check_labels(lc: LabelConfig) -> None:
    """A one-line error for label settings that would build an empty or meaningless store
    (no test users, no examples, every example engaged) rather than let the build finish."""
    if not (0 < lc.train_frac < 1 and 0 < lc.val_frac and lc.train_frac + lc.val_frac < 1):
        raise UserError(f"labels.train_frac={lc.train_frac}, labels.val_frac={lc.val_frac}: the test split gets what "
                        "the two leave, and training needs validation, so 0 < train_frac, 0 < val_frac and "
                        "train_frac + val_frac < 1 (default 0.7 and 0.15)")
    for key in ("horizon_days", "cutoff_every_days", "min_active_days"):
        if getattr(lc, key) < 1:
            raise UserError(f"labels.{key}={getattr(lc, key)}: at least 1")
    if lc.min_active_days > lc.horizon_days:
        raise UserError(f"labels.min_active_days={lc.min_active_days} > labels.horizon_days={lc.horizon_days}: "
                        "no user could ever be engaged")
    if lc.max_inactive_days is not None and lc.max_inactive_days < 1:
        raise UserError(f"labels.max_inactive_days={lc.max_inactive_days}: at least 1 day, or null to keep every user")
    if lc.oot_cutoffs < 0:
        raise UserError(f"labels.oot_cutoffs={lc.oot_cutoffs}: 0 or more")
    for key in ("first_cutoff", "last_cutoff"):
        if getattr(lc, key):
            to_utc(getattr(lc, key), f"labels.{key}")


def user_splits(user_ids, cfg: LabelConfig) -> np.ndarray:
    """0 train / 1 val / 2 test, by hashed user id: a user's examples never straddle splits."""
    u = unit_hash(user_ids, cfg.split_salt)
    return np.where(u < cfg.train_frac, 0, np.where(u < cfg.train_frac + cfg.val_frac, 1, 2)).astype(np.int8)


def cutoff_calendar(first_ts: int, data_end: int, cfg: LabelConfig) -> np.ndarray:
    """Weekly (by default) as_of instants, 00:00 UTC on `cutoff_weekday`.

    Only cutoffs whose whole horizon lies before `data_end` get labels; with
    `include_unlabelled` the calendar runs on to data_end (for scoring)."""
    if cfg.first_cutoff:
        start = to_utc(cfg.first_cutoff)
    else:
        day0 = pd.Timestamp(first_ts + cfg.min_history_days * DAY, unit="s", tz="UTC").normalize()
        start = day0 + pd.Timedelta(days=(cfg.cutoff_weekday - day0.weekday()) % 7 or 7)
    step = cfg.cutoff_every_days * DAY
    last = data_end if cfg.include_unlabelled else data_end - cfg.horizon_days * DAY
    if cfg.last_cutoff:
        last = min(last, int(to_utc(cfg.last_cutoff).timestamp()))
    first = int(start.timestamp())
    return np.arange(first, last + 1, step, dtype=np.int64) if last >= first else np.zeros(0, np.int64)


def derived_labels(
    act_keys: np.ndarray, act_ts: np.ndarray, ex_user: np.ndarray, ex_as_of: np.ndarray, cfg: LabelConfig
) -> np.ndarray:
    """1 if the user is active on >= min_active_days distinct days of [as_of, as_of+horizon).

    act_keys/act_ts: the user's own activity (never coach messages), sorted by row key."""
    lo = first_at_or_after(act_keys, ex_user, ex_as_of)
    hi = first_at_or_after(act_keys, ex_user, ex_as_of + cfg.horizon_days * DAY)
    counts = hi - lo
    ex = np.repeat(np.arange(len(ex_user)), counts)  # example id of every item in a window
    item = window_items(lo, counts)
    day = (act_ts[item] - ex_as_of[ex]) // DAY
    # A window's items are in time order (act_keys are sorted), so its days never decrease: a
    # distinct (example, day) pair starts wherever the example or the day changes.
    new = np.ones(len(ex), dtype=bool)
    new[1:] = (ex[1:] != ex[:-1]) | (day[1:] != day[:-1])
    active_days = np.bincount(ex[new], minlength=len(ex_user))
    return (active_days >= cfg.min_active_days).astype(np.int8)


@dataclass
class SuppliedLabels:
    user_row: np.ndarray
    as_of: np.ndarray
    label: np.ndarray
    rejected: dict[str, int]
    dates: np.ndarray  # every parseable as_of of the table (s), whatever the user: shards agree


def read_supplied_labels(df: pd.DataFrame, user_index: pd.Index, path: str) -> SuppliedLabels:
    """A labels table (user_id, as_of, label in {0,1}) -> rows for known users; every row
    dropped is counted by reason."""
    for c in (C.USER_ID, C.AS_OF, C.LABEL):
        if c not in df.columns:
            raise UserError(f"{path}: labels table lacks column {c!r}; it needs user_id, as_of, label")
    user = clean_strings(df[C.USER_ID])
    as_of, bad_ts = parse_timestamps(df[C.AS_OF])
    label = pd.to_numeric(df[C.LABEL], errors="coerce")
    row = user_index.get_indexer(user.fillna(""))
    bad_label = ~label.isin([0, 1]).to_numpy()
    unknown = row < 0
    ok = ~(bad_ts | bad_label | unknown)
    rejected = {
        "bad_as_of": int(bad_ts.sum()),
        "bad_label": int((bad_label & ~bad_ts).sum()),
        "unknown_user": int((unknown & ~bad_ts & ~bad_label).sum()),
    }
    secs = (as_of[ok].astype("int64") // 10**6).to_numpy()  # datetime64[us] -> s
    dates = (as_of.dropna().astype("int64") // 10**6).to_numpy()
    return SuppliedLabels(row[ok].astype(np.int32), secs, label[ok].to_numpy().astype(np.int8), rejected, dates)


def assign_splits(user_split: np.ndarray, ex_user: np.ndarray, ex_as_of: np.ndarray, label: np.ndarray,
                  oot_cutoffs: int, labelled_dates: np.ndarray) -> np.ndarray:
    """User split per example, except the latest `oot_cutoffs` of the labelled as_of dates
    (of the whole data, not of one shard, so every shard draws the same boundary), which
    form the out-of-time test set for every user."""
    split = user_split[ex_user].astype(np.int8)
    labelled = np.unique(labelled_dates)
    if oot_cutoffs > 0 and len(labelled) > oot_cutoffs:
        oot_from = labelled[-oot_cutoffs]
        split[(ex_as_of >= oot_from) & (label != UNLABELLED)] = SPLITS.index("oot")
    return split
