"""`make diagnose`: when a model "learns nothing", say why (the tool the seed's author
needed). Runs the model checks of pipeline/diagnostics.py on real batches of the feature
store, plus facts about the data itself, and prints one verdict per check."""

from __future__ import annotations

import numpy as np
import torch

from features.dataset import FeatureDataset, collate, model_config_for
from features.store import STREAMS, read_meta
from models.engagement import EngagementModel
from pipeline.config import Config
from pipeline.diagnostics import CheckResult, run_diagnostics
from pipeline.errors import UserError
from pipeline.train import feature_files


def data_checks(data: FeatureDataset, rows: np.ndarray, streams: list[str]) -> list[CheckResult]:
    """Share of examples with an empty stream, and how many are cut to max_len."""
    ex = data.examples
    out = []
    for s in streams:
        n = ex[f"{s}_end"][rows] - ex[f"{s}_start"][rows]
        max_len = getattr(data.model, f"max_len_{s}")
        empty, cut = float((n == 0).mean()), float((n > max_len).mean())
        out.append(CheckResult(
            f"data: {s} stream", empty < 0.5,
            f"{empty:.1%} of examples have no {s} items; {cut:.1%} have more than max_len={max_len} "
            f"and see only the latest (longest: {int(n.max()) if len(n) else 0})"
            + ("; most examples are empty: this stream can barely help" if empty >= 0.5 else ""),
        ))
    labels = ex["label"][rows]
    out.append(CheckResult("data: labels", 0.02 < labels.mean() < 0.98,
                           f"{len(rows):,} train examples, engaged rate {labels.mean():.3f}"))
    return out


def diagnose(cfg: Config, n_batches: int = 8, batch_size: int = 32) -> list[CheckResult]:
    files = feature_files(cfg)
    mcfg = model_config_for(cfg.model, read_meta(files[0]))
    data = FeatureDataset(files, mcfg)
    mcfg = data.model  # with the hybrid's aggregate columns
    rows = data.select(["train"])
    if len(rows) < 2 * batch_size:
        raise UserError(f"{files[0]}: only {len(rows)} labelled train examples; diagnose needs {2 * batch_size}")
    rng = np.random.default_rng(cfg.train.seed)
    picked = rng.choice(rows, size=min(len(rows), n_batches * batch_size), replace=False)
    batches = [collate([data[int(i)] for i in picked[j : j + batch_size]]) for j in range(0, len(picked), batch_size)]

    def factory() -> EngagementModel:
        torch.manual_seed(cfg.train.seed)
        return EngagementModel(mcfg)

    streams = [s for s in STREAMS if s in mcfg.streams]
    leak = "conversation" if "conversation" in streams else streams[0]
    results = data_checks(data, rows, streams) + run_diagnostics(factory, batches, leak_stream=leak)
    width = max(len(r.name) for r in results)
    print(f"diagnose {files[0]} ({len(batches)} batches of {batch_size} train examples, streams {'+'.join(streams)})")
    for r in results:
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.detail}")
    failed = [r.name for r in results if not r.passed]
    print("verdict: " + ("every check passed" if not failed else "look at: " + ", ".join(failed)))
    return results
