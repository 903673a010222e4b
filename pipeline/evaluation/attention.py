"""Attention maps of the trained model for a few (pseudonymised) test users: which past
messages, meals or events the [CLS] token and the items attend to."""

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


def chosen_examples(data: FeatureDataset, rows: np.ndarray, streams: list[str], n_users: int) -> np.ndarray:
    """One example per user for `n_users` distinct users: each user's fullest example (most
    streams with items, then most items), fullest users first. Distinct users, because a
    user's windows at successive dates are near copies (and would share a file name)."""
    if not len(rows):
        return rows
    lengths = np.stack([data.examples[f"{s}_end"][rows] - data.examples[f"{s}_start"][rows] for s in streams])
    order = np.lexsort((rows, -lengths.sum(0), -(lengths > 0).sum(0)))  # last key first: fullest, then row
    _, first = np.unique(data.user_key[rows[order]], return_index=True)  # each user's fullest example
    return rows[order[np.sort(first)][:n_users]]


def tick_labels(stream: str, item: dict, vocab: dict) -> list[str]:
    """One name per item: who wrote a message / the event type / the meal, and how long
    before the example's date (its `recency` bucket), after "CLS"."""
    field, names = {"conversation": ("sender", ["pad"] + vocab["senders"]),  # sender ids have no "unknown"
                    "events": ("type_id", ["pad", "unk"] + vocab["event_types"]),
                    "food": ("meal", ["pad", "unk"] + vocab["meals"])}[stream]
    ago = tb.describe()
    return ["CLS"] + [f"{names[int(a)] if int(a) < len(names) else '?'} {ago[int(b)]} ago"
                      for a, b in zip(item[field], item["recency"])]


@torch.no_grad()
def attention_plots(cfg: Config, run_dir: Path, files: list[Path], rows: np.ndarray, out: Path) -> list[Path]:
    """One PNG per (user, stream with items) for `eval.attention_users` test users."""
    model, _ = load_model(run_dir / BEST)
    data = FeatureDataset(files, model.config)
    vocab = read_meta(files[0]).vocab
    paths = []
    for i in chosen_examples(data, rows, list(model.streams), cfg.eval.attention_users):
        item = data.subset([i])[0]
        batch = collate([item])
        user = data.user_key[i].decode()[:8]
        for stream in model.streams:
            if not len(item[stream]["position"]):
                continue  # no items: nothing to attend to
            maps = [m[0].numpy() for m in model.encoders[stream].attention_maps(batch[stream])]  # layers x (H, 1+T, 1+T)
            names = tick_labels(stream, item[stream], vocab)
            path = out / f"attention_{stream}_{user}.png"
            paths.append(plots.plot_attention(maps, names, path, f"{stream} attention, user {user}"))
    return paths
