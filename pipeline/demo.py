"""`make demo`: the whole pipeline on the simulator (or any config): data -> validate ->
features -> pretrain -> train (from the pretrained encoders) -> evaluate -> compare.
Every stage reuses what is already built for the same inputs, so a re-run is quick.
The model from scratch, label fractions and ablations are `make experiments`, which
reuses the demo's runs: the demo alone stays within 15 minutes on 2 CPU cores."""

from __future__ import annotations

import time

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.fanout import build_shards
from pipeline.evaluation.compare import compare
from pipeline.evaluation.evaluate import evaluate
from pipeline.pretraining.pretrain import pretrain
from pipeline.training.train import train


def _banner(step: int, total: int, title: str) -> None:
    print(f"\n=== [{step}/{total}] {title} " + "=" * max(0, 60 - len(title)), flush=True)


def demo(cfg: Config) -> None:
    started = time.perf_counter()
    total = 5
    _banner(1, total, "data + validation + features")
    build_shards(cfg)  # one store, or every shard of features.num_shards
    _banner(2, total, "pretrain encoders")
    pretrain(cfg)
    _banner(3, total, "train: fine-tune the pretrained encoders, evaluate beside the baselines")
    train(cfg)
    evaluate(cfg)
    _banner(4, total, "compare (read back from MLflow)")
    compare(cfg)
    _banner(5, total, "where to look")
    print(f"finished in {time.perf_counter() - started:.0f}s\n"
          f"  MLflow: `make mlflow-ui`, then http://127.0.0.1:5000 -> experiment '{cfg.tracking.experiment}'"
          f" ({tracking.tracking_uri(cfg)}); runs carry metrics per epoch, plots/ and model/ artifacts\n"
          f"  registered model '{cfg.tracking.model_name}', alias 'champion'\n"
          f"  outputs under {cfg.workdir}/: raw/ validated/ (quarantine.parquet) features/ pretrain/ runs/\n"
          f"  next: `make experiments` adds the model from scratch, 5/20% of the labels, ablations and pooling")
