"""Checks that catch the founding bug class (docs/design.md §5: a (batch, seq, dim) tensor fed to a
(seq, batch, dim) encoder; the loss sat at ln 2 and nothing crashed).

Every check is a pure function of a model (or a zero-argument factory returning a fresh
one) and batches in the collate contract (dicts of batch-first tensors, `label` (B,) float,
padding masks True = padding). A model passed as an instance is deep-copied before anything
trains or changes it. Each returns a `CheckResult(name, passed, detail, figures)`.

The model interface assumed is the project's: `logits, loss = model(batch, labels)` with
logits (B,). `run_diagnostics` runs them all; tests/test_models.py runs them on random
batches, `python -m pipeline diagnose` on real ones.

Modules: `common` (CheckResult), `batches` (select / pad / concatenate batches),
`structure` (batch independence, padding invariance, train/eval agreement), `learning`
(init loss, gradient norms, overfit one batch, leaked label), `suite` (run_diagnostics).
"""

from pipeline.diagnostics.batches import batch_size, concat, pad_batch, select
from pipeline.diagnostics.common import Batch, CheckResult, ModelOrFactory
from pipeline.diagnostics.learning import (
    grad_norm_check,
    init_loss_check,
    leak_label,
    leaked_label_check,
    overfit_one_batch_check,
)
from pipeline.diagnostics.structure import (
    batch_independence_check,
    padding_invariance_check,
    train_eval_agreement_check,
)
from pipeline.diagnostics.suite import run_diagnostics

__all__ = [
    "Batch",
    "CheckResult",
    "ModelOrFactory",
    "batch_independence_check",
    "batch_size",
    "concat",
    "grad_norm_check",
    "init_loss_check",
    "leak_label",
    "leaked_label_check",
    "overfit_one_batch_check",
    "pad_batch",
    "padding_invariance_check",
    "run_diagnostics",
    "select",
    "train_eval_agreement_check",
]
