"""The naive versions `benchmarks.run` measures beside the real code: what a first,
straightforward implementation looks like. Each produces the same arrays or items as the
code it stands in for; the benchmark asserts that on a small slice before timing.

- `per_user_arrays`: the feature build's per-user work as a Python loop, row by row (dt
  buckets, message numbers, ids, values, stream offsets, per-cutoff stream ends and
  labels), in place of `features.build.build_features`' whole-table numpy.
- `PerItemReads`: a dataset that opens the HDF5 file and reads every field of an item with
  h5py on each `__getitem__`, in place of `FeatureDataset`'s arrays read once.
"""

from __future__ import annotations

import bisect
import math
from itertools import groupby
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from features import contract as C
from features import labels as L
from features import timebuckets as tb
from features.dataset import FeatureDataset, load_examples, user_numbers
from features.store import STREAMS, UNLABELLED
from features.vocab import FIRST, KINDS, UNKNOWN, Vocab, content_buckets, pseudonyms
from models.config import ModelConfig
from pipeline.config import Config

_EDGES = tb.DT_EDGES_S.tolist()


def _bucket(dt: int) -> int:
    """`timebuckets.dt_buckets` for one gap."""
    return tb.FIRST + bisect.bisect_right(_EDGES, max(dt, 0))


def per_user_arrays(events: pa.Table, users: pd.DataFrame | None, cfg: Config, vocab: Vocab) -> dict:
    """Every array `build_features(embed=None)` writes except message vectors, one Python step
    per event: the same group/field names, the same values.

    events: validated events sorted by (user_id, ts), as `features_stage` reads them. The
    global facts (vocabularies, cutoff calendar) come from the same code as the real build."""
    fc, lc = cfg.features, cfg.labels
    if cfg.data.until or cfg.data.labels or fc.shard is not None:
        raise ValueError("the naive build covers derived labels of a whole, unsharded log only")
    ts_us = pc.cast(events[C.TS], pa.int64()).to_pylist()
    first_ts = min(ts_us) // 1_000_000
    data_end = (max(ts_us) // 1_000_000 // L.DAY + 1) * L.DAY
    vocab.extend(events, cfg.data.foods)
    calendar = L.cutoff_calendar(first_ts, data_end, lc).tolist()
    type_id, meal_id, food_id = ({t: i + FIRST for i, t in enumerate(vocab.tokens[k])} for k in KINDS)
    user_id, etype, sender, value, content, meal, foods = (events[c].to_pylist() for c in (
        C.USER_ID, C.EVENT_TYPE, C.SENDER, C.VALUE, C.CONTENT_ID, C.MEAL, C.FOOD_IDS))
    starts = {}
    if users is not None and C.PROGRAM_START in users:
        for u, t in zip(users[C.USER_ID], users[C.PROGRAM_START]):
            if pd.notna(t):
                starts[u] = pd.Timestamp(t).value // 1_000_000_000
    activity = {t.lower() for t in lc.activity_types} if lc.activity_types else None
    buckets: dict = {}  # content id -> hashed bucket, each distinct id hashed once

    fields = {"events": ("ts", "type_id", "dt_bucket", "day", "value", "value_delta", "has_value", "content"),
              "food": ("ts", "dt_bucket", "meal", "food_ids"), "conversation": ("ts", "sender", "msg_no", "dt_bucket")}
    out = {s: {"user_offsets": [0], **{k: [] for k in f}} for s, f in fields.items()}
    out["food"]["meal_offsets"] = [0]
    ex: dict[str, list] = {k: [] for k in ("user_row", "as_of", "label")}
    ex |= {f"{s}_{e}": [] for s in STREAMS for e in ("start", "end")}
    user_ids, program_starts = [], []
    horizon, lookback = lc.horizon_days * L.DAY, (lc.lookback_days or 0) * L.DAY
    for row, (uid, rows) in enumerate(groupby(range(len(user_id)), key=user_id.__getitem__)):
        rows = list(rows)
        start = starts.get(uid, ts_us[rows[0]] // 1_000_000)  # else the user's first event
        ts_of = {s: [] for s in STREAMS}  # this user's item times per stream
        own: list[int] = []  # times of the user's own activity (never coach messages)
        last_value: dict = {}  # event type -> the user's previous value of that type
        for i in rows:
            t = ts_us[i] // 1_000_000
            kind = {C.FOOD_LOG: "food", C.MESSAGE: "conversation"}.get(etype[i])
            for s in ("events", kind) if kind else ("events",):
                out[s]["dt_bucket"].append(tb.NO_PREVIOUS if not ts_of[s] else _bucket(t - ts_of[s][-1]))
                out[s]["ts"].append(t)
                ts_of[s].append(t)
            e = out["events"]
            tid = type_id.get(etype[i], UNKNOWN)
            v = value[i] if value[i] is not None and math.isfinite(value[i]) else None
            e["type_id"].append(tid)
            e["day"].append(min(max((t - start) // L.DAY, 0), fc.max_day))
            e["value"].append(0.0 if v is None else v)
            e["has_value"].append(v is not None)
            e["value_delta"].append(v - last_value[tid] if v is not None and tid in last_value else 0.0)
            if v is not None:
                last_value[tid] = v
            if content[i] is None:
                e["content"].append(UNKNOWN)
            else:
                if content[i] not in buckets:
                    buckets[content[i]] = int(content_buckets(np.array([content[i]], dtype=object), fc.content_buckets)[0])
                e["content"].append(buckets[content[i]])
            if kind == "food":
                f = out["food"]
                f["meal"].append(meal_id.get(meal[i], UNKNOWN))
                f["food_ids"] += [food_id.get(x, UNKNOWN) for x in foods[i] or []]
                f["meal_offsets"].append(len(f["food_ids"]))
            elif kind == "conversation":
                c = out["conversation"]
                c["sender"].append(1 if sender[i] == C.SENDER_USER else 2)
                c["msg_no"].append(min(len(ts_of["conversation"]), fc.max_msg_no))
            if not (etype[i] == C.MESSAGE and sender[i] == C.SENDER_COACH) and (activity is None or etype[i] in activity):
                own.append(t)
        base = {s: out[s]["user_offsets"][-1] for s in STREAMS}
        for as_of in calendar:
            if start > as_of or bisect.bisect_left(ts_of["events"], as_of) == 0:
                continue  # not eligible: program not started or no event before as_of
            lo, hi = bisect.bisect_left(own, as_of), bisect.bisect_left(own, as_of + horizon)
            active_days = {(t - as_of) // L.DAY for t in own[lo:hi]}
            ex["user_row"].append(row)
            ex["as_of"].append(as_of)
            ex["label"].append(UNLABELLED if as_of + horizon > data_end else int(len(active_days) >= lc.min_active_days))
            for s in STREAMS:
                first = bisect.bisect_left(ts_of[s], as_of - lookback) if lookback else 0
                ex[f"{s}_start"].append(base[s] + first)
                ex[f"{s}_end"].append(base[s] + bisect.bisect_left(ts_of[s], as_of))
        for s in STREAMS:
            out[s]["user_offsets"].append(base[s] + len(ts_of[s]))
        user_ids.append(uid)
        program_starts.append(start)
    arrays = {s: {k: np.asarray(v) for k, v in d.items()} for s, d in out.items()}
    e = {k: np.asarray(v) for k, v in ex.items()}
    user_split = L.user_splits(user_ids, lc)  # per user, the same hash as the real build
    labelled = e["as_of"][e["label"] != UNLABELLED]  # the dates that carry labels
    e["split"] = L.assign_splits(user_split, e["user_row"], e["as_of"], e["label"], lc.oot_cutoffs, labelled)
    arrays["examples"] = e
    arrays["users"] = {"key": pseudonyms(np.asarray(user_ids, dtype=object), fc.pseudonym_key),
                       "program_start": np.asarray(program_starts)}
    return arrays


class PerItemReads(FeatureDataset):
    """`FeatureDataset`'s item logic with every field read from HDF5 per item: the file is
    opened in `__getitem__`, each example field is a scalar read and each stream field a
    slice read (the foods of a window's meals are one more slice)."""

    batch = None  # batches come from `collate` of items (loop.loader), each item read on its own

    def __init__(self, path: str | Path, model: ModelConfig, indices: np.ndarray):
        self.files = [Path(path)]
        self.model = model
        self.indices = np.asarray(indices)
        self.aggregates = None  # the hybrid's inputs are not part of this comparison
        self.future = None  # nor the training-only targets of the auxiliary head
        self.attributes = None  # nor user attributes (the simulator has none)
        with h5py.File(self.files[0], "r") as f:
            self.file_of = np.zeros(len(f["examples"]["as_of"]), dtype=np.int64)
        # a number per example's user, as the dataset derives it once per process (not an item read)
        self.user_number = user_numbers(load_examples(self.files)[1])

    def __getitem__(self, i: int) -> dict:
        with h5py.File(self.files[0], "r") as f:
            self.examples, self._arrays = f["examples"], [f]  # h5py groups: every access reads
            try:
                return super().__getitem__(i)
            finally:
                self.examples, self._arrays = None, None
