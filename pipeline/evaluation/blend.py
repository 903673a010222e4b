"""A blend of the sequence model with gradient boosting (issue 14): the weighted average of
their logits, the weight picked on the validation split, then Platt scaling fitted there too.

Two models that read the same users differently make different mistakes; averaging their
log-odds is the simplest ensemble that can use that, with two numbers learned on validation.
Its validation figures are out of fold (`crossfit_blend`), so they compare fairly with other
models' in the champion gate; with `eval.champion_blend` it competes for the alias as an MLflow
model of its own (pipeline/serving.py: both models and the two numbers in one bundle).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from pipeline.training.calibration import fit_platt, logit_of

WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # the sequence model's share of the logit


def fit_blend(p_model: np.ndarray, p_other: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(weight of the model, Platt scale, Platt bias): the weight maximising validation
    ROC-AUC (ties go to the larger model weight), then the scaling minimising its log loss;
    one class in `y`: (1.0, 1.0, 0.0)."""
    if len(np.unique(y)) < 2:
        return 1.0, 1.0, 0.0
    zm, zo = logit_of(p_model), logit_of(p_other)
    scores = [roc_auc_score(y, w * zm + (1 - w) * zo) for w in WEIGHTS]
    w = float(WEIGHTS[len(WEIGHTS) - 1 - int(np.argmax(scores[::-1]))])
    return (w, *fit_platt(expit(w * zm + (1 - w) * zo), y))


def blend(p_model: np.ndarray, p_other: np.ndarray, weight: float, scale: float, bias: float) -> np.ndarray:
    """p_engaged of the blend (NaN where either input is NaN)."""
    return expit(scale * (weight * logit_of(p_model) + (1 - weight) * logit_of(p_other)) + bias)


def user_folds(groups: np.ndarray, folds: int) -> np.ndarray:
    """A fold in [0, folds) per example, the same for every example of a user (`groups`: user
    keys), users spread over folds by a hash of their number rather than in id order."""
    _, user = np.unique(groups, return_inverse=True)
    return (user.astype(np.int64) * 2654435761 % 2**32) % folds


def crossfit_blend(p_model: np.ndarray, p_other: np.ndarray, y: np.ndarray, groups: np.ndarray,
                   folds: int = 2) -> np.ndarray:
    """Out-of-fold p_engaged of the blend on the validation examples themselves: the examples
    split into `folds` by user (`groups`), each fold blended with the weight and scaling fitted
    on the others. The blend's validation figures (and the champion gate) use these, so the
    weight never scores the examples it was picked on: fitted on all of validation, the blend
    would score at least as well as either model there by construction (the weights 0 and 1
    are candidates)."""
    fold = user_folds(groups, folds)
    out = np.full(len(y), np.nan)
    for k in range(folds):
        held = fold == k
        if held.any():
            out[held] = blend(p_model[held], p_other[held], *fit_blend(p_model[~held], p_other[~held], y[~held]))
    return out
