"""Distillation from gradient boosting (`train.distill`, docs/evaluation.md#distillation): the
sequence model's training targets become (1 - w) * label + w * p_teacher, where p_teacher is
gradient boosting's probability (`train.distill_from`: `hgb_text` or `hgb`) for that example.

Why: the network overfits its 1,410 demo training users by the third epoch, while gradient
boosting on the aggregates and message scores ranks them better; its probabilities are a softer,
less noisy target than the coin-flip labels (knowledge distillation, Hinton et al. 2015), and
the student still reads only the raw sequences at scoring time.

No leak: a training example's p_teacher comes from a gradient boosting fitted on the other folds
of the training users (5 folds by user), never one that saw its user; only the training rows the
run trains on are fitted (with `train.label_fraction`, that fraction's users only), their leaves
picked on validation as the baselines' are. Validation, test and out-of-time labels stay the
labels. Fitted once per feature build, code, teacher and training users, then read back
(`<features>/teacher-*.npy`).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from common.errors import UserError
from common.files import atomic_path
from features.aggregates import aggregates_of
from features.dataset import load_examples
from features.store import SPLITS, build_id
from pipeline.evaluation import baselines, message_scores
from pipeline.evaluation.blend import user_folds

TEACHERS = ("hgb_text", "hgb")
FOLDS = 5
TRAIN, HELD_OUT = SPLITS.index("train"), SPLITS.index("test")  # held-out folds sit outside the train split


def teacher_probabilities(files: list[Path], rows: np.ndarray, teacher: str = "hgb_text", seed: int = 0,
                          cache_dir: Path | None = None) -> np.ndarray:
    """p_engaged (n_examples,) float64 of `teacher` for the training `rows` (global example rows),
    each from a fit on the other folds of those rows' users; NaN elsewhere."""
    if teacher not in TEACHERS:
        raise UserError(f"train.distill_from={teacher!r}: one of {list(TEACHERS)}")
    key = hashlib.sha256(np.sort(rows).astype(np.int64).tobytes() + f"{teacher}-{seed}".encode()).hexdigest()[:10]
    code = message_scores.code_digest(sys.modules[__name__])
    cache = cache_dir / f"teacher-{build_id(files)}-{code}-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    examples, user_key, _ = load_examples(files)
    y, split = examples["label"], examples["split"]
    X, names = aggregates_of(files)
    msgs = message_scores.recent_user_messages(files) if teacher == message_scores.NAME else None
    fold = user_folds(user_key, FOLDS)
    p = np.full(len(y), np.nan)
    outside = np.where(split == TRAIN, HELD_OUT, split)  # every training row out; each fit puts back the other folds of `rows`
    with threadpool_limits(1):  # small fits: BLAS threads beside torch's only wait (docs/benchmarks.md)
        for k in range(FOLDS):
            held = rows[fold[rows] == k]
            if not len(held):
                continue
            fit_split = outside.copy()
            fit_split[rows[fold[rows] != k]] = TRAIN
            if msgs is None:
                model = baselines.fit_baselines(X, y, fit_split, names, ["hgb"], seed=seed)["hgb"]
                p[held] = baselines.predict(model, X[held])
            else:
                model = message_scores.MessageScoredHGB(seed).fit(X, msgs, y, fit_split, user_key)
                p[held] = model.predict_proba(X, msgs)[held, 1]
    if cache is not None:  # atomically: DDP ranks may write it side by side
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, p)
    return p


def soft_targets(labels: np.ndarray, rows: np.ndarray, p_teacher: np.ndarray, weight: float) -> np.ndarray:
    """float32 (n_examples,): the labels, with (1 - weight) * label + weight * p_teacher on `rows`."""
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"train.distill={weight}: a weight in [0, 1]")
    out = labels.astype(np.float64)
    out[rows] = (1.0 - weight) * labels[rows] + weight * p_teacher[rows]
    return out.astype(np.float32)
