"""The model registry (DESIGN.md §8): every evaluated model becomes a version of one
registered model; the alias `champion` moves only when a candidate beats the current
champion on the same evaluation examples, and the decision is logged with both figures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from features.dataset import FeatureDataset, collate
from pipeline import loop, tracking
from pipeline.config import Config
from pipeline.metrics import binary_metrics

log = logging.getLogger(__name__)
CHAMPION = "champion"
MODEL_FILE = "model/best.pt"


@dataclass
class GateDecision:
    promoted: bool
    version: str
    candidate: float
    champion: float | None
    champion_version: str | None
    reason: str


def champion_version(cfg: Config):
    """The registered version under the `champion` alias, or None."""
    client = tracking.client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.tracking.model_name, CHAMPION)
    except MlflowException:
        return None


def download_model(cfg: Config, run_id: str) -> Path:
    return tracking.download(run_id, MODEL_FILE, cfg)


def register(cfg: Config, run_id: str):
    """A model version for this run (reused when the run was registered before)."""
    client = tracking.client(cfg)
    name = cfg.tracking.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="P(engaged next week); risk = 1 - p")
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.run_id == run_id:
            return mv
    return client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)


def score_on(cfg: Config, model_path: Path, files: list[Path], rows: np.ndarray) -> np.ndarray:
    """p_engaged of a saved model on given example rows of these feature files."""
    from pipeline.train import load_model

    model, ckpt = load_model(model_path)
    data = FeatureDataset(files, model.config).subset(rows)
    ids, _, p = loop.predict(model, loop.loader(data, 256, collate), next(model.parameters()).device)
    assert np.array_equal(ids, rows)
    return p


def gate(cfg: Config, run_id: str, files: list[Path], split_rows: dict[str, np.ndarray],
         labels: np.ndarray, candidate_p: dict[str, np.ndarray]) -> GateDecision:
    """Register the candidate; move `champion` to it only if it beats the current champion
    on `tracking.promote_metric` (e.g. val_roc_auc) computed on the same examples."""
    split, metric = cfg.tracking.promote_metric.split("_", 1)
    rows = split_rows[split]
    cand = binary_metrics(labels[rows], candidate_p[split])[metric]
    mv = register(cfg, run_id)
    client = tracking.client(cfg)
    current = champion_version(cfg)
    higher_is_better = metric not in ("log_loss", "brier", "ece")
    if current is None:
        decision = GateDecision(True, mv.version, cand, None, None, "no champion yet")
    elif not np.isfinite(cand):
        decision = GateDecision(False, mv.version, cand, None, current.version,
                                f"{cfg.tracking.promote_metric} is undefined on these examples (one class)")
    elif current.run_id == run_id:
        decision = GateDecision(False, mv.version, cand, cand, current.version, "already the champion")
    else:
        try:
            champ_p = score_on(cfg, download_model(cfg, current.run_id), files, rows)
            champ = binary_metrics(labels[rows], champ_p)[metric]
        except (ValueError, RuntimeError, KeyError) as e:  # e.g. a different text encoder width
            champ, reason = float("nan"), f"champion cannot read these features ({str(e).splitlines()[0]})"
        else:
            reason = "candidate is better" if (cand > champ if higher_is_better else cand < champ) else "champion is as good or better"
        better = reason == "candidate is better" or np.isnan(champ)
        decision = GateDecision(better, mv.version, cand, champ, current.version, reason)
    if decision.promoted:
        client.set_registered_model_alias(cfg.tracking.model_name, CHAMPION, mv.version)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"promoted": str(decision.promoted), "gate_reason": decision.reason,
                         "model_version": mv.version, "champion_version_before": str(decision.champion_version)})
        tracking.log_metrics({f"gate_candidate_{cfg.tracking.promote_metric}": cand,
                              f"gate_champion_{cfg.tracking.promote_metric}": decision.champion})
    return decision


def rollback(cfg: Config, version: str) -> None:
    """Point `champion` at an earlier version (the operator's undo)."""
    client = tracking.client(cfg)
    client.get_model_version(cfg.tracking.model_name, version)  # raises if unknown
    client.set_registered_model_alias(cfg.tracking.model_name, CHAMPION, version)
