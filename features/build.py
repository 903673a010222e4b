"""`make features`: validated events -> the HDF5 feature store (docs/design.md §3-§4).

Everything but the message encoder is vectorised numpy over the whole table: no Python
loop per user or per event. Global facts (vocabularies, cutoff calendar, value statistics)
are computed before sharding so every shard of a partitioned build agrees on them.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import UserError
from common.memory import keep_freed_memory
from features import contract as C
from features import labels as L
from features import timebuckets as tb
from features.config import FeatureConfig, Sections, sections_dict
from features.normalise import to_utc
from features.store import SCHEMA_VERSION, SPLITS, UNLABELLED, StoreMeta
from features.text_dates import mentioned_days
from features.text_vectors import TextEncoder, embed_messages
from features.validate import user_attributes
from features.vocab import (
    FIRST,
    SENDER_IDS,
    Tokens,
    Vocab,
    content_buckets,
    pseudonyms,
    sender_ids,
    shard_of,
)

log = logging.getLogger(__name__)


@dataclass
class Timer:
    steps: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        yield
        self.steps[name] = round(time.perf_counter() - t, 3)


@dataclass
class Built:
    arrays: dict[str, dict[str, np.ndarray]]
    meta: StoreMeta
    summary: dict


def check_shards(fc: FeatureConfig) -> None:
    """A one-line error unless the shard settings name one shard of a real partition
    (0 <= shard < num_shards) or no sharding at all (shard unset, num_shards 1)."""
    shard, n = fc.shard, fc.num_shards
    if n is None or n < 1:
        raise UserError(f"features.num_shards={n}: the number of shards must be at least 1 (--num-shards N)")
    if shard is None:
        if n != 1:
            raise UserError(f"features.num_shards={n} without features.shard: add --shard I (features.shard=I) "
                            f"with 0 <= I < {n} to build shard I, or drop --num-shards for one unsharded build")
        return
    if n == 1 and shard != 0:
        raise UserError(f"features.shard={shard} needs features.num_shards > {shard} (it is 1): add --num-shards N "
                        "(features.num_shards=N), the number of shards in the build")
    if not 0 <= shard < n:
        raise UserError(f"features.shard={shard} is not a shard of features.num_shards={n}: "
                        f"use --shard 0..{n - 1}")


def _ts_seconds(col: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(col, pa.int64()).to_numpy() // 1_000_000  # timestamp[us] -> s (floor)


def text_steps(fc: FeatureConfig, encoder: TextEncoder, cache_root) -> tuple:
    """`build_features`' `embed` and `dates` for the messages of a build: vectors from `encoder`
    and the days they mention, both cached under `cache_root` (features/text_vectors.py,
    features/text_dates.py). The features stage and scoring both build with these."""

    def embed(texts):
        return embed_messages(texts, encoder, cache_root, fc.pseudonym_key, fc.text_batch_size, fc.text_max_tokens)

    def dates(texts, ts, read):
        return mentioned_days(texts, ts, fc.date_languages, read, cache_root, fc.pseudonym_key)

    return embed, dates


def build_features(
    events: pa.Table,
    users: pd.DataFrame | None,
    cfg: Sections,
    embed,  # callable(list[str]) -> (float16 (N, E) vectors, stats dict); None: zero vectors
    text_dim: int,
    encoder_name: str,
    vocab: Vocab,
    supplied_labels: pd.DataFrame | None = None,
    source_fingerprint: str = "",
    config: dict | None = None,
    facts: dict | None = None,
    dates=None,  # callable(texts, ts, read mask) -> (mention_first, mention_last) (features/text_dates.py); None: NaN
) -> Built:
    """Build every array of the store from normalised, (user_id, ts)-sorted events. `config`
    is the resolved config recorded in the store (default: the data, labels and features
    sections of `cfg`). `facts`: the global facts of a streaming validation's summary
    (features/stream.py) when `events` are one shard's partition only: the first and last
    event of the whole log and the vocabularies' first-seen order come from there."""
    keep_freed_memory()  # (common/memory.py)
    timer = Timer()
    fc, lc = cfg.features, cfg.labels
    check_shards(fc)
    with timer.step("prepare"):
        ts_all = _ts_seconds(events[C.TS])
        first, last = (facts["ts_min_us"] // 1_000_000, facts["ts_max_us"] // 1_000_000) if facts else (
            int(ts_all.min()), int(ts_all.max()))
        first_ts, data_end = int(first), (int(last) // L.DAY + 1) * L.DAY
        if cfg.data.until:  # the log ends at `until` by definition, even after a quiet day
            data_end = int(to_utc(cfg.data.until).timestamp())
        vocab.extend_catalog(cfg.data.foods)
        if facts:
            vocab.extend_in_order(facts["first_seen"])
        else:
            vocab.extend(events)
        calendar = L.cutoff_calendar(first_ts, data_end, lc)
        if fc.shard is not None:  # after global facts, before per-user work
            keep = shard_of(events[C.USER_ID], fc.num_shards) == fc.shard
            if not keep.all():  # a shard reading its own partition (features/stream.py) keeps every row
                events, ts_all = events.filter(pa.array(keep)), ts_all[keep]
        user_ids, user_row = _user_rows(events[C.USER_ID])
        n_users = len(user_ids)
        etype = Tokens(events[C.EVENT_TYPE])  # vectorised comparisons, no Python str per row
        program_start = _program_start(user_ids, user_row, ts_all, users)
        program_end = _program_end(user_ids, users)
        attributes, attr = _attributes(user_ids, users, vocab, fc)

    with timer.step("events"):
        ev = _events_stream(events, etype, user_row, ts_all, n_users, program_start, vocab, fc)
    with timer.step("food"):
        food = _food_stream(events, etype, user_row, ts_all, n_users, vocab)
    with timer.step("conversation"):
        conv, texts = _conversation_stream(events, etype, user_row, ts_all, n_users, fc.max_msg_no)
    with timer.step("message_vectors"):
        if embed is not None:
            conv["embedding"], text_stats = embed(texts)
        else:
            conv["embedding"], text_stats = np.zeros((len(texts), text_dim), np.float16), {}
    with timer.step("date_mentions"):
        if dates is not None:  # the user's own plans, not the coach's
            conv["mention_first"], conv["mention_last"] = dates(texts, conv["ts"], conv["sender"] == SENDER_IDS[C.SENDER_USER])
        else:
            conv["mention_first"] = conv["mention_last"] = np.full(len(texts), np.nan, np.float32)
        del texts  # text is read once, never stored
    with timer.step("examples"):
        streams = {"events": ev, "food": food, "conversation": conv}
        examples, label_stats = _examples(
            events, etype, user_ids, user_row, ts_all, (program_start, program_end), streams, calendar, data_end, lc,
            supplied_labels, cfg.data.labels,
        )
    arrays = {
        "users": {"key": pseudonyms(user_ids, fc.pseudonym_key), "program_start": program_start, **attr},
        **{name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in streams.items()},
        "examples": examples,
    }
    meta = StoreMeta(
        schema_version=SCHEMA_VERSION,
        created_at=pd.Timestamp.now(tz="UTC").isoformat(),
        source_fingerprint=source_fingerprint,
        text_encoder=encoder_name,
        text_dim=int(text_dim),
        dt_edges=tb.DT_EDGES_S.tolist(),
        vocab=vocab.as_dict(),
        config=config if config is not None else sections_dict(cfg),
        content_buckets=fc.content_buckets,
        attributes=attributes,
        shard=fc.shard,
        num_shards=fc.num_shards,
        extra={"data_end": data_end, "calendar": calendar.tolist()},
    )
    summary = _summary(arrays, timer, text_stats, label_stats)
    return Built(arrays, meta, summary)


def _user_rows(user_id: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct user ids, row of each event) for events sorted by user: change points
    instead of np.unique over Python strings (most of the build's time and memory)."""
    col = user_id.combine_chunks()
    if len(col) == 0:
        return np.zeros(0, dtype=object), np.zeros(0, np.int64)
    change = np.r_[True, pc.not_equal(col.slice(1), col.slice(0, len(col) - 1)).to_numpy(zero_copy_only=False)]
    user_row = np.cumsum(change) - 1
    return col.filter(pa.array(change)).to_numpy(zero_copy_only=False), user_row


def _users_seconds(user_ids, users: pd.DataFrame | None, column: str, default: np.ndarray) -> np.ndarray:
    """A users-table timestamp column in epoch seconds per user row, `default` (int64, one
    per user) where the table has no value; NaN is never cast to int64."""
    out = default.copy()
    if users is None or column not in users:
        return out
    known = users.dropna(subset=[column])
    secs = pd.Series(known[column].astype("int64").to_numpy() // 10**6, index=known[C.USER_ID].to_numpy())
    mapped = secs.reindex(user_ids)  # float64, NaN where unknown
    ok = mapped.notna().to_numpy()
    out[ok] = mapped.to_numpy()[ok].astype(np.int64)
    return out


def _program_start(user_ids, user_row, ts, users: pd.DataFrame | None) -> np.ndarray:
    """program_start from the users table where known, else the user's first event."""
    first = np.full(len(user_ids), np.iinfo(np.int64).max)
    np.minimum.at(first, user_row, ts)
    return _users_seconds(user_ids, users, C.PROGRAM_START, first)


def _program_end(user_ids, users: pd.DataFrame | None) -> np.ndarray:
    """program_end from the users table where known, else never (int64 max), in seconds."""
    return _users_seconds(user_ids, users, C.PROGRAM_END, np.full(len(user_ids), np.iinfo(np.int64).max))


def _attributes(user_ids, users: pd.DataFrame | None, vocab: Vocab, fc) -> tuple[dict, dict[str, np.ndarray]]:
    """User attributes per user row: (their description for StoreMeta.attributes, the arrays
    `attr_codes` (n_users, n_categorical) int32 ids, 1 = missing or unknown, and `attr_values`
    (n_users, n_numeric) float32, NaN = missing). Static columns: nothing here depends on time."""
    kinds = user_attributes(users)
    if fc.attributes is not None:
        unknown = sorted(set(fc.attributes) - set(kinds["categorical"] + kinds["numeric"]))
        if unknown:
            raise UserError(f"features.attributes names {unknown}, which the users table (data.users) does not have "
                            f"as attributes; it has {kinds['categorical'] + kinds['numeric']}")
        kinds = {k: [c for c in cols if c in fc.attributes] for k, cols in kinds.items()}
    cap = fc.attribute_max_categories
    rows = users.set_index(C.USER_ID).reindex(user_ids) if users is not None else pd.DataFrame(index=user_ids)
    vocab.extend_attributes(users, kinds["categorical"], cap)
    codes = np.ones((len(user_ids), len(kinds["categorical"])), np.int32)
    for j, col in enumerate(kinds["categorical"]):
        codes[:, j] = vocab.attribute_ids(col, rows[col], cap)
    values = np.stack([rows[c].to_numpy(np.float32, na_value=np.nan) for c in kinds["numeric"]], axis=1) \
        if kinds["numeric"] else np.zeros((len(user_ids), 0), np.float32)
    return kinds | {"n_ids": cap + FIRST}, {"attr_codes": codes, "attr_values": values}


def _offsets(item_user: np.ndarray, n_users: int) -> np.ndarray:
    return np.searchsorted(item_user, np.arange(n_users + 1)).astype(np.int64)


def _group_starts(item_user: np.ndarray) -> np.ndarray:
    return np.r_[True, item_user[1:] != item_user[:-1]] if len(item_user) else np.zeros(0, bool)


def _events_stream(events, etype, user_row, ts, n_users, program_start, vocab: Vocab, fc) -> dict:
    type_id = vocab.ids("event_types", events[C.EVENT_TYPE])
    value = pc.fill_null(events[C.VALUE], np.nan).to_numpy().astype(np.float64)
    has_value = np.isfinite(value)
    # Change vs the user's previous value of the same type: a stable sort by (user, type)
    # keeps time order inside each group.
    delta = np.zeros(len(value))
    idx = np.flatnonzero(has_value)
    order = idx[np.lexsort((type_id[idx], user_row[idx]))]
    if len(order) > 1:
        same = (user_row[order][1:] == user_row[order][:-1]) & (type_id[order][1:] == type_id[order][:-1])
        delta[order[1:][same]] = np.diff(value[order])[same]
    content = content_buckets(events[C.CONTENT_ID], fc.content_buckets)
    day = np.clip((ts - program_start[user_row]) // L.DAY, 0, fc.max_day)
    return {
        "_user": user_row, "user_offsets": _offsets(user_row, n_users), "ts": ts, "type_id": type_id,
        "dt_bucket": tb.dt_buckets(ts, _group_starts(user_row)), "day": day,
        "value": np.where(has_value, value, 0.0), "value_delta": delta, "has_value": has_value, "content": content,
    }


def _food_stream(events, etype, user_row, ts, n_users, vocab: Vocab) -> dict:
    sel = np.flatnonzero(etype == C.FOOD_LOG)
    meals = events[C.FOOD_IDS].take(pa.array(sel)).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(meals), 0).to_numpy(zero_copy_only=False)
    raw_foods = pc.list_flatten(meals).to_numpy(zero_copy_only=False)
    meal_offsets = np.zeros(len(sel) + 1, dtype=np.int64)
    np.cumsum(lengths, out=meal_offsets[1:])
    u = user_row[sel]
    meal = events[C.MEAL].take(pa.array(sel))
    return {
        "_user": u, "user_offsets": _offsets(u, n_users), "ts": ts[sel],
        "dt_bucket": tb.dt_buckets(ts[sel], _group_starts(u)), "meal": vocab.ids("meals", meal),
        "meal_offsets": meal_offsets, "food_ids": vocab.ids("foods", raw_foods),
    }


def _conversation_stream(events, etype, user_row, ts, n_users, max_msg_no) -> tuple[dict, pa.ChunkedArray]:
    sel = np.flatnonzero(etype == C.MESSAGE)
    u = user_row[sel]
    starts = _group_starts(u)
    first_of_user = np.maximum.accumulate(np.where(starts, np.arange(len(u)), 0)) if len(u) else u
    sender = events[C.SENDER].take(pa.array(sel))
    texts = events[C.TEXT].take(pa.array(sel))  # Arrow: the text steps find the distinct ones there
    return {
        "_user": u, "user_offsets": _offsets(u, n_users), "ts": ts[sel],
        "sender": sender_ids(sender),
        "msg_no": np.minimum(np.arange(len(u)) - first_of_user + 1, max_msg_no),
        "dt_bucket": tb.dt_buckets(ts[sel], starts),
    }, texts


def _examples(events, etype, user_ids, user_row, ts, program, streams, calendar, data_end, lc, supplied, labels_path):
    program_start, program_end = program
    ev_keys = L.row_keys(streams["events"]["_user"], streams["events"]["ts"])
    own = C.is_user_activity(etype, Tokens(events[C.SENDER]))
    if lc.activity_types:
        own &= etype.isin([t.lower() for t in lc.activity_types])
    own_keys = L.row_keys(user_row[own], ts[own])
    label_stats: dict = {}
    user_split = L.user_splits(user_ids, lc)
    if supplied is not None:
        s = L.read_supplied_labels(supplied, pd.Index(user_ids), labels_path)
        ex_user, ex_as_of, label = s.user_row, s.as_of, s.label
        label_stats["rejected_label_rows"] = s.rejected
        dates = s.dates  # the labelled as_of dates: the whole table's, before any shard filter
    else:
        dates = calendar[calendar + lc.horizon_days * L.DAY <= data_end]
        grid_user = np.repeat(np.arange(len(user_ids), dtype=np.int32), len(calendar))
        grid_as_of = np.tile(calendar, len(user_ids))
        if lc.train_cutoff_every_days:
            extra_user, extra_as_of = _dense_train_grid(user_split, calendar, dates, data_end, lc)
            grid_user, grid_as_of = np.concatenate([grid_user, extra_user]), np.concatenate([grid_as_of, extra_as_of])
        ex_user, ex_as_of, label = grid_user, grid_as_of, None
    # Eligible: the program has started, has not ended before the label's window does, and
    # the user has at least one event before as_of (and, with labels.max_inactive_days, own
    # activity in the days before it). Only events before as_of and static columns decide.
    before = L.first_at_or_after(ev_keys, ex_user, ex_as_of) - streams["events"]["user_offsets"][ex_user]
    eligible = (program_start[ex_user] <= ex_as_of) & (before > 0)
    eligible &= ex_as_of + lc.horizon_days * L.DAY <= program_end[ex_user]
    if lc.max_inactive_days is not None:
        eligible &= _own_items_before(own_keys, ex_user, ex_as_of, lc.max_inactive_days) > 0
    label_stats["ineligible_dropped"] = int((~eligible).sum()) if supplied is not None else 0
    ex_user, ex_as_of = ex_user[eligible], ex_as_of[eligible]
    if label is None:
        label = L.derived_labels(own_keys, ts[own], ex_user, ex_as_of, lc)
        label[ex_as_of + lc.horizon_days * L.DAY > data_end] = UNLABELLED
    else:
        label = label[eligible]
    order = np.lexsort((ex_as_of, ex_user))
    ex_user, ex_as_of, label = ex_user[order], ex_as_of[order], label[order]
    examples = {"user_row": ex_user, "as_of": ex_as_of, "label": label}
    # Users long gone inflate ROC-AUC with easy negatives: report how many examples they are.
    quiet = _own_items_before(own_keys, ex_user, ex_as_of, 28) == 0
    label_stats["inactive_28d_share"] = round(float(quiet.mean()), 4) if len(quiet) else 0.0
    examples["split"] = L.assign_splits(user_split, ex_user, ex_as_of, label, lc.oot_cutoffs, dates)
    for name, s in streams.items():
        keys = ev_keys if name == "events" else L.row_keys(s["_user"], s["ts"])
        end = L.first_at_or_after(keys, ex_user, ex_as_of)
        if lc.lookback_days:
            start = L.first_at_or_after(keys, ex_user, ex_as_of - lc.lookback_days * L.DAY)
        else:
            start = s["user_offsets"][ex_user]
        examples[f"{name}_start"], examples[f"{name}_end"] = start, end
    return examples, label_stats


def _dense_train_grid(user_split: np.ndarray, calendar: np.ndarray, dates: np.ndarray, data_end: int, lc
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(user row, as_of) of the extra training examples of `labels.train_cutoff_every_days`:
    every N days from the first cutoff, those not on the calendar, for training users only,
    whose label window ends by the out-of-time boundary (so no training label sees a day the
    out-of-time test asks about) and by the data's end, none after `labels.last_cutoff`."""
    if not len(calendar):
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    end = data_end
    if lc.oot_cutoffs > 0 and len(dates) > lc.oot_cutoffs:
        end = min(end, int(dates[-lc.oot_cutoffs]))
    dense = np.arange(calendar[0], end - lc.horizon_days * L.DAY + 1, lc.train_cutoff_every_days * L.DAY, dtype=np.int64)
    dense = dense[~np.isin(dense, calendar)]
    if lc.last_cutoff:
        dense = dense[dense <= int(to_utc(lc.last_cutoff).timestamp())]
    train = np.flatnonzero(user_split == SPLITS.index("train")).astype(np.int32)
    return np.repeat(train, len(dense)), np.tile(dense, len(train))


def _own_items_before(own_keys: np.ndarray, ex_user: np.ndarray, ex_as_of: np.ndarray, days: int) -> np.ndarray:
    """Own-activity items of each example's user in [as_of - days, as_of)."""
    return L.first_at_or_after(own_keys, ex_user, ex_as_of) - L.first_at_or_after(own_keys, ex_user, ex_as_of - days * L.DAY)


def _summary(arrays, timer: Timer, text_stats: dict, label_stats: dict) -> dict:
    ex = arrays["examples"]
    per_split = {}
    for code, name in enumerate(SPLITS):
        m = ex["split"] == code
        lab = ex["label"][m]
        lab = lab[lab != UNLABELLED]
        per_split[name] = {
            "examples": int(m.sum()),
            "users": int(len(np.unique(ex["user_row"][m]))),
            "label_rate": round(float(lab.mean()), 4) if len(lab) else None,
        }
    return {
        "users": int(len(arrays["users"]["key"])),
        "examples": int(len(ex["as_of"])),
        "unlabelled_examples": int((ex["label"] == UNLABELLED).sum()),
        "splits": per_split,
        "items": {
            "events": int(len(arrays["events"]["ts"])),
            "conversation": int(len(arrays["conversation"]["ts"])),
            "food_meals": int(len(arrays["food"]["ts"])),
            "food_items": int(len(arrays["food"]["food_ids"])),
        },
        "message_vectors": text_stats,
        "labels": label_stats,
        "seconds": timer.steps,
    }
