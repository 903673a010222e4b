"""The model registry (docs/design.md §8): every evaluated model becomes a version of one
registered model; the alias `champion` moves only when a candidate beats the current
champion on the same evaluation examples, and the decision is logged with both figures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from common.errors import UserError
from features.dataset import FeatureDataset, collate
from features.store import StoreMeta, read_meta
from models.checkpoint import load_model
from models.config import ModelConfig
from models.engagement import EngagementModel
from pipeline import tracking
from pipeline.config import Config
from pipeline.evaluation.message_scores import text_misfit
from pipeline.evaluation.metrics import binary_metrics
from pipeline.serving import LOGGED_MODEL_TAG
from pipeline.training import loop

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

    def __post_init__(self) -> None:
        # Plain Python types: numpy's bool_ becomes the truthy string "False" in JSON.
        self.promoted = bool(self.promoted)
        self.version = str(self.version)
        self.candidate = float(self.candidate)
        self.champion = None if self.champion is None else float(self.champion)
        self.champion_version = None if self.champion_version is None else str(self.champion_version)


def champion_version(cfg: Config):
    """The registered version under the `champion` alias, or None."""
    client = tracking.client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.tracking.model_name, CHAMPION)
    except MlflowException:
        return None


def load_champion(cfg: Config):
    """The champion as its MLflow pyfunc model, loaded by alias (what any notebook does)."""
    tracking.setup(cfg)
    try:
        return mlflow.pyfunc.load_model(f"models:/{cfg.tracking.model_name}@{CHAMPION}")
    except MlflowException as e:
        raise UserError(f"the champion of {cfg.tracking.model_name!r} cannot be loaded as an MLflow model "
                        f"({str(e).splitlines()[0]}); a version registered before models were logged holds a "
                        "checkpoint only: train and evaluate again (`make train evaluate`)") from None


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
    # The version is the run's logged pyfunc model (pipeline/serving.py): its signature shows
    # on the version's page and `models:/<name>@champion` loads it.
    model_id = client.get_run(run_id).data.tags.get(LOGGED_MODEL_TAG)
    if model_id is None:  # a run trained before models were logged: its checkpoint only
        log.warning("run %s has no logged MLflow model; its version holds the checkpoint only and cannot be "
                    "loaded with mlflow.pyfunc (train it again to get one)", run_id)
        return client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    # mlflow.register_model also tags the logged model with its versions (the UI's link both ways).
    return mlflow.register_model(f"models:/{model_id}", name)


def misfit(model_config: ModelConfig, meta: StoreMeta) -> str | None:
    """Why a saved model cannot read this feature store, or None. Vocabulary ids the model
    has no row for read as unknown (FeatureDataset._clamp), but the message-vector width
    and the number of dt buckets must be the ones it was trained with."""
    store = meta.sizes()
    keys = (["text_dim"] if "conversation" in model_config.streams else []) + ["n_dt_buckets"]
    diffs = [f"{k} {getattr(model_config, k)} in the model, {store[k]} in the store"
             for k in keys if getattr(model_config, k) != store[k]]
    return "; ".join(diffs) or None


def score_on(model: EngagementModel, files: list[Path], rows: np.ndarray) -> np.ndarray:
    """p_engaged of a model on given example rows of these feature files."""
    data = FeatureDataset(files, model.config).subset(rows)
    ids, _, p = loop.predict(model, loop.loader(data, 256, collate), next(model.parameters()).device)
    assert np.array_equal(ids, rows)
    return p


def _scorer(cfg: Config, version: str):
    """The bundle (pipeline/serving.py: Scorer) of a registered version."""
    return mlflow.pyfunc.load_model(f"models:/{cfg.tracking.model_name}/{version}").unwrap_python_model().scorer


def score_bundle_on(scorer, files: list[Path], rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_engaged of a registered version's bundle (pipeline/serving.py: Scorer) on given example
    rows of these files, as the gate compares it: its gradient boosting on their aggregate columns
    (matched by name), its sequence model, or both blended out of fold on `labels` (of `rows`), as a
    blend candidate is (`crossfit_blend`): its own weight and scaling were fitted on an earlier
    validation split, mostly these users' examples, so scored with them it would read high and the
    gate would lean towards keeping it."""
    from features.dataset import load_examples
    from pipeline.evaluation.blend import crossfit_blend
    from pipeline.evaluation.message_scores import predict_files

    p_model = score_on(scorer.model, files, rows) if scorer.model is not None else None
    if scorer.estimator is None:
        return p_model
    p_estimator = predict_files(scorer.estimator, files, scorer.aggregate_names)[rows]
    if not scorer.blend:
        return p_estimator
    return crossfit_blend(p_model, p_estimator, labels, load_examples(files)[1][rows])


def gate(cfg: Config, run_id: str, files: list[Path], split_rows: dict[str, np.ndarray],
         labels: np.ndarray, candidate_p: dict[str, np.ndarray]) -> GateDecision:
    """Register the candidate; move `champion` to it only if it beats the current champion
    on `tracking.promote_metric` (e.g. val_roc_auc) computed on the same examples.

    Never promotes without a finite champion figure: a champion that cannot read this
    store (another text encoder's width) is kept and the operator told how to move it by
    hand; any other failure while re-scoring it (out of memory, a corrupt checkpoint, an
    unreachable store) propagates, so the job step fails and `champion` stays where it is.
    The decision is logged to the candidate's run before the alias moves."""
    split, metric = cfg.tracking.promote_metric.split("_", 1)
    rows = split_rows[split]
    cand = binary_metrics(labels[rows], candidate_p[split])[metric]
    mv = register(cfg, run_id)
    current = champion_version(cfg)
    higher_is_better = metric not in ("log_loss", "brier", "ece")
    champ: float | None = None
    if current is None:
        promoted, reason = True, "no champion yet"
    elif not np.isfinite(cand):
        promoted, reason = False, f"{cfg.tracking.promote_metric} is undefined on these examples (one class)"
    elif current.run_id == run_id:
        promoted, reason, champ = False, "already the champion", cand
    else:
        # failures propagate: the gate fails, champion stays
        kind = tracking.client(cfg).get_run(current.run_id).data.tags.get("kind")
        if kind in ("baseline", "boosting", "blend"):  # scored through its MLflow model's bundle
            scorer = _scorer(cfg, current.version)
            champion_model = scorer.model  # None for gradient boosting alone
        else:
            scorer, champion_model = None, load_model(download_model(cfg, current.run_id))[0]
        meta = read_meta(files[0])
        why = ((None if champion_model is None else misfit(champion_model.config, meta))
               or (None if scorer is None else text_misfit(scorer.estimator, meta.sizes()["text_dim"])))
        if why:
            promoted = False
            reason = (f"not promoted: champion version {current.version} cannot be compared on these features "
                      f"({why}); to move it by hand: python -m jobs promote --version {mv.version}")
        else:
            p = (score_on(champion_model, files, rows) if scorer is None
                 else score_bundle_on(scorer, files, rows, labels[rows]))
            champ = binary_metrics(labels[rows], p)[metric]
            if not np.isfinite(champ):
                promoted = False
                reason = (f"not promoted: the champion's {cfg.tracking.promote_metric} is undefined on these "
                          f"examples; to move it by hand: python -m jobs promote --version {mv.version}")
            else:
                promoted = bool(cand > champ if higher_is_better else cand < champ)
                reason = "candidate is better" if promoted else "champion is as good or better"
    decision = GateDecision(promoted, mv.version, cand, champ, current.version if current else None, reason)
    if reason.startswith("not promoted"):
        log.warning("champion gate: %s", reason)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"promoted": str(decision.promoted), "gate_reason": decision.reason,
                         "model_version": decision.version, "champion_version_before": str(decision.champion_version)})
        tracking.log_metrics({f"gate_candidate_{cfg.tracking.promote_metric}": cand,
                              f"gate_champion_{cfg.tracking.promote_metric}": decision.champion})
    if decision.promoted:  # last: a failure above leaves the alias where it was
        tracking.client(cfg).set_registered_model_alias(cfg.tracking.model_name, CHAMPION, decision.version)
    return decision


def set_champion(cfg: Config, version: str) -> None:
    """Point `champion` at any registered version by hand: the operator's undo (rollback)
    or a move the gate refused to make (promote)."""
    client = tracking.client(cfg)
    client.get_model_version(cfg.tracking.model_name, version)  # raises if unknown
    client.set_registered_model_alias(cfg.tracking.model_name, CHAMPION, version)
