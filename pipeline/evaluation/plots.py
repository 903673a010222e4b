"""Evaluation plots (docs/design.md §7-§8): PNG files for MLflow, never a window.

Every comparison plot takes `curves = {label: (y_engaged, p_engaged)}` so the sequence
model and the baselines share one figure. Curves about ranking use risk = 1 - p_engaged
and the disengaged class, like pipeline/metrics.py. Each function writes `path` and
returns it as a Path.

Sized to be read where they are looked at: the MLflow UI shows an artifact about 900 px
wide, so a figure stays within ~8 inches at DPI (text of 8 pt and more stays legible),
legends sit beside the axes rather than on the curves, and attention maps thin their tick
labels to what fits.
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


DPI = 110
WIDTH = 8.0  # inches: at DPI, about what the MLflow artifact view shows unscaled
FONT = 8  # points: the smallest text on any figure
LEGEND = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=FONT, frameon=False)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # "tight" keeps the legends beside the axes
    plt.close(fig)  # figures are not freed otherwise: one leaks per evaluation
    return path


def _two_classes(y) -> bool:
    return len(np.unique(np.asarray(y))) == 2


def _colours(curves: Curves) -> dict[str, str]:
    """One colour per label, the same in every panel of a figure."""
    return {label: f"C{i % 10}" for i, label in enumerate(curves)}


def plot_roc(curves: Curves, path, title: str = "ROC") -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for (label, (y, p)), c in zip(curves.items(), _colours(curves).values()):
        if not _two_classes(y):
            continue  # undefined with one class
        y = np.asarray(y)
        fpr, tpr, _ = roc_curve(y == 0, 1 - np.asarray(p))  # disengaged found vs false alarms
        ax.plot(fpr, tpr, c=c, label=f"{label} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="random")
    ax.set(xlabel="false positive rate (engaged flagged)", ylabel="true positive rate (disengaged found)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(**LEGEND)
    return _save(fig, path)


def plot_pr(curves: Curves, path, title: str = "Precision-recall (disengaged)") -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    base = None
    for (label, (y, p)), c in zip(curves.items(), _colours(curves).values()):
        if not _two_classes(y):
            continue
        y = np.asarray(y)
        prec, rec, _ = precision_recall_curve(y == 0, 1 - np.asarray(p))
        ap = binary_metrics(y, p)["pr_auc"]
        ax.step(rec, prec, where="post", c=c, label=f"{label} (AP {ap:.3f})")
        base = float(np.mean(y == 0))
    if base is not None:
        ax.axhline(base, ls="--", c="grey", lw=1, label=f"disengaged rate {base:.3f}")
    ax.set(xlabel="recall (share of disengaged found)", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(**LEGEND)
    return _save(fig, path)


def plot_calibration(curves: Curves, path, bins: int = 10, title: str = "Calibration") -> Path:
    """Reliability diagram (observed engaged rate vs mean p per bin) over a histogram of p."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for (label, (y, p)), c in zip(curves.items(), _colours(curves).values()):
        t = calibration_table(y, p, bins)
        t = t[t["n"] > 0]
        ece = binary_metrics(y, p, bins=bins)["ece"]
        ax.plot(t["mean_p"], t["frac_engaged"], c=c, marker="o", ms=4, label=f"{label} (ECE {ece:.3f})")
        hist.hist(np.asarray(p), bins=np.linspace(0, 1, bins + 1), histtype="step", color=c)
    ax.set(ylabel="observed engaged rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(**LEGEND)
    hist.set(xlabel="predicted p(engaged)", ylabel="examples")
    return _save(fig, path)


def plot_lift(curves: Curves, path, top_frac: float = 0.1, title: str = "Who coaches should contact") -> Path:
    """Cumulative gains (top), precision among those contacted (middle) and lift (bottom)
    when contacting users by decreasing risk, with the best any model could do on the gains;
    one column, so each panel is as wide as the UI shows it."""
    fig, (gain, prec, lift) = plt.subplots(3, 1, figsize=(4.8, 10), sharex=True, gridspec_kw={"hspace": 0.3})
    colours = _colours(curves)
    for label, (y, p) in curves.items():
        c = lift_curve(y, p)
        gain.plot(c["frac"], c["recall"], c=colours[label], label=label)
        prec.plot(c["frac"][1:], c["lift"][1:] * np.mean(np.asarray(y) == 0), c=colours[label])
        lift.plot(c["frac"][1:], c["lift"][1:], c=colours[label])
    if curves:
        share = float(np.mean(np.asarray(next(iter(curves.values()))[0]) == 0))  # disengaged share
        if share > 0:
            gain.plot([0, share, 1], [0, 1, 1], ls="-.", c="grey", lw=1, label="best possible")
    gain.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="random")
    lift.axhline(1.0, ls="--", c="grey", lw=1)
    for ax in (gain, prec, lift):
        ax.axvline(top_frac, ls=":", c="black", lw=1, label=f"top {top_frac:.0%}" if ax is gain else None)
        ax.set(xlim=(0, 1))
    gain.set(ylabel="share of disengaged found", ylim=(0, 1.01), title=f"{title}: gains")
    prec.set(ylabel="disengaged share\nof those contacted", ylim=(0, 1.01), title="precision at k")
    lift.set(ylabel="lift (disengaged rate\n/ overall)", xlabel="share of users contacted (by risk)", title="lift")
    gain.legend(**LEGEND)
    return _save(fig, path)


def _thinned(n: int, length_in: float) -> np.ndarray:
    """Positions of at most one tick label per ~1.6 font heights along an axis of length_in."""
    room = max(1, int(length_in * 72 / (1.6 * FONT)))
    return np.arange(0, n, -(-n // room))


def plot_attention(maps: list[np.ndarray], tick_labels: list[str], path, title: str = "Attention") -> Path:
    """Attention of one example in one stream, sized so that every tick label is legible.

    maps: per layer an array (heads, 1+T, 1+T) of attention weights (query rows, key
    columns), position 0 = [CLS]. tick_labels: 1+T names, e.g. ["CLS", "food_log", ...].
    One row per layer with the weights averaged over its heads (query x key), then one
    panel of what [CLS] (the pooled summary) attends to in every layer and head; all share
    the key axis. The panels grow with T up to the width the UI shows; labels beyond one
    per ~13 points are skipped (every k-th is shown)."""
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    n = len(tick_labels)
    if not maps or any(m.ndim != 3 or m.shape[1:] != (n, n) for m in maps):
        shapes = [m.shape for m in maps]
        raise ValueError(f"attention maps {shapes} must each be (heads, {n}, {n})")
    n_layers, n_heads = len(maps), maps[0].shape[0]
    side = float(np.clip(0.18 * n, 2.5, 5.5))  # inches per square map: every label up to ~30 items
    strip = 0.2 * n_layers * n_heads + 0.3  # the [CLS] rows: one per layer and head
    fig, axes = plt.subplots(n_layers + 1, 1, figsize=(side + 2.5, n_layers * (side + 0.5) + strip + 1.5),
                             sharex=True, gridspec_kw={"height_ratios": [side] * n_layers + [strip]}, squeeze=False,
                             layout="constrained")
    axes = axes[:, 0]
    ticks = _thinned(n, side)
    names = [tick_labels[i] for i in ticks]
    for layer, ax in enumerate(axes[:-1]):
        im = ax.imshow(maps[layer].mean(axis=0), vmin=0, cmap="viridis", aspect="auto")
        ax.set_yticks(ticks, names, fontsize=FONT)
        ax.set_ylabel("query", fontsize=FONT + 1)
        ax.set_title(f"layer {layer + 1}, mean of {n_heads} heads", fontsize=FONT + 1)
        fig.colorbar(im, ax=ax, fraction=0.04).ax.tick_params(labelsize=FONT)
    cls = np.concatenate([m[:, 0, :] for m in maps])  # (layers * heads, 1+T): the [CLS] query row of each head
    im = axes[-1].imshow(cls, vmin=0, cmap="viridis", aspect="auto")
    heads = [f"L{layer + 1} H{head + 1}" for layer in range(n_layers) for head in range(n_heads)]
    axes[-1].set_yticks(np.arange(len(heads)), heads, fontsize=FONT)
    axes[-1].set_title("what [CLS] attends to, per head", fontsize=FONT + 1)
    fig.colorbar(im, ax=axes[-1], fraction=0.04).ax.tick_params(labelsize=FONT)
    axes[-1].set_xticks(ticks, names, rotation=90, fontsize=FONT)
    axes[-1].set_xlabel("key (attended to)", fontsize=FONT + 1)
    fig.suptitle(title)
    return _save(fig, path)
