"""A blend of the sequence model with gradient boosting (issue 14): the weighted average of
their logits, the weight picked on the validation split, then Platt scaling fitted there too.

Two models that read the same users differently make different mistakes; averaging their
log-odds is the simplest ensemble that can use that, with two numbers learned on validation
(so the blend's validation figures are in-sample; its test and out-of-time figures are not).
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
