"""Attention maps of the trained model for a few (pseudonymised) test users: which past
messages or events the [CLS] token and the items attend to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from features import timebuckets as tb
from features.dataset import FeatureDataset, collate
from features.store import read_meta
from models.checkpoint import load_model
from pipeline.config import Config
from pipeline.evaluation import plots
from pipeline.training.train import BEST

SENDER = {1: "U", 2: "C"}


@torch.no_grad()
def attention_plots(cfg: Config, run_dir: Path, files: list[Path], rows: np.ndarray, out: Path) -> list[Path]:
    """One PNG per chosen example: rows = layers, columns = heads, ticks = items."""
    model, _ = load_model(run_dir / BEST)
    stream = "conversation" if "conversation" in model.streams else model.streams[0]
    data = FeatureDataset(files, model.config)
    if not len(rows):
        return []
    length = data.examples[f"{stream}_end"][rows] - data.examples[f"{stream}_start"][rows]
    chosen = rows[np.argsort(-length, kind="stable")[: cfg.eval.attention_users]]
    names = ["pad", "unk"] + read_meta(files[0]).vocab["event_types"]
    dt_names = tb.describe()
    paths = []
    for i in chosen:
        item = data.subset([i])[0]
        batch = collate([item])
        maps = [m[0].numpy() for m in model.encoders[stream].attention_maps(batch[stream])]  # layers x (H, 1+T, 1+T)
        s = item[stream]
        if stream == "conversation":
            ticks = [f"{SENDER.get(int(a), '?')} {dt_names[int(b)]}" for a, b in zip(s["sender"], s["dt_bucket"])]
        elif stream == "events":
            ticks = [names[int(t)] if int(t) < len(names) else "?" for t in s["type_id"]]
        else:
            ticks = [f"meal {dt_names[int(b)]}" for b in s["dt_bucket"]]
        user = data.user_key[i].decode()[:8]
        path = out / f"attention_{stream}_{user}.png"
        paths.append(plots.plot_attention(maps, ["CLS"] + ticks, path, f"{stream} attention, user {user}"))
    return paths
