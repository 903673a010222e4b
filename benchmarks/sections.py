"""The five measurements of `benchmarks.run`, each beside its naive version on the same data.

Every function returns a dict of plain numbers (the JSON of the run); rates are per second,
memory in MiB, `ratio` is always real / naive for rates (> 1: the real code is faster).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from benchmarks.measure import best_of
from benchmarks.naive import PerItemReads, per_user_arrays
from benchmarks.train_length import train_step
from features import contract as C
from features.build import build_features
from features.dataset import FeatureDataset, collate, model_config_for
from features.store import STREAMS, read_meta, write_store
from features.text_vectors import MINILM, TextEncoder, embed_messages
from features.vocab import Vocab
from models.config import ModelConfig
from models.engagement import EngagementModel
from pipeline.config import Config
from pipeline.training import loop
from pipeline.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]  # child processes run `-m benchmarks.*` from here
TEXT_DIM = 384  # MiniLM's width: the store's zero vectors weigh what real ones would


def feature_build(events: pa.Table, users: pd.DataFrame, repeat: int, check_users: int = 40) -> dict:
    """events/s of `build_features(embed=None)` vs `naive.per_user_arrays`."""
    head = pc.is_in(events[C.USER_ID], pa.array(pc.unique(events[C.USER_ID])[:check_users]))
    small = events.filter(head)
    real = build_features(small, users, Config(), None, 0, "none", Vocab()).arrays
    naive = per_user_arrays(small, users, Config(), Vocab())
    for group, arrays in naive.items():
        for name, a in arrays.items():
            assert np.array_equal(a, real[group][name]), f"naive and real build differ on {group}/{name}"

    real_s, built = best_of(lambda: build_features(events, users, Config(), None, 0, "none", Vocab()), repeat)
    naive_s, _ = best_of(lambda: per_user_arrays(events, users, Config(), Vocab()), 1)
    n = events.num_rows
    return {"events": n, "users": built.summary["users"], "examples": built.summary["examples"],
            "checked_users": check_users, "events_per_s": n / real_s, "naive_events_per_s": n / naive_s,
            "ratio": naive_s / real_s, "seconds": real_s, "naive_seconds": naive_s,
            "seconds_per_step": built.summary["seconds"]}


def _padded_tokens(lengths: np.ndarray, batch_size: int) -> int:
    """Tokens a model computes when each batch is padded to its longest member."""
    return int(sum(len(b) * b.max() for b in np.array_split(lengths, max(1, -(-len(lengths) // batch_size)))))


def message_encoding(texts: list[str], device: str, batch_size: int = 64, max_tokens: int = 128) -> dict:
    """messages/s of `embed_messages` (deduplicated, length-sorted batches, fresh cache) vs
    `encode(sort=False)` on every message in original order; also sorting alone."""
    encoder = TextEncoder.load(MINILM, device)
    encoder.encode(texts[:batch_size], batch_size, max_tokens, progress=False)  # warm-up
    naive_s, naive = best_of(lambda: encoder.encode(texts, batch_size, max_tokens, sort=False, progress=False), 1)
    sorted_s, _ = best_of(lambda: encoder.encode(texts, batch_size, max_tokens, sort=True, progress=False), 1)
    with tempfile.TemporaryDirectory() as cache:  # fresh: every distinct message is encoded
        real_s, (vectors, stats) = best_of(lambda: embed_messages(texts, encoder, cache, "bench", batch_size, max_tokens), 1)
    diff = float(np.abs(vectors.astype(np.float32) - naive).max())
    tolerance = 5e-2 if encoder.device.type == "cuda" else 1e-2  # bf16 on CUDA: padding moves the last bits
    assert diff < tolerance, f"sorted/deduplicated vectors differ from the naive ones by {diff}"
    lengths = np.array([len(x) for x in encoder.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]])
    n = len(texts)
    return {"messages": n, "distinct": stats["unique"], "encoder": encoder.identity, "device": str(encoder.device),
            "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
            "padded_tokens_original_order": _padded_tokens(lengths, batch_size),
            "padded_tokens_sorted": _padded_tokens(np.sort(lengths), batch_size),
            "messages_per_s": n / real_s, "naive_messages_per_s": n / naive_s, "ratio": naive_s / real_s,
            "sorted_only_messages_per_s": n / sorted_s, "sorted_only_ratio": naive_s / sorted_s,
            "max_abs_diff": diff}


def write_bench_store(events: pa.Table, users: pd.DataFrame, path: Path) -> Path:
    built = build_features(events, users, Config(), None, TEXT_DIM, "zeros", Vocab())
    return write_store(path, built.arrays, built.meta)


def _time_batches(dataset, batch_size: int, n: int, keep: int) -> tuple[float, list]:
    """Seconds to draw `n` batches in the training loader's order (epochs 0, 1, ... as needed),
    and the first `keep` of them. The rest are dropped as a training loop drops them: holding
    hundreds of batches (about 6 MB each at the demo's sizes) timed the allocation of fresh memory
    too, which made the same loader 2-5x slower here (docs/benchmarks.md#figures)."""
    batches: list = []
    drawn = 0
    t = time.perf_counter()
    for epoch in itertools.count():
        for batch in loop.loader(dataset, batch_size, collate, loop.EpochOrder(len(dataset), 0, epoch, batch_size)):
            if len(batches) < keep:
                batches.append(batch)
            drawn += 1
            if drawn == n:
                return time.perf_counter() - t, batches
    raise AssertionError("unreachable")


def data_loading(store: Path, device: torch.device, batches: int, naive_batches: int, steps: int) -> dict:
    """batches/s of FeatureDataset + collate vs `naive.PerItemReads`, and the loader's share
    of a training step of the demo-sized EngagementModel on the same batches."""
    bs = TrainConfig().batch_size
    mcfg = model_config_for(ModelConfig(), read_meta(store))
    data = FeatureDataset(store, mcfg)
    train = data.subset(data.select(["train"]))
    load_s, _ = best_of(train._load, 1)  # one read per dataset, once per process
    real_s, real = _time_batches(train, bs, max(batches, steps + 1), keep=steps + 1)
    naive_s, slow = _time_batches(PerItemReads(store, mcfg, train.indices), bs, naive_batches, keep=1)
    for a, b in zip(_flat(real[0]), _flat(slow[0])):
        assert torch.equal(a, b), "per-item HDF5 reads and FeatureDataset give different batches"

    model = EngagementModel(mcfg).to(device)
    optimizer = loop.make_optimizer(model, 1e-3, 0.01)
    train_step(model, optimizer, real[0], device)  # warm-up
    step_s, _ = best_of(lambda: [train_step(model, optimizer, b, device) for b in real[1 : steps + 1]], 1)
    per_batch, naive_per_batch, per_step = real_s / max(batches, steps + 1), naive_s / naive_batches, step_s / steps
    return {"batch_size": bs, "train_examples": len(train), "store_load_seconds": load_s,
            "batches_per_s": 1 / per_batch, "naive_batches_per_s": 1 / naive_per_batch,
            "ratio": naive_per_batch / per_batch, "step_seconds": per_step,
            "loader_share_of_step": per_batch / (per_batch + per_step),
            "naive_loader_share_of_step": naive_per_batch / (naive_per_batch + per_step),
            "model_parameters": sum(p.numel() for p in model.parameters())}


def _flat(batch: dict) -> list[torch.Tensor]:
    return [v for k, v in sorted(batch.items()) if k != "example" and isinstance(v, torch.Tensor)] + [
        t for s in STREAMS for _, t in sorted(batch[s].items())]


def _child(module: str, *args) -> dict:
    """Run `python -m module args...` in a fresh process; its last stdout line is JSON."""
    run = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"{module} {' '.join(map(str, args))} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def training_lengths(base: ModelConfig, device: torch.device, lengths, batch_size: int, steps: int) -> dict:
    """examples/s and peak memory of a training step with every stream `L` items long, each
    length in its own process (`benchmarks.train_length`)."""
    config = json.dumps(dataclasses.asdict(base))
    out = {str(L): _child("benchmarks.train_length", config, L, batch_size, steps, device) for L in lengths}
    first = out[str(lengths[0])]
    for r in out.values():
        r["time_per_example_vs_shortest"] = first["examples_per_s"] / r["examples_per_s"]
    return {"batch_size": batch_size, "streams": len(STREAMS), "d_model": base.d_model, "n_layers": base.n_layers,
            "per_length": out}


def replicate(events: pa.Table, users: pd.DataFrame, k: int) -> tuple[pa.Table, pd.DataFrame]:
    """k copies of every user under new ids: k times the data, the same per-user shape."""
    copies = [events.set_column(events.schema.get_field_index(C.USER_ID), C.USER_ID,
                                pc.binary_join_element_wise(events[C.USER_ID], pa.scalar(f"r{j}"), "~"))
              for j in range(k)]
    big = pa.concat_tables(copies).sort_by([(C.USER_ID, "ascending"), (C.TS, "ascending")])
    big_users = pd.concat([users.assign(**{C.USER_ID: users[C.USER_ID] + f"~r{j}"}) for j in range(k)])
    return big, big_users.reset_index(drop=True)


def build_memory(events: pa.Table, users: pd.DataFrame, scales, workdir: Path) -> dict:
    """Peak memory of the feature build at each scale, each run in a fresh process."""
    out = {}
    for k in scales:
        ev, us = replicate(events, users, k) if k > 1 else (events, users)
        pq.write_table(ev, workdir / f"events-{k}x.parquet")
        us.to_parquet(workdir / f"users-{k}x.parquet")
        del ev
        out[f"{k}x"] = _child("benchmarks.build_memory", workdir / f"events-{k}x.parquet", workdir / f"users-{k}x.parquet")
    return out
