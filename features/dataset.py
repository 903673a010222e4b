"""Examples from one or more feature files -> padded, batch-first tensors.

`FeatureDataset[i]` slices example i's items out of flat in-memory arrays (the whole store
is read with one HDF5 read per dataset, lazily in each process, so DataLoader workers each
open the file themselves) and keeps the most recent `max_len` items per stream.
`collate` pads them into the batch contract below. Padding masks are bool, True = padding.

    label (B,) f32 | presence (B, 3) f32 | example (B,) i64
    user (B,) i64: equal for examples of one user (a hash of the pseudonymised key, the same
                   in every build and shard; pretraining keeps a user's rows apart by it)
    aggregates (B, F) f32, signed log1p: only with model.aggregates (the hybrid)
    attr_codes (B, C) i64, attr_values (B, 2N) f32: the user's categorical attribute ids (1 =
                   missing/unknown) and numeric attributes (signed log1p, 0 where missing,
                   then N missing flags); only when the model has attributes
    future (B, D) f32: own activity (1/0) on each of the D days from as_of, -1 after the data's
                   end, with model.future_days and `targets=True`; a training target (the
                   auxiliary head, the future objective of pretraining), never a model input
    conversation: embedding (B,T,E) f32, sender, msg_no, dt_bucket, recency, position,
                  mention_first, mention_last (B,T) i64
    food:         food_ids (B,T,M) i64, meal, dt_bucket, recency, position (B,T) i64
    events:       type_id, day, content, dt_bucket, recency, position (B,T) i64;
                  value, value_delta (signed log1p), has_value (B,T) f32
    every stream: padding_mask (B,T) bool; T >= 1 even when the whole batch has no items
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError
from features import timebuckets as tb
from features.aggregates import aggregates_of, future_activity_of
from features.labels import unit_hash
from features.store import SPLITS, STREAMS, UNLABELLED, StoreMeta, load_arrays, read_meta
from models.config import ModelConfig

CATEGORICAL = {
    "conversation": ("sender", "msg_no", "dt_bucket", "recency", "position", "mention_first", "mention_last"),
    "food": ("meal", "dt_bucket", "recency", "position"),
    "events": ("type_id", "day", "content", "dt_bucket", "recency", "position"),
}
CONTINUOUS = {"conversation": (), "food": (), "events": ("value", "value_delta", "has_value")}


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """A scale for values of any unit (kg, minutes, counts) that needs no statistics of the
    data, so no example's inputs depend on other (possibly later) events."""
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


def mentions(a: dict, at, as_of) -> dict[str, np.ndarray]:
    """The days conversation items `at` mention, counted from their example's cutoff `as_of`, as
    `timebuckets.mention_buckets` ids ("mention_first", "mention_last")."""
    age = (as_of - a["ts"][at]) / 86400.0  # days from the message to the cutoff
    return {k: tb.mention_buckets(a[k][at] - age) for k in ("mention_first", "mention_last")}


def streams_with_items(examples: dict, streams) -> list[str]:
    """The streams, in the order given, that some example's window holds an item of: pretraining,
    training and the jobs' staleness check give the others no encoder (a log without messages
    has no conversation, nor a text width)."""
    return [s for s in streams if examples[f"{s}_end"].any()]


def model_config_for(model: ModelConfig, meta: StoreMeta) -> ModelConfig:
    """The model config with vocabulary sizes and text width taken from the store."""
    extra = {"max_msg_no": meta.config["features"]["max_msg_no"], "max_day": meta.config["features"]["max_day"],
             "n_mention_buckets": tb.N_MENTION_BUCKETS}
    if model.future_days < 0:  # every day of the label's horizon, when the events show them:
        # supplied labels (data.labels) may describe days the event log does not cover
        # (KDD Cup's logs end where its label window starts), so no such head then.
        supplied = bool(meta.config.get("data", {}).get("labels"))
        extra["future_days"] = 0 if supplied else int(meta.config.get("labels", {}).get("horizon_days", 7))
    if model.attributes:
        attrs = meta.attributes
        values = meta.vocab.get("attributes", {})
        known = [int(attrs["n_ids"]) if values.get(c) is None else 2 + len(values[c]) for c in attrs["categorical"]]
        extra |= {"categorical_attributes": list(attrs["categorical"]), "numeric_attributes": list(attrs["numeric"]),
                  "n_attribute_ids": int(attrs["n_ids"]), "attribute_known_ids": known}
    return replace(model, **meta.sizes(), **extra)


def has_attributes(model: ModelConfig) -> bool:
    return bool(model.categorical_attributes or model.numeric_attributes)


def attributes_of(files: list[Path], model: ModelConfig, user_row: np.ndarray, file_of: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per example (`user_row` and `file_of` as `load_examples` gives them), the user's
    attributes the model was built with, matched by name (a store without one reads
    missing): (n, C) int64 ids, 1 = missing or unknown, and (n, 2N) float32, signed log1p of
    the numeric values (0 where missing) then their missing flags."""
    codes, values = [], []
    for i, f in enumerate(files):
        arrays, meta = load_arrays(f, ("users",))
        rows, users, have = user_row[file_of == i], arrays["users"], meta.attributes
        c = np.ones((len(rows), len(model.categorical_attributes)), np.int64)
        for j, name in enumerate(model.categorical_attributes):
            if name in have["categorical"]:
                c[:, j] = users["attr_codes"][rows, have["categorical"].index(name)]
        v = np.full((len(rows), len(model.numeric_attributes)), np.nan, np.float32)
        for j, name in enumerate(model.numeric_attributes):
            if name in have["numeric"]:
                v[:, j] = users["attr_values"][rows, have["numeric"].index(name)]
        known = np.array(model.attribute_known_ids or [model.n_attribute_ids] * c.shape[1], np.int64)
        codes.append(np.where(c >= np.minimum(known, model.n_attribute_ids), 1, c))  # later values: unknown
        missing = np.isnan(v)
        values.append(np.concatenate([signed_log1p(np.nan_to_num(v, nan=0.0)), missing.astype(np.float32)], axis=1))
    return np.concatenate(codes), np.concatenate(values)


def user_numbers(user_key: np.ndarray) -> np.ndarray:
    """(n,) int64 per pseudonymised user key: equal keys, equal numbers (a 63-bit hash, so it
    depends on no other user: a rebuild with more users or a shard split keeps every number)."""
    uniques, inverse = np.unique(user_key, return_inverse=True)
    numbers = [int.from_bytes(hashlib.blake2b(bytes(k), digest_size=8).digest(), "little") >> 1 for k in uniques]
    return np.asarray(numbers, dtype=np.int64)[inverse.reshape(-1)]


def load_examples(files: list[Path]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Examples of one or more feature files concatenated (global row = position here),
    the pseudonymised user key of each, and the file index of each."""
    ex = [load_arrays(f, ("examples", "users"))[0] for f in files]
    examples = {k: np.concatenate([e["examples"][k] for e in ex]) for k in ex[0]["examples"]}
    user_key = np.concatenate([e["users"]["key"][e["examples"]["user_row"]] for e in ex])
    file_of = np.concatenate([np.full(len(e["examples"]["as_of"]), i) for i, e in enumerate(ex)])
    return examples, user_key, file_of


class FeatureDataset(Dataset):
    def __init__(self, files: str | Path | list, model: ModelConfig, indices: np.ndarray | None = None,
                 targets: bool = False):
        """files: one feature file or a list of shard files read as one dataset.
        model: supplies max lengths and the vocabulary sizes ids are clamped to.
        indices: global example rows to use (see `select`); default all.
        targets: also give each item the training-only targets of `model.future_days`
            (`future`); for training and pretraining, never needed to predict."""
        self.files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        self.model = model
        self.meta = read_meta(self.files[0])
        self.examples, self.user_key, self.file_of = load_examples(self.files)
        self.user_number = user_numbers(self.user_key)  # (n_examples,) int64, see `collate`
        self.indices = np.arange(len(self.file_of)) if indices is None else np.asarray(indices)
        self._arrays: list | None = None  # loaded lazily, once per process
        self._loaded: dict = {}  # the same dict in every `subset`: they share one loaded copy
        self.aggregates: np.ndarray | None = None  # (n_examples, F), with model.aggregates
        if model.aggregates:  # the hybrid; `self.model` then names the columns for the model
            X, names = aggregates_of(self.files, model.aggregate_names)
            self.aggregates = signed_log1p(X)
            self.model = replace(model, aggregate_names=names)
        self.attributes: tuple[np.ndarray, np.ndarray] | None = None  # per example, see attributes_of
        if has_attributes(self.model):
            self.attributes = attributes_of(self.files, self.model, self.examples["user_row"], self.file_of)
        self.future: np.ndarray | None = None  # (n_examples, future_days), targets only
        if targets and model.future_days > 0:
            horizon = self.meta.config.get("labels", {}).get("horizon_days", model.future_days)
            if model.future_days > horizon:
                raise UserError(f"model.future_days={model.future_days} exceeds labels.horizon_days={horizon}: "
                                "labelled examples see only that many future days")
            self.future = future_activity_of(self.files, model.future_days)

    def select(self, splits=SPLITS, labelled: bool = True, user_fraction: float = 1.0, salt: str = "fraction") -> np.ndarray:
        """Global example rows in `splits`; optionally only labelled ones and only a hashed
        share of users (the same users at every fraction <= f, for label-fraction runs)."""
        ex = self.examples
        keep = np.isin(ex["split"], [SPLITS.index(s) for s in splits])
        if labelled:
            keep &= ex["label"] != UNLABELLED
        if user_fraction < 1.0:
            keep &= unit_hash(self.user_key, salt) < user_fraction
        return np.flatnonzero(keep)

    def subset(self, indices: np.ndarray) -> FeatureDataset:
        new = object.__new__(FeatureDataset)
        new.__dict__.update(self.__dict__)
        new.indices = np.asarray(indices)
        return new

    def lengths(self) -> np.ndarray:
        """(len(self), 3) items each example feeds the model per stream (STREAMS order),
        after the `max_len` cut: what `collate` pads to."""
        ex = self.examples
        cols = [np.minimum(ex[f"{s}_end"][self.indices] - ex[f"{s}_start"][self.indices],
                           getattr(self.model, f"max_len_{s}")) for s in STREAMS]
        return np.stack(cols, axis=1).astype(np.int64)

    def length_key(self) -> np.ndarray:
        """One sortable number per example: its events length, then food, then conversation
        (the events stream is the longest and costs the most)."""
        conv, food, events = self.lengths().T
        return (events << 32) | (food << 16) | conv

    def labels(self) -> np.ndarray:
        return self.examples["label"][self.indices].astype(np.float32)

    def _load(self) -> list:
        if self._arrays is None:
            if "arrays" not in self._loaded:
                self._loaded["arrays"] = [load_arrays(f, STREAMS)[0] for f in self.files]
            self._arrays = self._loaded["arrays"]
        return self._arrays

    def preload(self) -> None:
        """Read the store into this process now. DataLoader workers forked afterwards share
        these arrays copy-on-write instead of each reading the whole store again (every
        epoch, since each epoch has its own loader)."""
        self._load()

    def __getstate__(self) -> dict:
        # Pickled to a worker that is not forked (spawn, forkserver): send no arrays, the
        # worker reads the store itself, once, on its first item.
        return self.__dict__ | {"_arrays": None, "_loaded": {}}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        g = int(self.indices[i])
        arrays = self._load()[self.file_of[g]]
        e = {k: v[g] for k, v in self.examples.items()}
        as_of = e["as_of"]
        item = {"label": float(e["label"]), "example": g, "user": int(self.user_number[g])}
        if self.aggregates is not None:
            item["aggregates"] = self.aggregates[g]
        if self.attributes is not None:
            item["attr_codes"], item["attr_values"] = self.attributes[0][g], self.attributes[1][g]
        if self.future is not None:
            item["future"] = self.future[g]
        presence = []
        for s in STREAMS:
            lo, hi = int(e[f"{s}_start"]), int(e[f"{s}_end"])
            presence.append(float(hi > lo))
            lo = max(lo, hi - getattr(self.model, f"max_len_{s}"))
            a = arrays[s]
            n = hi - lo
            out = {
                "dt_bucket": a["dt_bucket"][lo:hi],
                "recency": tb.bucketize(as_of - a["ts"][lo:hi]),
                "position": np.arange(n, 0, -1),  # 1 = most recent
            }
            if s == "conversation":
                out |= {"embedding": a["embedding"][lo:hi], "sender": a["sender"][lo:hi],
                        "msg_no": np.minimum(a["msg_no"][lo:hi], self._cap("msg_no")),
                        **mentions(a, slice(lo, hi), as_of)}
            elif s == "food":
                out |= {"meal": self._clamp(a["meal"][lo:hi], self.model.n_meals),
                        "foods": self._meal_foods(a, lo, hi)}
            else:
                t = self._clamp(a["type_id"][lo:hi], self.model.n_event_types)
                has = a["has_value"][lo:hi].astype(np.float32)
                out |= {
                    "type_id": t,
                    "day": np.minimum(a["day"][lo:hi], self._cap("day")) + 1,
                    "content": self._clamp(a["content"][lo:hi], self.model.n_content),
                    "value": signed_log1p(a["value"][lo:hi]) * has,
                    "value_delta": signed_log1p(a["value_delta"][lo:hi]) * has,
                    "has_value": has,
                }
            item[s] = out
        item["presence"] = presence
        return item

    def batch(self, positions) -> dict:
        """`collate([self[i] for i in positions])`, computed for the whole batch at once: one
        gather per field instead of a slice and a copy per item and field (the loader was a
        sixth of a demo training step). Equal to the per-item path, key for key
        (tests/test_features.py)."""
        g = self.indices[np.asarray(positions, dtype=np.int64)]  # (B,) global example rows
        B, ex = len(g), self.examples
        batch: dict = {
            "label": torch.from_numpy(ex["label"][g].astype(np.float32)),
            "example": torch.from_numpy(g.astype(np.int64)),
            "user": torch.from_numpy(self.user_number[g].astype(np.int64)),
        }
        if self.aggregates is not None:
            batch["aggregates"] = torch.from_numpy(np.ascontiguousarray(self.aggregates[g]))  # (B, F)
        if self.attributes is not None:
            batch["attr_codes"] = torch.from_numpy(np.ascontiguousarray(self.attributes[0][g]))  # (B, C)
            batch["attr_values"] = torch.from_numpy(np.ascontiguousarray(self.attributes[1][g]))  # (B, 2N)
        if self.future is not None:
            batch["future"] = torch.from_numpy(np.ascontiguousarray(self.future[g]))  # (B, future_days)
        arrays, file_of, as_of = self._load(), self.file_of[g], ex["as_of"][g]
        presence = []
        for s in STREAMS:
            start, end = ex[f"{s}_start"][g].astype(np.int64), ex[f"{s}_end"][g].astype(np.int64)  # (B,)
            presence.append(end > start)
            lo = np.maximum(start, end - getattr(self.model, f"max_len_{s}"))  # (B,)
            n = end - lo  # (B,) items per row
            T = max(1, int(n.max()) if B else 1)
            row = np.repeat(np.arange(B), n)  # (N,) the batch row of each item
            col = np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n)  # (N,) its slot in the row
            at = lo[row] + col  # (N,) its index in its file's flat arrays
            out = {k: np.zeros((B, T), np.int64) for k in CATEGORICAL[s]}
            out |= {k: np.zeros((B, T), np.float32) for k in CONTINUOUS[s]}
            out["position"][row, col] = n[row] - col  # 1 = most recent
            foods = []  # food: per file, (rows, cols, (items, m) food ids)
            for f in np.unique(file_of):
                mine = file_of[row] == f  # (N,) this file's items
                r, c, i, a = row[mine], col[mine], at[mine], arrays[f][s]
                out["dt_bucket"][r, c] = a["dt_bucket"][i]
                out["recency"][r, c] = tb.bucketize(as_of[r] - a["ts"][i])
                if s == "conversation":
                    if "embedding" not in out:
                        out["embedding"] = np.zeros((B, T, a["embedding"].shape[1]), np.float32)
                    out["embedding"][r, c] = a["embedding"][i]
                    out["sender"][r, c] = a["sender"][i]
                    out["msg_no"][r, c] = np.minimum(a["msg_no"][i], self._cap("msg_no"))
                    for k, v in mentions(a, i, as_of[r]).items():
                        out[k][r, c] = v
                elif s == "food":
                    out["meal"][r, c] = self._clamp(a["meal"][i], self.model.n_meals)
                    foods.append((r, c, self._foods_at(a, i)))
                else:
                    has = a["has_value"][i].astype(np.float32)
                    out["type_id"][r, c] = self._clamp(a["type_id"][i], self.model.n_event_types)
                    out["day"][r, c] = np.minimum(a["day"][i], self._cap("day")) + 1
                    out["content"][r, c] = self._clamp(a["content"][i], self.model.n_content)
                    out["value"][r, c] = signed_log1p(a["value"][i]) * has
                    out["value_delta"][r, c] = signed_log1p(a["value_delta"][i]) * has
                    out["has_value"][r, c] = has
            if s == "conversation" and "embedding" not in out:  # nobody in the batch wrote
                E = arrays[int(file_of[0]) if B else 0][s]["embedding"].shape[1]
                out["embedding"] = np.zeros((B, T, E), np.float32)
            if s == "food":
                M = max([1] + [f.shape[1] for _, _, f in foods])
                out["food_ids"] = np.zeros((B, T, M), np.int64)
                for r, c, f in foods:
                    out["food_ids"][r, c, : f.shape[1]] = f
            mask = np.arange(T)[None, :] >= n[:, None]  # (B, T) True = padding
            batch[s] = {k: torch.from_numpy(v) for k, v in out.items()} | {"padding_mask": torch.from_numpy(mask)}
        batch["presence"] = torch.from_numpy(np.stack(presence, axis=1).astype(np.float32))  # (B, 3)
        return batch

    def _cap(self, key: str) -> int:
        """Where day of program ("day") or message number ("msg_no") is clamped: the store's
        cap, or the model's trained maximum where training set one (`trained_limits`)."""
        cap, trained = getattr(self.model, f"max_{key}"), getattr(self.model, f"trained_max_{key}")
        return min(cap, trained) if trained >= 0 else cap

    def trained_limits(self) -> dict[str, int]:
        """The largest day of program and message number in the windows of this dataset's
        examples (each stream's last item: both only grow along a user's history), as the
        model config's `trained_max_day` / `trained_max_msg_no` (-1 where no window has
        one). Training saves them with the model, so later inputs stay on rows it trained."""
        arrays, g = self._load(), self.indices
        out = {"trained_max_day": -1, "trained_max_msg_no": -1}
        for f in np.unique(self.file_of[g]):
            rows = g[self.file_of[g] == f]
            for s, key in (("events", "day"), ("conversation", "msg_no")):
                lo, hi = self.examples[f"{s}_start"][rows], self.examples[f"{s}_end"][rows]
                last = hi[hi > lo] - 1
                if len(last):
                    top = min(int(arrays[f][s][key][last].max()), getattr(self.model, f"max_{key}"))
                    out[f"trained_max_{key}"] = max(out[f"trained_max_{key}"], top)
        return out

    def _meal_foods(self, a: dict, lo: int, hi: int) -> np.ndarray:
        """`_foods` of one example's meals lo..hi, from two contiguous slices (cheap reads
        even when `a` holds HDF5 datasets, as the benchmark's per-item reader does)."""
        offsets = a["meal_offsets"][lo : hi + 1]
        return self._foods(offsets[:-1] - offsets[0], np.diff(offsets), a["food_ids"][offsets[0] : offsets[-1]])

    def _foods_at(self, a: dict, meals: np.ndarray) -> np.ndarray:
        """`_foods` of any meal rows of in-memory arrays (a whole batch's)."""
        first = a["meal_offsets"][meals]
        return self._foods(first, a["meal_offsets"][meals + 1] - first, a["food_ids"])

    def _foods(self, first: np.ndarray, counts: np.ndarray, food_ids: np.ndarray) -> np.ndarray:
        """(n, m) food ids of n meals whose foods start at `first` in `food_ids` and number
        `counts`, left-aligned, 0 = padding; at most max_foods_per_meal per meal, m the most
        any of them has. One gather for all meals: a loop per meal was most of the loader's
        time."""
        counts = np.minimum(counts, self.model.max_foods_per_meal)  # (n,)
        m = int(counts.max()) if len(counts) else 0
        if not m:
            return np.zeros((len(counts), 0), np.int64)
        slot = np.arange(m)  # (m,)
        valid = slot[None, :] < counts[:, None]  # (n, m)
        ids = food_ids[np.where(valid, first[:, None] + slot[None, :], 0)]  # (n, m)
        return self._clamp(np.where(valid, ids, 0), self.model.n_foods)

    @staticmethod
    def _clamp(ids: np.ndarray, size: int) -> np.ndarray:
        """Ids the model has no row for (tokens added to the vocabulary after it was
        trained) read as unknown (1)."""
        return np.where(ids >= size, 1, ids) if size else ids


def collate(items: list[dict]) -> dict:
    """Pad a list of `FeatureDataset` items into the batch contract (module docstring)."""
    B = len(items)
    batch: dict = {
        "label": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "example": torch.tensor([it["example"] for it in items], dtype=torch.int64),
        "user": torch.tensor([it["user"] for it in items], dtype=torch.int64),
        "presence": torch.tensor([it["presence"] for it in items], dtype=torch.float32),
    }
    if "aggregates" in items[0]:
        batch["aggregates"] = torch.from_numpy(np.stack([it["aggregates"] for it in items]))  # (B, F)
    for k in ("attr_codes", "attr_values"):
        if k in items[0]:
            batch[k] = torch.from_numpy(np.stack([it[k] for it in items]))  # (B, C) / (B, 2N)
    if "future" in items[0]:
        batch["future"] = torch.from_numpy(np.stack([it["future"] for it in items]))  # (B, future_days)
    for s in STREAMS:
        lengths = [len(it[s]["position"]) for it in items]
        T = max(1, max(lengths))
        out = {k: np.zeros((B, T), np.int64) for k in CATEGORICAL[s]}
        out |= {k: np.zeros((B, T), np.float32) for k in CONTINUOUS[s]}
        if s == "conversation":
            E = items[0][s]["embedding"].shape[1]
            out["embedding"] = np.zeros((B, T, E), np.float32)
        if s == "food":
            M = max([1] + [it[s]["foods"].shape[1] for it in items])
            out["food_ids"] = np.zeros((B, T, M), np.int64)
        for b, it in enumerate(items):
            n = lengths[b]
            for k in CATEGORICAL[s] + CONTINUOUS[s]:
                out[k][b, :n] = it[s][k]
            if s == "conversation":
                out["embedding"][b, :n] = it[s]["embedding"]
            if s == "food":
                f = it[s]["foods"]  # (n, m)
                out["food_ids"][b, :n, : f.shape[1]] = f
        mask = np.arange(T)[None, :] >= np.array(lengths)[:, None]  # (B, T) True = padding
        batch[s] = {k: torch.from_numpy(v) for k, v in out.items()} | {"padding_mask": torch.from_numpy(mask)}
    return batch
