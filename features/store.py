"""The HDF5 feature store (docs/design.md §4): the one place that names its groups, datasets and
attributes, writes it atomically and reads it back with a schema check.

Ragged sequences are stored flat with offsets (CSR). Per stream, items are sorted by
(user row, ts) and `user_offsets[u]:user_offsets[u+1]` are user u's items. Each example
stores, per stream, the [start, end) item range it may see (end = first item at/after
as_of), so a loader slices and nothing is copied per cutoff.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.errors import UserError
from common.files import atomic_path

# 2: the vocabularies attribute holds the senders too (sizes() reads it); a version-1 file
# lacks it, so readers ask for a rebuild instead of failing on a missing key.
# 3: user attributes (users/attr_codes, users/attr_values, the `attributes` attribute).
# 4: the dates a user's message mentions (conversation/mention_first, mention_last).
SCHEMA_VERSION = 4

STREAMS = ("conversation", "food", "events")
SPLITS = ("train", "val", "test", "oot")  # split codes 0..3; oot = out-of-time test
UNLABELLED = -1  # label of an example whose horizon is not yet observed (scoring)
FEATURE_FILE = "features.h5"  # an unsharded build; shards: shard_file_name(i, n)

# Datasets per group; dtypes are the on-disk types.
LAYOUT: dict[str, dict[str, str]] = {
    # attr_codes (n_users, n_categorical) ids, 1 = missing/unknown; attr_values (n_users,
    # n_numeric), NaN = missing: the users table's further columns, StoreMeta.attributes names them
    "users": {"key": "S16", "program_start": "i8", "attr_codes": "i4", "attr_values": "f4"},
    "conversation": {
        "user_offsets": "i8", "ts": "i8", "embedding": "f2", "sender": "i1",
        "msg_no": "i4", "dt_bucket": "i2",
        # the earliest / latest date a user's message mentions, days after it was written (NaN: none)
        "mention_first": "f4", "mention_last": "f4",
    },
    "food": {
        "user_offsets": "i8", "ts": "i8", "dt_bucket": "i2", "meal": "i2",
        "meal_offsets": "i8", "food_ids": "i4",
    },
    "events": {
        "user_offsets": "i8", "ts": "i8", "type_id": "i2", "dt_bucket": "i2", "day": "i4",
        "value": "f4", "value_delta": "f4", "has_value": "i1", "content": "i4",
    },
    "examples": {
        "user_row": "i4", "as_of": "i8", "label": "i1", "split": "i1",
        **{f"{s}_{end}": "i8" for s in STREAMS for end in ("start", "end")},
    },
}


@dataclass
class StoreMeta:
    """The store's attributes: what a model needs to size itself and what a reader checks."""

    schema_version: int
    created_at: str
    source_fingerprint: str
    text_encoder: str
    text_dim: int
    dt_edges: list[float]
    # event_types, meals, foods (raw ids): id = index + 2 (0 padding, 1 unknown);
    # senders (closed, see features/vocab.py): id = index + 1 (0 padding)
    vocab: dict[str, list[Any]]
    config: dict[str, Any]
    content_buckets: int
    shard: int | None = None
    num_shards: int = 1
    # {"categorical": [names], "numeric": [names], "n_ids": ids per categorical column}
    attributes: dict[str, Any] = field(default_factory=lambda: {"categorical": [], "numeric": [], "n_ids": 2})
    extra: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes including padding (0) and unknown (1)."""
        return {
            "text_dim": self.text_dim,
            "n_event_types": len(self.vocab["event_types"]) + 2,
            "n_foods": len(self.vocab["foods"]) + 2,
            "n_meals": len(self.vocab["meals"]) + 2,
            "n_senders": len(self.vocab["senders"]) + 1,  # pad, user, coach
            "n_dt_buckets": len(self.dt_edges) + 3,
            "n_content": self.content_buckets + 2,
        }


def write_store(path: str | Path, arrays: dict[str, dict[str, np.ndarray]], meta: StoreMeta) -> Path:
    """Write every group of LAYOUT plus attributes to a temp file, then rename over `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for group, fields in LAYOUT.items():
                g = f.create_group(group)
                for name, dtype in fields.items():
                    # contiguous: every reader reads whole arrays, and writing is 3x as fast as
                    # h5py's automatic chunks (0.03-0.06 s against 0.14-0.17 s a 1.26 M-event shard)
                    g.create_dataset(name, data=np.asarray(arrays[group][name]).astype(dtype, copy=False))
            for key, value in meta.__dict__.items():
                f.attrs[key] = json.dumps(value)
    return path


def read_meta(path: str | Path) -> StoreMeta:
    with open_store(path) as f:
        return _meta(f, path)


def open_store(path: str | Path) -> h5py.File:
    """Open read-only, with clear errors for a missing, truncated or foreign file and a
    schema-version mismatch."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: feature file does not exist; run `make features` first")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(
            f"{path}: not a readable HDF5 feature file ({str(e).splitlines()[0]}); it may be "
            "truncated or corrupt: delete it and run `make features` again"
        ) from None
    try:
        version = json.loads(f.attrs["schema_version"])
    except KeyError:
        f.close()
        raise UserError(f"{path}: not a feature store (no schema_version); run `make features`") from None
    if version != SCHEMA_VERSION:
        f.close()
        raise UserError(
            f"{path}: feature store schema version {version}, this code reads version "
            f"{SCHEMA_VERSION}; rebuild it with `make features`"
        )
    return f


def _meta(f: h5py.File, path) -> StoreMeta:
    values = {k: json.loads(v) for k, v in f.attrs.items()}
    return StoreMeta(**values)


def load_arrays(path: str | Path, groups=tuple(LAYOUT)) -> tuple[dict[str, dict[str, np.ndarray]], StoreMeta]:
    """Read whole groups into memory (one read per dataset, never one per item)."""
    with open_store(path) as f:
        try:
            arrays = {g: {name: f[g][name][()] for name in LAYOUT[g]} for g in groups}
        except (KeyError, OSError) as e:
            raise UserError(
                f"{path}: feature file is incomplete or corrupt ({e}); run `make features` again"
            ) from None
        return arrays, _meta(f, path)


def shard_file_name(shard: int, num_shards: int) -> str:
    return f"features-{shard:03d}-of-{num_shards:03d}.h5"


def feature_files(folder: str | Path) -> list[Path]:
    """The stores of the build in `folder`: its unsharded file, else every shard file of one
    complete build (a UserError names what is missing or mixed)."""
    folder = Path(folder)
    if (folder / FEATURE_FILE).exists():
        return [folder / FEATURE_FILE]
    shards = sorted(folder.glob("features-*-of-*.h5"))
    if not shards:
        raise UserError(f"no feature file under {folder}; run `make features CONFIG=...` first")
    # Training on part of a shard set, or on shards of two builds, would pass silently.
    counts = {int(p.stem.rsplit("-of-", 1)[1]) for p in shards}
    expected = sorted(folder / shard_file_name(i, n) for n in counts for i in range(n))
    sources = {read_meta(p).source_fingerprint for p in shards}
    if len(counts) > 1 or shards != expected or len(sources) > 1:
        missing = ", ".join(p.name for p in expected if p not in shards) or "none"
        raise UserError(
            f"{folder}: the shard files {[p.name for p in shards]} are not one complete build "
            f"(missing: {missing}; source fingerprints: {len(sources)}); build every shard with the same "
            "features.num_shards from the same events (features.shard=0..N-1), and delete stale shard files"
        )
    return shards


def build_id(files: list[Path]) -> str:
    """Identity of one feature build (its sources and when it was written): a rebuild
    renumbers examples, so predictions are only valid against the build they came from."""
    metas = [read_meta(f) for f in files]
    return hashlib.sha256(json.dumps([(m.source_fingerprint, m.created_at) for m in metas]).encode()).hexdigest()[:12]
