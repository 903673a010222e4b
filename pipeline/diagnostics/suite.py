"""`run_diagnostics`: every check, each on a fresh model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pipeline.diagnostics.common import Batch, CheckResult
from pipeline.diagnostics.learning import (
    grad_norm_check,
    init_loss_check,
    leaked_label_check,
    overfit_one_batch_check,
)
from pipeline.diagnostics.structure import (
    batch_independence_check,
    padding_invariance_check,
    train_eval_agreement_check,
)


def run_diagnostics(
    model_factory: Callable[[], nn.Module],
    batches: Sequence[Batch],
    leak_stream: str | None = "conversation",
    leak_steps: int = 300,
    overfit_steps: int = 200,
    start_prevalence: float | None = None,
) -> list[CheckResult]:
    """Every check on one fresh model per check. `batches` needs >= 2 batches (the leaked
    label is trained on all but the last quarter and measured on the rest);
    `start_prevalence` is the output bias the factory sets (see `init_loss_check`)."""
    if len(batches) < 2:
        raise ValueError("run_diagnostics needs at least 2 batches (one is held out)")
    results = [
        init_loss_check(model_factory, batches, start_prevalence=start_prevalence),
        batch_independence_check(model_factory, batches),
        padding_invariance_check(model_factory, batches),
        train_eval_agreement_check(model_factory, batches),
        grad_norm_check(model_factory, batches[0]),
        overfit_one_batch_check(model_factory, batches[0], steps=overfit_steps),
    ]
    if leak_stream is not None:
        cut = max(1, len(batches) * 3 // 4)
        results.append(
            leaked_label_check(
                model_factory, batches[:cut], batches[cut:], leak_stream, steps=leak_steps
            )
        )
    return results
