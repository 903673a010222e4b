"""Evaluation metrics (docs/design.md §7) for every model and baseline alike.

Inputs are always y_engaged (1 engaged next week, 0 not) and p_engaged. The business acts
on the disengaged: risk = 1 - p_engaged, and coaches contact the top `top_frac` by risk,
so PR-AUC, recall and lift are computed for the disengaged class. Ties in risk (a constant
or two-valued baseline) are counted as if broken at random, in expectation, so a constant
predictor gets recall = top_frac and lift = 1 rather than whatever the row order gives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] for log loss
BOOT_CELLS = 2_000_000  # example weights held at once by `paired_auc_difference` (16 MB each array)


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(np.int64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y has {len(y)} values, p has {len(p)}: they must be the same examples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must be 0/1 (drop unlabelled examples, label -1, before evaluating)")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be probabilities in [0, 1] without NaN")
    return y, p


def binary_metrics(y_engaged: np.ndarray, p_engaged: np.ndarray, top_frac: float = 0.1, bins: int = 10) -> dict:
    """Every metric of one model on one split.

    y_engaged: (n,) 0/1; p_engaged: (n,) in [0, 1]. Returns floats: roc_auc, pr_auc (average
    precision of the disengaged by risk), log_loss, brier, ece (equal-width bins, weighted
    by bin size), recall_at_top (share of all disengaged found in the top `top_frac` by
    risk), precision_at_top (the disengaged share of that top), recall_at_top_of_max
    (recall_at_top / the most any model can reach there, min(1, k / disengaged): it stays
    informative when the disengaged are the majority and recall_at_top is capped near
    top_frac / their share for every model), lift_at_top (precision_at_top / the overall
    disengaged rate), prevalence (engaged rate), n. Ranking metrics are NaN when only one
    class is present; all are NaN when n = 0.
    """
    y, p = _check(y_engaged, p_engaged)
    n = len(y)
    out = dict.fromkeys(
        ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "recall_at_top", "precision_at_top", "recall_at_top_of_max",
         "lift_at_top", "prevalence"), float("nan")
    )
    out["n"] = n
    if n == 0:
        return out
    both = len(np.unique(y)) == 2
    disengaged = y == 0
    out["roc_auc"] = float(roc_auc_score(y, p)) if both else float("nan")  # same for risk vs disengaged
    out["pr_auc"] = float(average_precision_score(disengaged, 1 - p)) if both else float("nan")
    out["log_loss"] = float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))
    out["brier"] = float(brier_score_loss(y, p, pos_label=1))
    out["ece"] = expected_calibration_error(y, p, bins)
    out["prevalence"] = float(y.mean())
    if disengaged.any():
        curve = lift_curve(y, p)
        k, d = _top_k(n, top_frac), int(disengaged.sum())
        recall = float(np.interp(k / n, curve["frac"], curve["recall"]))
        out["recall_at_top"] = recall
        out["precision_at_top"] = recall * d / k
        out["recall_at_top_of_max"] = recall / min(1.0, k / d)
        out["lift_at_top"] = recall / (k / n)
    return out


def _top_k(n: int, top_frac: float) -> int:
    """How many users coaches contact: the top `top_frac`, at least one."""
    return max(1, int(np.ceil(top_frac * n - 1e-9)))


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-width bins of p_engaged over [0, 1] (p = 1 falls in the last bin).

    Columns: bin_lo, bin_hi, n, mean_p (mean predicted), frac_engaged (observed); the
    means are NaN for empty bins."""
    y, p = _check(y, p)
    b = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    n = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=bins) / n
        frac = np.bincount(b, weights=y, minlength=bins) / n
    edges = np.linspace(0.0, 1.0, bins + 1)
    return pd.DataFrame({"bin_lo": edges[:-1], "bin_hi": edges[1:], "n": n, "mean_p": mean_p, "frac_engaged": frac})


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """sum over bins of n_b / n * |observed engaged rate - mean predicted p| (empty bins 0)."""
    t = calibration_table(y, p, bins)
    if t["n"].sum() == 0:
        return float("nan")
    gap = (t["frac_engaged"] - t["mean_p"]).abs().fillna(0.0)
    return float((t["n"] * gap).sum() / t["n"].sum())


def lift_curve(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Cumulative gains when contacting users by decreasing risk (1 - p).

    Returns frac (share of users contacted, from 0 to 1), recall (share of all disengaged
    found) and lift (recall / frac; NaN at frac 0). Points sit at the end of each group of
    tied risks, so linear interpolation between them is the expectation under random
    tie-breaking. recall is NaN everywhere when nobody is disengaged."""
    y, p = _check(y, p)
    n = len(y)
    order = np.argsort(p, kind="stable")  # highest risk first
    hits = np.cumsum(y[order] == 0)
    ends = np.r_[np.flatnonzero(np.diff(p[order]) != 0), n - 1] if n else np.zeros(0, np.int64)
    frac = np.r_[0.0, (ends + 1) / max(n, 1)]
    total = hits[-1] if n else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.r_[0.0, hits[ends]] / total if total else np.full(len(frac), np.nan)
        lift = np.where(frac > 0, recall / frac, np.nan)
    return {"frac": frac, "recall": recall, "lift": lift}


def weighted_roc_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of p for y (0/1) under each row of `weights` (B, n): example i counts weights[b, i]
    times, ties count half (as `roc_auc_score` with sample_weight). One sort for all B rows:
    per group of tied scores, the positive weight times the negative weight below it plus half
    the tied negatives. (B,) float64; NaN where a row leaves one class no weight."""
    y, p = _check(y, p)
    order = np.argsort(p, kind="stable")
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, order]
    pos = np.where(y[order] == 1, w, 0.0)
    neg = w - pos
    starts = np.r_[0, np.flatnonzero(np.diff(p[order]) != 0) + 1]  # first row of each tie group
    pos_g, neg_g = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    below = np.cumsum(neg_g, axis=1) - neg_g  # negative weight strictly below each group
    pairs = pos_g.sum(1) * neg_g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos_g * (below + 0.5 * neg_g)).sum(1) / pairs, np.nan)


def paired_auc_difference(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, groups: np.ndarray,
                          n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """ROC-AUC of `p_a` minus that of `p_b` on the same examples, with a `level` interval from a
    paired bootstrap that resamples users (`groups`), not examples: a user's weekly examples are
    alike, so resampling examples would understate how much the figure moves with who is in the
    split. Every resample scores both models on the same users (with `seed`, the same resamples
    for every pair). Returns diff, lo, hi and share_not_above (the share of resamples where a is
    not above b)."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_users = int(inverse.max()) + 1 if len(inverse) else 0
    diff = float(weighted_roc_auc(y, p_a, np.ones(len(y)))[0] - weighted_roc_auc(y, p_b, np.ones(len(y)))[0])
    unknown = {"diff": diff, "lo": float("nan"), "hi": float("nan"), "share_not_above": float("nan")}
    if n_users < 2 or not np.isfinite(diff):
        return unknown
    rng, parts = np.random.default_rng(seed), []
    chunk = max(1, BOOT_CELLS // len(y))  # resamples at a time: memory stays near BOOT_CELLS weights
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=min(chunk, n_boot - start))
        weights = counts[:, inverse.ravel()]  # (b, n): each example as often as its user was drawn
        parts.append(weighted_roc_auc(y, p_a, weights) - weighted_roc_auc(y, p_b, weights))
    d = np.concatenate(parts)
    d = d[np.isfinite(d)]  # a resample left with one class has no AUC
    if not len(d):
        return unknown
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "share_not_above": float(np.mean(d <= 0))}
