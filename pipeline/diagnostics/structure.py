"""Checks of structure: an example's logit depends on its own items only, whatever the batch,
the padding or the attention path (train vs eval). The founding bug (a batch mixed into
attention) fails `batch_independence`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from pipeline.diagnostics.batches import batch_size, concat, is_stream, pad_batch, select
from pipeline.diagnostics.common import (
    Batch,
    CheckResult,
    ModelOrFactory,
    eval_logits,
    instance,
    maxdiff,
)


def batch_independence_check(
    model: ModelOrFactory,
    batches: Sequence[Batch],
    atol: float = 1e-4,
    max_alone: int = 16,
    grad_probes: int = 4,
) -> CheckResult:
    """An example's logit must depend on its own inputs and on no other example of its batch
    (eval mode). Forward: compared with the full batch, (a) the batch reversed, (b) each
    example alone (B=1), (c) the second half replaced by other examples. Backward (Karpathy's
    test): for a few probe examples i, d logit_i / d inputs — taken at every float input of
    the batch and at every nn.Embedding output — must be 0 on every other example and
    non-zero on example i's own items.

    Failure usually means: the batch dimension is mixed into attention — exactly the seed's
    bug, (B, T, D) fed to a `batch_first=False` encoder, which attends across users (forward
    differences, `cross_grad` > 0). With [CLS] pooling the same bug shows as `own_grad` = 0
    instead: position 0 of every "sequence" is a [CLS], so [CLS] only ever sees other [CLS]
    vectors, never an item, and the loss sits at ln 2 (the seed's symptom). Other causes:
    normalisation over dim 0, a mask broadcast over the wrong dimension, a detached stream.
    """
    net = instance(model)
    worst = {"reorder": 0.0, "alone": 0.0, "replaced": 0.0, "cross_grad": 0.0}
    own = math.inf
    for k, b in enumerate(batches):
        B = batch_size(b)
        ref = eval_logits(net, b)  # (B,)
        rev = torch.arange(B - 1, -1, -1)
        worst["reorder"] = max(
            worst["reorder"], maxdiff(eval_logits(net, select(b, rev)), ref[rev])
        )
        for i in range(min(B, max_alone)):
            alone = eval_logits(net, select(b, [i]))
            worst["alone"] = max(worst["alone"], maxdiff(alone, ref[i : i + 1]))
        if B >= 2:
            keep = torch.arange(B // 2)
            other = batches[(k + 1) % len(batches)]
            filler = select(other, torch.arange(batch_size(other)).roll(1)[: B - len(keep)])
            mixed = eval_logits(net, concat([select(b, keep), filler]))
            worst["replaced"] = max(worst["replaced"], maxdiff(mixed[: len(keep)], ref[keep]))
        for i in _probes(b, grad_probes):
            own_i, cross_i = _input_gradients(net, b, i)
            own = min(own, own_i)
            worst["cross_grad"] = max(worst["cross_grad"], cross_i)
    figures = dict(worst, own_grad=own if math.isfinite(own) else math.nan)
    passed = all(v <= atol for v in worst.values()) and not own <= 0.0
    detail = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    detail = f"max |Δlogit|: {detail}; min own-input grad {figures['own_grad']:.2e} (atol {atol:g})"
    if own <= 0.0:
        detail += "; a logit does not depend on its own example's items"
    return CheckResult("batch_independence", passed, detail, figures)


def _probes(batch: Batch, n: int) -> list[int]:
    """Up to n examples with at least one item in some stream."""
    has_items = torch.zeros(batch_size(batch), dtype=torch.bool)
    for v in batch.values():
        if is_stream(v):
            has_items |= (~v["padding_mask"]).any(dim=1).cpu()
    return has_items.nonzero().flatten()[:n].tolist()


def _input_gradients(net: nn.Module, batch: Batch, i: int) -> tuple[float, float]:
    """(sum |d logit_i / d x| over example i, max over the other examples), x = every float
    (B, T, ...) input of the batch's streams and every (B, T, D) nn.Embedding output."""
    B = batch_size(batch)
    probed: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        if out.dim() >= 3 and out.shape[0] == B and out.requires_grad:
            out.retain_grad()
            probed.append(out)

    leaves = dict(batch)
    for key, v in batch.items():
        if is_stream(v):
            leaves[key] = {
                f: (t.detach().clone().requires_grad_(True) if t.is_floating_point() else t)
                for f, t in v.items()
            }
            probed += [t for t in leaves[key].values() if t.requires_grad]
    hooks = [m.register_forward_hook(keep) for m in net.modules() if isinstance(m, nn.Embedding)]
    try:
        net.eval()
        with torch.enable_grad():
            logits = net(leaves)[0]  # (B,)
            logits[i].backward()
    finally:
        for h in hooks:
            h.remove()
        net.zero_grad(set_to_none=True)
    others = torch.arange(B) != i
    own, cross = 0.0, 0.0
    for t in probed:
        if t.grad is None:
            continue
        g = t.grad.detach().abs().float()
        own += float(g[i].sum())
        if bool(others.any()):
            cross = max(cross, float(g[others.to(g.device)].max()))
    return own, cross


def padding_invariance_check(
    model: ModelOrFactory,
    batches: Iterable[Batch],
    extra_items: int = 3,
    extra_foods: int = 2,
    atol: float = 1e-4,
) -> CheckResult:
    """Appending padding (more padded columns per stream, more padded foods per meal) must not
    change any logit (eval mode).

    Failure usually means: the padding mask is ignored or inverted (True must mean padding),
    pooling averages over padded positions, positions are counted from the padded end, or a
    sum over foods includes padded ids (EmbeddingBag without padding_idx).
    """
    net = instance(model)
    worst = 0.0
    for b in batches:
        padded = pad_batch(b, extra_items, extra_foods)
        worst = max(worst, maxdiff(eval_logits(net, padded), eval_logits(net, b)))
    return CheckResult(
        "padding_invariance",
        worst <= atol,
        f"max |Δlogit| after +{extra_items} padded items/+{extra_foods} padded foods: "
        f"{worst:.2e} (atol {atol:g})",
        {"max_abs_diff": worst},
    )


def train_eval_agreement_check(
    model: ModelOrFactory, batches: Iterable[Batch], atol: float = 1e-4
) -> CheckResult:
    """With every dropout set to 0, train mode (autograd path) and eval mode under
    inference_mode (the path the model serves; models/sequence.py keeps PyTorch's fused one off) must give the
    same logits.

    Failure usually means: the two attention paths treat the padding mask differently — a
    fully masked row (no [CLS]) gives NaN in one and zeros in the other — or a module behaves
    differently in eval (BatchNorm statistics, a custom `if self.training` branch).
    """
    net = instance(model)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    worst, finite = 0.0, True
    for b in batches:
        net.train()
        with torch.enable_grad():
            train_logits = net(b)[0].detach().float()  # (B,)
        evaluated = eval_logits(net, b)  # (B,)
        finite &= bool(torch.isfinite(train_logits).all() and torch.isfinite(evaluated).all())
        worst = max(worst, maxdiff(train_logits, evaluated))
    return CheckResult(
        "train_eval_agreement",
        finite and worst <= atol,
        f"max |Δlogit| train vs eval (dropout 0): {worst:.2e}, finite={finite} (atol {atol:g})",
        {"max_abs_diff": worst},
    )
