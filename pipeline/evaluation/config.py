"""The evaluation section of the config (`eval`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    top_frac: float = 0.1  # recall / lift at the top 10% riskiest users
    calibration_bins: int = 10
    # The ROC, precision-recall, calibration and lift figures of test and out of time, and the
    # attention maps below (about 2 s an evaluation on 2 cores); false: metrics and runs only.
    plots: bool = True
    attention_users: int = 3  # distinct test users with attention plots, one figure per stream each
    # Also score a blend of the sequence model with a gradient boosting (pipeline/evaluation/blend.py):
    # their logits averaged with a weight, then Platt-scaled, both picked on validation.
    blend: bool = True
    # The blend's gradient boosting: "hgb_text" (with message scores) or "hgb" (aggregates alone);
    # it must be in `baselines`. hgb_text blended best on the demo's validation (docs/results.md).
    blend_with: str = "hgb_text"
    # Gradient boosting (hgb and hgb_text) also competes for the `champion` alias (its run's MLflow
    # model scores raw events like the sequence model; pipeline/serving.py): the best on
    # tracking.promote_metric then serves. Off by default: the champion holds a sequence model.
    champion_hgb: bool = False
    # The blend too (with `blend`): its run then logs an MLflow model holding both models and the
    # two numbers, gated on its out-of-fold validation figure (pipeline/evaluation/blend.py). On by
    # default: it contains the sequence model, and takes the alias only where it beats it.
    champion_blend: bool = True
    # The baselines fitted beside the sequence model on the same examples, and "hgb_text": gradient
    # boosting on the aggregates plus learned scores of the user's recent messages
    # (pipeline/evaluation/message_scores.py), a model of its own rather than a baseline.
    baselines: list[str] = field(
        default_factory=lambda: ["prevalence", "active_last_week", "logistic", "hgb", "hgb_text"]
    )
