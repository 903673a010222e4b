"""Vocabularies and hashed ids.

Ids: 0 = padding, 1 = unknown, 2.. = tokens in vocabulary order. Vocabularies are
append-only and persisted next to the feature file, so a token keeps its id across
rebuilds and a model trained on last week's build reads this week's correctly; a token a
model has never seen maps to 1 (unknown).

User attributes (categorical columns of the users table) have one vocabulary per column,
append-only in sorted order of first sight, of at most `max_categories` values (later values
read as unknown); a column with more distinct values than that at its first build is hashed
into `max_categories` buckets from then on (stored as null). Either way its ids are < 2 +
max_categories, so a model's embedding table never needs to grow.

Senders are the exception: a closed vocabulary fixed by the contract (validation admits no
other sender), so they need no unknown id: 0 = padding, 1.. = `contract.SENDERS` in order
(1 user, 2 coach)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.files import write_text_atomic
from features import contract as C
from features.io import read_table

PAD, UNKNOWN, FIRST = 0, 1, 2
KINDS = ("event_types", "meals", "foods")
FIRST_SENDER = 1  # sender ids: 0 padding, then contract.SENDERS in order
SENDER_IDS = {s: i + FIRST_SENDER for i, s in enumerate(C.SENDERS)}  # {"user": 1, "coach": 2}


class Vocab:
    def __init__(self, tokens: dict[str, list] | None = None):
        tokens = tokens or {}
        self.tokens: dict[str, list] = {
            "event_types": list(tokens.get("event_types", C.CORE_EVENT_TYPES)),
            "meals": list(tokens.get("meals", C.MEALS)),
            "foods": [int(f) for f in tokens.get("foods", [])],
        }
        # column -> values (id = index + 2), or None for a hashed column
        self.attributes: dict[str, list[str] | None] = dict(tokens.get("attributes", {}))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        return cls(json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: str | Path) -> None:
        write_text_atomic(json.dumps(self.tokens | {"attributes": self.attributes}), path)

    def as_dict(self) -> dict[str, list]:
        """Every vocabulary, as stored in the feature file's attributes."""
        return {k: list(v) for k, v in self.tokens.items()} | {"senders": list(C.SENDERS), "attributes": {
            k: None if v is None else list(v) for k, v in self.attributes.items()}}

    def _append(self, kind: str, tokens: list) -> None:
        known = set(self.tokens[kind])
        self.tokens[kind] += [t for t in dict.fromkeys(tokens) if t not in known]

    def extend(self, events: pa.Table, foods_path: str | None = None) -> None:
        """Append tokens not yet known: the foods side table's ids first (a static order),
        then tokens in order of their first appearance in time. Later data can therefore
        only append, never renumber what earlier data produced (no id depends on the future)."""
        self.extend_catalog(foods_path)
        self.extend_in_order(in_order(first_seen(events)))

    def extend_catalog(self, foods_path: str | None) -> None:
        if foods_path:
            catalog = read_table(foods_path, "foods")
            if C.FOOD_ID in catalog:
                ids = pd.to_numeric(catalog[C.FOOD_ID], errors="coerce").dropna().astype(int)
                self._append("foods", ids.sort_values().tolist())

    def extend_in_order(self, first_seen: dict[str, list]) -> None:
        """Append tokens already in order of first appearance (per kind), as `extend` does
        from events; a streaming validation's summary gives them (features/stream.py)."""
        self._append("event_types", list(first_seen["event_types"]))
        self._append("meals", list(first_seen["meals"]))
        self._append("foods", [int(f) for f in first_seen["foods"]])

    def extend_attributes(self, users: pd.DataFrame, columns: list[str], max_categories: int) -> None:
        """Append the values of categorical attribute `columns` not yet known (see the module
        docstring for the cap and hashing)."""
        for col in columns:
            values = sorted(users[col].dropna().astype(str).unique())
            if col not in self.attributes:
                self.attributes[col] = None if len(values) > max_categories else []
            known = self.attributes[col]
            if known is not None:
                seen = set(known)
                known += [v for v in values if v not in seen][: max(max_categories - len(known), 0)]

    def attribute_ids(self, col: str, values: pd.Series, max_categories: int) -> np.ndarray:
        """Vectorised value -> id of attribute `col`; missing and unknown values -> UNKNOWN."""
        known = self.attributes.get(col, [])
        strings_ = values.astype("string")
        if known is None:
            distinct = pd.unique(strings_.dropna())
            bucket = {v: FIRST + _digest_int(v, f"attribute:{col}") % max_categories for v in distinct}
            return strings_.map(bucket).fillna(UNKNOWN).to_numpy(np.int32)
        pos = pd.Index(known).get_indexer(strings_.fillna("\x00"))  # a missing value matches nothing
        return np.where(pos < 0, UNKNOWN, pos + FIRST).astype(np.int32)

    def ids(self, kind: str, values: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised token -> id; missing values -> UNKNOWN."""
        pos = _positions(self.tokens[kind], values)
        return np.where(pos < 0, UNKNOWN, pos + FIRST).astype(np.int32)


def sender_ids(senders: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Vectorised sender -> id (1 user, 2 coach). Messages are validated, so any other
    sender here is a bug upstream, not data to guess about."""
    pos = _positions(list(C.SENDERS), senders)
    if (pos < 0).any():
        bad = np.asarray(senders.to_pylist() if isinstance(senders, pa.ChunkedArray | pa.Array) else senders, dtype=object)
        raise ValueError(f"senders outside the contract {C.SENDERS}: {sorted(set(bad[pos < 0]), key=str)[:5]}")
    return (pos + FIRST_SENDER).astype(np.int8)


def codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Dictionary codes of an Arrow column: (int32 code per row, -1 for null; the distinct
    values; a dictionary column's own, which may hold values no row has). The work is Arrow's:
    no Python object per row, only per distinct value."""
    if isinstance(values, pa.ChunkedArray):
        if pa.types.is_dictionary(values.type):  # read as such (features/stream.py): nothing to hash
            values = values.unify_dictionaries()
        values = values.combine_chunks()
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def value_counts(values: pa.Array | pa.ChunkedArray) -> dict:
    """Rows per distinct non-null value of an Arrow column (`codes`), most frequent first, ties
    in order of first appearance (of a dictionary column: in its dictionary's order)."""
    c, distinct = codes(values)
    n = np.bincount(c[c >= 0], minlength=len(distinct))
    return {distinct[i]: int(n[i]) for i in np.argsort(-n, kind="stable") if n[i]}


class Tokens:
    """An Arrow string column as its dictionary codes, for vectorised comparisons
    (`etype == "message"`, `etype.isin([...])`: bool (N,) arrays, a null equal to nothing) with
    one Python comparison per distinct value and none per row. A numpy unicode array of the
    column cost 4-5 times as much in a feature build (docs/benchmarks.md)."""

    __hash__ = None  # `==` compares row by row

    def __init__(self, values: pa.Array | pa.ChunkedArray):
        self.codes, self.distinct = codes(values)

    def isin(self, tokens) -> np.ndarray:
        wanted = set(tokens)
        return np.array([d in wanted for d in self.distinct] + [False])[self.codes]  # code -1 (null): False

    def __eq__(self, token) -> np.ndarray:
        return self.isin([token])


def _positions(tokens: list, values) -> np.ndarray:
    """Position of each value in `tokens`, -1 where absent or null. Arrow columns are
    looked up per distinct value (their codes); numpy arrays through a pandas index."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        c, distinct = codes(values)
        table = np.append(_positions(tokens, np.asarray(distinct, dtype=object)), -1)  # code -1 -> -1
        return table[c]
    return pd.Index(tokens).get_indexer(pd.Index(values))


def first_seen(events: pa.Table) -> dict[str, dict]:
    """Per kind of token (KINDS: event types, meals, food ids), each distinct non-null token's
    earliest timestamp in `events` (epoch microseconds)."""
    ts = pc.cast(events[C.TS], pa.int64())
    foods = events[C.FOOD_IDS]
    columns = {"event_types": (events[C.EVENT_TYPE], ts), "meals": (events[C.MEAL], ts),
               "foods": (pc.list_flatten(foods), ts.take(pc.list_parent_indices(foods)))}
    out = {}
    for kind, (values, when) in columns.items():  # Arrow's hash aggregation: 2-3x np.minimum.at's speed
        first = pa.table({"token": values, "ts": when}).group_by("token").aggregate([("ts", "min")])
        out[kind] = {t: us for t, us in zip(first["token"].to_pylist(), first["ts_min"].to_pylist()) if t is not None}
    return out


def in_order(first: dict[str, dict]) -> dict[str, list]:
    """`first_seen`'s tokens per kind by earliest time, ties by token: the order `Vocab`
    appends them in."""
    return {k: [t for t, _ in sorted(v.items(), key=lambda kv: (kv[1], kv[0]))] for k, v in first.items()}


def _digest_int(value: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}\x00{value}".encode(), digest_size=8).digest(), "little")


def content_buckets(content_ids: np.ndarray | pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """Content id -> 2 + hash % n_buckets (1 where absent). Hashes each distinct id once."""
    if isinstance(content_ids, pa.Array | pa.ChunkedArray):
        c, distinct = codes(content_ids)
    else:
        c, distinct = pd.factorize(pd.Series(content_ids), use_na_sentinel=True)
    bucket = np.array([FIRST + _digest_int(str(u), "content") % n_buckets for u in distinct] + [UNKNOWN], dtype=np.int32)
    return bucket[c]  # code -1 (absent) picks the trailing UNKNOWN


def pseudonyms(user_ids: np.ndarray, key: str) -> np.ndarray:
    """Keyed hash of each user id (16 bytes): artifacts never carry raw ids; the same key
    maps them back for the team that holds it."""
    k = key.encode()[:64]
    return np.array(
        [hashlib.blake2b(str(u).encode(), digest_size=8, key=k).hexdigest().encode() for u in user_ids],
        dtype="S16",
    )


def shard_of(user_ids, num_shards: int) -> np.ndarray:
    """The shard of each user (numpy or Arrow ids): a hash independent of the split hash,
    computed once per distinct user (`codes`: Arrow's hash table finds them, without sorting)."""
    ids = user_ids if isinstance(user_ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(user_ids, dtype=object))
    code, distinct = codes(ids)
    return np.array([_digest_int(str(u), "shard") % num_shards for u in distinct], dtype=np.int64)[code]
