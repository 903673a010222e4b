"""Baselines the sequence model must beat (docs/design.md §7), on exactly its examples.

Each baseline is fitted on train-split labels only, tuned (where it has a knob) on the
validation split only, and never sees test or out-of-time labels. All of them predict
p(engaged) in [0, 1]; risk of disengaging is 1 - p.

- prevalence: the train engaged rate, for everyone (sklearn's DummyClassifier).
- active_last_week: the analyst's first try: the train engaged rate among examples with /
  without own activity on >= min_active_days distinct days of the last 7 days.
- logistic: signed log1p -> StandardScaler -> LogisticRegression, C picked on val.
- hgb: HistGradientBoostingClassifier, early stopping on a share of train, leaves on val.

The learned ones (logistic, hgb, and hgb_text in message_scores.py) are then Platt-scaled on
the validation split, as the sequence model is (`calibrated`), so every learned model's
calibration is compared after the same step.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from threadpoolctl import threadpool_limits

from common.errors import UserError
from features.aggregates import aggregate_features
from features.store import SPLITS, UNLABELLED, StoreMeta

log = logging.getLogger(__name__)

BASELINES = ("prevalence", "active_last_week", "logistic", "hgb")
LOGISTIC_C = (0.01, 0.1, 1.0, 10.0)
HGB_LEAVES = (7, 31)
TRAIN, VAL = SPLITS.index("train"), SPLITS.index("val")


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """Counts and days are heavy-tailed: compress them (keeping the sign of weight changes)
    so a linear model is not dominated by a few very active users."""
    return np.sign(x) * np.log1p(np.abs(x))


class ActiveLastWeek(ClassifierMixin, BaseEstimator):
    """Two-valued predictor: the train engaged rate of the active / inactive group, where
    active = the `column` (own active days in the last 7 days) >= min_active_days."""

    def __init__(self, column: int = 0, min_active_days: int = 3):
        self.column = column
        self.min_active_days = min_active_days

    def fit(self, X: np.ndarray, y: np.ndarray) -> ActiveLastWeek:
        active = X[:, self.column] >= self.min_active_days
        overall = float(np.mean(y))
        # An empty group (no active train user, say) falls back to the overall rate.
        self.rate_active_ = float(np.mean(y[active])) if active.any() else overall
        self.rate_inactive_ = float(np.mean(y[~active])) if (~active).any() else overall
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = np.where(X[:, self.column] >= self.min_active_days, self.rate_active_, self.rate_inactive_)
        return np.column_stack([1 - p, p])


def predict(fitted, X: np.ndarray) -> np.ndarray:
    """p(engaged) float64 (n,) of one fitted baseline."""
    return fitted.predict_proba(X)[:, 1]


def _score(model, X: np.ndarray, y: np.ndarray) -> float:
    """Validation score, higher is better: ROC-AUC, else minus log loss (one class)."""
    p = predict(model, X)
    if len(np.unique(y)) == 2:
        return roc_auc_score(y, p)
    return -log_loss(y, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1]) if len(y) else 0.0


def tuned(candidates: list, X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, name: str):
    """Fit every candidate on train, keep the best on val (the first when val is empty)."""
    best, best_score = None, -np.inf
    for model in candidates:
        model.fit(X[train], y[train])
        score = _score(model, X[val], y[val]) if val.any() else 0.0
        if score > best_score:
            best, best_score = model, score
    log.info("%s: picked %s (val score %.4f)", name, _knob(best), best_score)
    return best


def calibrated(model, X: np.ndarray, y: np.ndarray, val: np.ndarray):
    """The fitted `model` Platt-scaled on the `val` rows (sklearn's sigmoid calibration of the
    frozen model: a scale and a bias of its decision function), as the sequence model's logit
    is (pipeline/training/calibration.py); its ranking does not change. Without both classes
    on validation, the model as it is."""
    if len(np.unique(y[val])) < 2:
        return model
    return CalibratedClassifierCV(FrozenEstimator(model), method="sigmoid").fit(X[val], y[val])


def _knob(model) -> str:
    params = model.get_params()
    return ", ".join(f"{k}={params[k]}" for k in ("logisticregression__C", "max_leaf_nodes") if k in params)


def fit_baselines(
    X: np.ndarray, y: np.ndarray, split: np.ndarray, names: list[str], which=BASELINES,
    seed: int = 0, min_active_days: int = 3, threads: int | None = None,
) -> dict:
    """Fit the named baselines.

    X: float32 (n, F) aggregate features; y: int (n,) 1 engaged, 0 not, -1 unlabelled;
    split: int (n,) codes of SPLITS. Only train rows with a label fit; only labelled val
    rows tune. threads: cap on OpenMP/BLAS threads (None: the libraries' default); on a
    busy shared machine 1 can be many times faster than spinning threads that wait for
    cores. Returns {name: fitted estimator with predict_proba}.
    """
    with threadpool_limits(threads):
        return _fit(X, np.asarray(y), split, names, which, seed, min_active_days)


def _fit(X, y, split, names, which, seed, min_active_days) -> dict:
    labelled = y != UNLABELLED
    train, val = labelled & (split == TRAIN), labelled & (split == VAL)
    if not train.any():
        raise UserError("no labelled training examples: the train split is empty; check labels.train_frac")
    unknown = set(which) - set(BASELINES)
    if unknown:
        raise UserError(f"unknown baseline(s) {sorted(unknown)}; choose from {list(BASELINES)}")
    two_classes = len(np.unique(y[train])) == 2
    fitted: dict = {}
    for name in which:
        if name in ("logistic", "hgb") and not two_classes:
            raise UserError(f"baseline {name!r}: every training example has the same label; nothing to learn")
        if name == "prevalence":
            fitted[name] = DummyClassifier(strategy="prior").fit(X[train], y[train])
        elif name == "active_last_week":
            col = names.index("active_days_7d")
            fitted[name] = ActiveLastWeek(col, min_active_days).fit(X[train], y[train])
        elif name == "logistic":
            candidates = [
                make_pipeline(FunctionTransformer(signed_log1p), StandardScaler(),
                              LogisticRegression(C=c, max_iter=2000))
                for c in LOGISTIC_C
            ]
            fitted[name] = calibrated(tuned(candidates, X, y, train, val, name), X, y, val)
        elif name == "hgb":
            fitted[name] = calibrated(tuned(hgb_candidates(seed), X, y, train, val, name), X, y, val)
    return fitted


def hgb_candidates(seed: int = 0) -> list:
    """Gradient boosting's candidates, one per number of leaves, early stopping on a share of train."""
    return [
        HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=500, max_leaf_nodes=leaves, early_stopping=True,
            validation_fraction=0.15, n_iter_no_change=20, random_state=seed,
        )
        for leaves in HGB_LEAVES
    ]


def split_rows(examples: dict, split_name: str) -> np.ndarray:
    """Labelled example rows of one split, in store order: the rows the sequence model is
    evaluated on (`FeatureDataset.select([split])`), so predictions line up one to one."""
    code = SPLITS.index(split_name)
    return np.flatnonzero((examples["split"] == code) & (examples["label"] != UNLABELLED))


def run_baselines(
    arrays: dict, meta: StoreMeta, which=BASELINES, seed: int = 0, threads: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Build the aggregate features once, fit every baseline, predict every split.

    Returns {baseline: {split: p_engaged float64 (n_split,)}} aligned with
    `split_rows(arrays["examples"], split)`."""
    ex = arrays["examples"]
    X, names = aggregate_features(arrays, meta)
    min_days = meta.config.get("labels", {}).get("min_active_days", 3)
    fitted = fit_baselines(X, ex["label"], ex["split"], names, which, seed, min_days, threads)
    rows = {s: split_rows(ex, s) for s in SPLITS}
    return {name: {s: predict(m, X[r]) if len(r) else np.zeros(0) for s, r in rows.items()} for name, m in fitted.items()}
