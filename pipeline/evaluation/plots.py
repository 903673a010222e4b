"""Evaluation plots (docs/design.md §7-§8): PNG files for MLflow, never a window.

Every comparison plot takes `curves = {label: (y_engaged, p_engaged)}` so the sequence
model and the baselines share one figure. Curves about ranking use risk = 1 - p_engaged
and the disengaged class, like pipeline/metrics.py. Each function writes `path` and
returns it as a Path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on servers and in CI without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from pipeline.evaluation.metrics import binary_metrics, calibration_table, lift_curve  # noqa: E402

Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)  # figures are not freed otherwise: one leaks per evaluation
    return path


def _two_classes(y) -> bool:
    return len(np.unique(np.asarray(y))) == 2


def plot_roc(curves: Curves, path, title: str = "ROC") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, p) in curves.items():
        if not _two_classes(y):
            continue  # undefined with one class
        y = np.asarray(y)
        fpr, tpr, _ = roc_curve(y == 0, 1 - np.asarray(p))  # disengaged found vs false alarms
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate (engaged flagged)", ylabel="true positive rate (disengaged found)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(curves: Curves, path, title: str = "Precision-recall (disengaged)") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    base = None
    for label, (y, p) in curves.items():
        if not _two_classes(y):
            continue
        y = np.asarray(y)
        prec, rec, _ = precision_recall_curve(y == 0, 1 - np.asarray(p))
        ap = binary_metrics(y, p)["pr_auc"]
        ax.step(rec, prec, where="post", label=f"{label} (AP {ap:.3f})")
        base = float(np.mean(y == 0))
    if base is not None:
        ax.axhline(base, ls="--", c="grey", lw=1, label=f"disengaged rate {base:.3f}")
    ax.set(xlabel="recall (share of disengaged found)", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_calibration(curves: Curves, path, bins: int = 10, title: str = "Calibration") -> Path:
    """Reliability diagram (observed engaged rate vs mean p per bin) over a histogram of p."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for label, (y, p) in curves.items():
        t = calibration_table(y, p, bins)
        t = t[t["n"] > 0]
        ece = binary_metrics(y, p, bins=bins)["ece"]
        ax.plot(t["mean_p"], t["frac_engaged"], marker="o", label=f"{label} (ECE {ece:.3f})")
        hist.hist(np.asarray(p), bins=np.linspace(0, 1, bins + 1), histtype="step", label=label)
    ax.set(ylabel="observed engaged rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="predicted p(engaged)", ylabel="examples")
    return _save(fig, path)


def plot_lift(curves: Curves, path, top_frac: float = 0.1, title: str = "Who coaches should contact") -> Path:
    """Cumulative gains (left), precision among those contacted (middle) and lift (right)
    when contacting users by decreasing risk, with the best any model could do on the gains."""
    fig, (gain, prec, lift) = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, (y, p) in curves.items():
        c = lift_curve(y, p)
        gain.plot(c["frac"], c["recall"], label=label)
        prec.plot(c["frac"][1:], c["lift"][1:] * np.mean(np.asarray(y) == 0), label=label)
        lift.plot(c["frac"][1:], c["lift"][1:], label=label)
    if curves:
        share = float(np.mean(np.asarray(next(iter(curves.values()))[0]) == 0))  # disengaged share
        if share > 0:
            gain.plot([0, share, 1], [0, 1, 1], ls="-.", c="grey", lw=1, label="best possible")
    gain.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="random")
    lift.axhline(1.0, ls="--", c="grey", lw=1)
    prec.set(ylabel="disengaged share of those contacted", ylim=(0, 1.01), title="precision at k")
    for ax in (gain, prec, lift):
        ax.axvline(top_frac, ls=":", c="black", lw=1)
        ax.set(xlabel="share of users contacted (by risk)", xlim=(0, 1))
    gain.set(ylabel="share of disengaged users found", ylim=(0, 1.01), title=f"{title}: gains")
    lift.set(ylabel="lift (disengaged rate / overall)", title=f"lift (dotted: top {top_frac:.0%})")
    gain.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_attention(maps: list[np.ndarray], tick_labels: list[str], path, title: str = "Attention") -> Path:
    """Attention maps of one example: a grid with one row per layer, one column per head.

    maps: per layer an array (heads, 1+T, 1+T) of attention weights (query rows, key
    columns), position 0 = [CLS]. tick_labels: 1+T names, e.g. ["CLS", "food_log", ...].
    Laid out like the UvA Transformer tutorial's `plot_attention_maps`."""
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    if not maps or any(m.ndim != 3 or m.shape[1:] != (len(tick_labels), len(tick_labels)) for m in maps):
        shapes = [m.shape for m in maps]
        raise ValueError(f"attention maps {shapes} must each be (heads, {len(tick_labels)}, {len(tick_labels)})")
    n_layers, n_heads = len(maps), maps[0].shape[0]
    size = 4 if n_heads == 1 else 3
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(n_heads * size, n_layers * size), squeeze=False)
    step = max(1, len(tick_labels) // 20)  # at most ~20 readable ticks per axis
    ticks = np.arange(0, len(tick_labels), step)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            im = ax.imshow(maps[layer][head], vmin=0, cmap="viridis")
            ax.set_xticks(ticks, [tick_labels[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [tick_labels[i] for i in ticks], fontsize=6)
            ax.set_title(f"Layer {layer + 1}, Head {head + 1}", fontsize=9)
        fig.colorbar(im, ax=axes[layer][-1], fraction=0.046)
    axes[-1][0].set(xlabel="key (attended to)", ylabel="query")
    fig.suptitle(title)
    fig.subplots_adjust(hspace=0.5)
    return _save(fig, path)
