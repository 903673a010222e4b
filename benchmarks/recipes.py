"""Bench section 6: the training recipe before and after issue 13, on the demo's own store.

Each recipe runs the real stages, `pretrain` then `train` (pretrained init, the demo's
model), in its own workdir whose `features/` is the demo store, for the same number of
epochs, early stopping off. Reported per recipe: pretraining windows/s, training examples/s
two ways: the stage from start to end (train(): steps, validation every epoch, calibration,
the final predictions, logging the model; pretrain(): steps and the held-out evaluation) and
its steps alone (the `epoch_examples_per_s` / `epoch_windows_per_s` the loops log to MLflow,
batch loading included, averaged over epochs), plus the best and last validation ROC-AUC, so
speed is never bought with accuracy unseen.

    python -m benchmarks.recipes [--epochs 3] [--pretrain-epochs 1] [--store data/demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlflow
import numpy as np

from features.dataset import FeatureDataset, model_config_for
from features.store import feature_files, read_meta
from pipeline.config import load_config
from pipeline.paths import Paths
from pipeline.pretraining.pretrain import latest_windows, pretrain
from pipeline.training import loop
from pipeline.training.train import train

# The recipe of main before issue 13 (2026-12-02): random batches of 64, nn.Dropout, validation at 128,
# nn.TransformerEncoderLayer's own forward, a whole batch per step on torch's threads (no step_threads).
# (The length-ordered validation and the inference path of models/sequence.py have no setting: "before"
# gets them too, so the ratio understates the gain by the validation share of an epoch. The loader and
# AdamW's multi-tensor path have none either: "before" runs with FeatureDataset.batch switched off, so
# batches come from `collate` of the items, and with AdamW's per-parameter loop, as they did.)
BEFORE = ["train.batching=random", "train.batch_size=64", "train.lr=5e-4", "train.eval_batch_size=128",
          "pretrain.batching=random", "pretrain.batch_size=64", "pretrain.lr=1e-3", "model.fast_dropout=false",
          "model.encoder_layer=torch", "train.step_threads=1", "pretrain.step_threads=1"]
RECIPES = {"before": BEFORE, "now": []}  # "now": configs/demo.yaml as it is
SPEEDUPS = {"train_step_speedup": "train_step_examples_per_s", "train_speedup": "train_examples_per_s",
            "pretrain_step_speedup": "pretrain_step_windows_per_s", "pretrain_speedup": "pretrain_windows_per_s"}


@contextmanager
def as_before_issue_13(on: bool):
    """While on, loaders build batches as before issue 13 (`collate` of `dataset[i]` items, on the
    training thread, not prefetched) and AdamW updates one parameter at a time (torch's default on
    CPU, `foreach=False`)."""
    batch, make_optimizer, prefetched = FeatureDataset.batch, loop.make_optimizer, loop.prefetched
    if on:
        FeatureDataset.batch = None
        loop.make_optimizer = partial(make_optimizer, foreach=False)
        loop.prefetched = iter
    try:
        yield
    finally:
        FeatureDataset.batch, loop.make_optimizer, loop.prefetched = batch, make_optimizer, prefetched


def run_recipe(name: str, overrides: list[str], demo_workdir: Path, work: Path, epochs: int,
               pretrain_epochs: int, config: str = "configs/demo.yaml") -> dict:
    root = work / name
    root.mkdir(parents=True)
    (root / "features").symlink_to((demo_workdir / "features").resolve(), target_is_directory=True)
    cfg = load_config(config, [f"workdir={root}", f"tracking.uri=sqlite:///{work}/mlflow.db",
                               f"tracking.experiment=bench-{name}", f"train.run_name=bench-{name}",
                               f"train.epochs={epochs}", "train.patience=1000",
                               f"pretrain.epochs={pretrain_epochs}", *overrides])
    files = feature_files(Paths.of(cfg).features)
    data = FeatureDataset(files, model_config_for(cfg.model, read_meta(files[0])))
    windows = len(latest_windows(data, data.select(["train"], labelled=False), cfg.pretrain.max_examples_per_user))
    examples = len(data.select(["train"], user_fraction=cfg.train.label_fraction))
    with as_before_issue_13(name == "before"):
        t = time.perf_counter()
        pre = pretrain(cfg)
        pretrain_s = time.perf_counter() - t
        t = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t
    client = mlflow.MlflowClient(cfg.tracking.uri)

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    val = history(result.run_id, "epoch_val_roc_auc")
    return {"overrides": overrides, "train": {k: getattr(cfg.train, k) for k in ("batching", "batch_size", "lr")},
            "pretrain_windows_per_s": windows * pretrain_epochs / pretrain_s, "pretrain_seconds": pretrain_s,
            "pretrain_step_windows_per_s": float(np.mean(history(pre.run_id, "epoch_windows_per_s"))),
            "train_examples_per_s": examples * epochs / train_s, "train_seconds": train_s,
            "train_step_examples_per_s": float(np.mean(history(result.run_id, "epoch_examples_per_s"))),
            "val_roc_auc_by_epoch": val, "best_val_roc_auc": max(val), "last_val_roc_auc": val[-1]}


def training_recipes(demo_workdir: Path, work: Path, epochs: int, pretrain_epochs: int,
                     config: str = "configs/demo.yaml") -> dict:
    if not (demo_workdir / "features" / "features.h5").exists():
        return {"skipped": f"no demo store at {demo_workdir}/features/features.h5: run `make demo` (or "
                           "`make features`) first"}
    out = {name: run_recipe(name, o, demo_workdir, work, epochs, pretrain_epochs, config) for name, o in RECIPES.items()}
    b, n = out["before"], out["now"]
    for ratio, key in SPEEDUPS.items():
        out[ratio] = n[key] / b[key]
    out["epochs"], out["pretrain_epochs"] = epochs, pretrain_epochs
    return out


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    if "skipped" in r:
        return [("6 training recipes: skipped", r["skipped"], "", "")]
    b, n = r["before"], r["now"]

    def row(label: str, ratio: str) -> tuple[str, str, str, str]:
        key = SPEEDUPS[ratio]
        return label, f"{n[key]:,.1f}", f"{b[key]:,.1f}", f"{r[ratio]:.2f}x"

    return [
        row(f"6 training steps, examples/s ({r['epochs']} epochs)", "train_step_speedup"),
        row("  train() start to end (validation, calibration, predictions, model logging)", "train_speedup"),
        ("  best / last val ROC-AUC", f"{n['best_val_roc_auc']:.4f} / {n['last_val_roc_auc']:.4f}",
         f"{b['best_val_roc_auc']:.4f} / {b['last_val_roc_auc']:.4f}", ""),
        row(f"  pretraining steps, windows/s ({r['pretrain_epochs']} epochs)", "pretrain_step_speedup"),
        row("  pretrain() start to end (held-out evaluation included)", "pretrain_speedup"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.split("\n")[0])
    p.add_argument("--store", default="data/demo", help="the demo workdir (its features/ is used as is)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=1)
    p.add_argument("--out", default="bench-results/recipes.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        r = training_recipes(Path(args.store), Path(work), args.epochs, args.pretrain_epochs)
    out.write_text(json.dumps(r, indent=2, default=float))
    for row in rows(r):
        print("  ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
