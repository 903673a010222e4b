"""Checks of learning: the loss starts where a model that knows nothing would, every part of
the model gets a gradient, one batch can be memorised, and a label leaked into an input is
found."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diagnostics.batches import batch_size
from pipeline.diagnostics.common import Batch, CheckResult, ModelOrFactory, eval_logits, instance


def _cross_entropy(p: float, q: float) -> float:
    """Mean BCE of labels with prevalence p against the constant prediction q (nats);
    q = p gives the label entropy, q = 0.5 gives ln 2 whatever p is."""
    q = min(max(q, 1e-12), 1 - 1e-12)
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def init_loss_check(
    model: ModelOrFactory,
    batches: Iterable[Batch],
    tolerance: float = 0.1,
    start_prevalence: float | None = None,
) -> CheckResult:
    """Loss of an untrained model (eval mode) vs the loss of a model that knows nothing: the
    cross-entropy of the labels against the constant probability the model starts at.
    `start_prevalence` is that probability — the prevalence its output bias was set to
    (`set_output_bias`, as train.py does with the train prevalence); None means the batches'
    own prevalence, so the reference is the label entropy. A head whose bias was left at 0
    starts at 0.5: pass 0.5 and the reference is ln 2 = 0.693 whatever the labels.
    Passes when |loss - reference| <= tolerance nats.

    Failure usually means: loss far above the reference — over-confident logits at init
    (inputs not normalised, an output layer initialised large) or an output bias that is not
    the one claimed; below it — the label reaches the inputs, or the loss is computed on the
    wrong tensors. A loss that then *stays* at the reference during training is the founding
    bug's symptom (ln 2 for its balanced labels): the next checks find its cause.
    """
    net = instance(model)
    total, n, positives = 0.0, 0, 0.0
    with torch.inference_mode():
        net.eval()
        for b in batches:
            logits, _ = net(b)  # the label's loss alone, whatever auxiliary losses the model adds
            loss = F.binary_cross_entropy_with_logits(logits, b["label"].to(logits.dtype))
            total += float(loss) * batch_size(b)
            n += batch_size(b)
            positives += float(b["label"].sum())
    loss, prevalence = total / n, positives / n
    start = prevalence if start_prevalence is None else float(start_prevalence)
    expected = _cross_entropy(prevalence, start)
    why = "the label entropy" if start_prevalence is None else "the start set by the output bias"
    return CheckResult(
        "init_loss",
        abs(loss - expected) <= tolerance,
        f"loss at init {loss:.4f} vs {expected:.4f} expected of a model that knows nothing: labels "
        f"at prevalence {prevalence:.3f} ({n} examples) predicted at {start:.3f}, {why} "
        f"(tolerance {tolerance})",
        {
            "loss": loss,
            "expected": expected,
            "entropy": _cross_entropy(prevalence, prevalence),
            "prevalence": prevalence,
            "start_prevalence": start,
        },
    )


def grad_norm_check(model: ModelOrFactory, batch: Batch) -> CheckResult:
    """One backward pass: the gradient norm of every parameter group (each encoder, the head)
    and of every [CLS] vector must be finite and > 0.

    Failure usually means: a zero group — an encoder whose output never reaches the loss
    (wrong key, a `.detach()`, a stream silently skipped) or a [CLS] vector never read
    (pooling from the wrong index); non-finite — a fully masked attention row (NaN) or
    exploding inputs. Parameters that get no gradient at all count as zero for their group
    and are listed (DistributedDataParallel refuses them too).
    """
    net = instance(model)
    net.train()
    net.zero_grad(set_to_none=True)
    _, loss = net(batch, batch["label"])
    loss.backward()
    groups: dict[str, float] = {}
    no_grad: list[str] = []
    finite = True
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        sq = 0.0  # no gradient at all counts as a zero norm for its group
        if p.grad is None:
            no_grad.append(name)
        else:
            finite &= bool(torch.isfinite(p.grad).all())
            sq = float(p.grad.float().pow(2).sum())
        key = _group(name)
        groups[key] = groups.get(key, 0.0) + sq
        if name == "cls" or name.endswith(".cls"):
            groups[name] = sq
    norms = {k: math.sqrt(v) for k, v in groups.items()}
    bad = [k for k, v in norms.items() if not (v > 0 and math.isfinite(v))]
    passed = finite and not bad and bool(norms)
    detail = ", ".join(f"{k} {v:.2e}" for k, v in norms.items())
    if bad:
        detail += f"; zero or non-finite: {bad}"
    if no_grad:
        more = f" and {len(no_grad) - 5} more" if len(no_grad) > 5 else ""
        detail += f"; no gradient: {no_grad[:5]}{more}"
    return CheckResult("grad_norm", passed, f"grad norms: {detail}", norms)


def _group(name: str) -> str:
    """`encoders.food.encoder.transformer...` -> `encoders.food`; `head.1.weight` -> `head`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "encoders" and len(parts) > 2 else parts[0]


def overfit_one_batch_check(
    model: ModelOrFactory,
    batch: Batch,
    steps: int = 200,
    lr: float = 3e-3,
    max_loss: float = 0.05,
) -> CheckResult:
    """`steps` of Adam on one batch must drive its loss (eval mode) below `max_loss`.

    Failure usually means: the inputs cannot reach the output (the seed's mixed batch, a
    detached tensor, a mask hiding every item), a learning rate far off, frozen parameters,
    or labels misaligned with examples.
    """
    net = instance(model)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    first = None
    for _ in range(steps):
        net.train()
        _, loss = net(batch, batch["label"])
        first = float(loss.detach()) if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.inference_mode():
        net.eval()
        final = float(net(batch, batch["label"])[1])
    return CheckResult(
        "overfit_one_batch",
        final <= max_loss,
        f"loss {first:.4f} -> {final:.4f} after {steps} Adam steps (lr {lr:g}, "
        f"{time.perf_counter() - start:.1f}s; need <= {max_loss})",
        {"initial_loss": first or math.nan, "final_loss": final},
    )


def leak_label(batch: Batch, stream: str = "conversation", scale: float = 1.0) -> Batch:
    """A copy of `batch` with its label written into one input feature of `stream`, at every
    valid item: conversation — message-vector dimension 0 = ±scale; events — value = ±scale
    (has_value = 1); food — the meal slot (2 + label)."""
    out = dict(batch)
    s = {k: v.clone() for k, v in batch[stream].items()}
    valid = ~s["padding_mask"]  # (B, T)
    sign = (batch["label"] * 2 - 1).to(torch.float32)[:, None].expand_as(valid)  # (B, T)
    if stream == "conversation":
        s["embedding"][..., 0] = torch.where(valid, sign * scale, s["embedding"][..., 0])
    elif stream == "events":
        s["value"] = torch.where(valid, sign * scale, s["value"])
        s["has_value"] = torch.where(valid, torch.ones_like(s["has_value"]), s["has_value"])
    elif stream == "food":
        slot = (batch["label"].long() + 2)[:, None].expand_as(valid)  # (B, T)
        s["meal"] = torch.where(valid, slot, s["meal"])
    else:
        raise ValueError(f"no label leak defined for stream {stream!r}")
    out[stream] = s
    return out


def coin_labels(batch: Batch, g: torch.Generator) -> Batch:
    """A copy of `batch` with fair coin flips for labels: once leaked, the leak is then the
    only thing that predicts them. (With the real labels the other features predict them in
    part, and a model fitting a few batches could lean on those for the rarer class and miss
    it on held-out examples, failing a sound model on some seeds.)"""
    return dict(batch) | {"label": torch.randint(0, 2, batch["label"].shape, generator=g).to(batch["label"].dtype)}


def leak_level(batches: Sequence[Batch], stream: str) -> float:
    """The magnitude `leak_label` writes: 1 + twice the largest magnitude the leaked feature
    takes on a valid item of `batches`, so no real value can pass for a leaked one (the
    message vectors of a small test encoder reach 0.8 in a dimension where ±1 drowned; a
    sentence encoder's unit vectors stay near 0.05). 1 for the food stream's categorical slot."""
    key = {"conversation": "embedding", "events": "value"}.get(stream)
    if key is None:
        return 1.0
    top = 0.0
    for b in batches:
        values = b[stream][key][..., 0] if key == "embedding" else b[stream][key]  # (B, T)
        valid = ~b[stream]["padding_mask"]  # (B, T)
        if valid.any():
            top = max(top, float(values[valid].abs().max()))
    return 1.0 + 2.0 * top


def leaked_label_check(
    model_factory: Callable[[], nn.Module],
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    stream: str = "conversation",
    steps: int = 300,
    lr: float = 1e-3,
    min_accuracy: float = 0.98,
) -> CheckResult:
    """Replace the labels by coin flips (`coin_labels`) and write them into one input feature
    of `stream` (`leak_label`), train a fresh model
    `steps` Adam steps on `train_batches` (at a magnitude no real value of the feature
    reaches, `leak_level`), and measure accuracy on *other* examples
    (`eval_batches`, also leaked) that have at least one `stream` item: it must be ~100%.
    Held-out examples matter: a small model can memorise random labels of its training set.

    Failure usually means: the feature cannot reach [CLS] — the seed's bug (its leaked
    0.01s never moved the loss from ln 2), items masked as padding, [CLS] read from the wrong
    position — or the stream is not wired into the model at all.
    """
    net = model_factory()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    level = leak_level([*train_batches, *eval_batches], stream)
    g = torch.Generator().manual_seed(0)
    train_batches, eval_batches = ([coin_labels(b, g) for b in bs] for bs in (train_batches, eval_batches))
    leaked = [leak_label(b, stream, level) for b in train_batches]
    start = time.perf_counter()
    loss = torch.tensor(math.nan)
    for step in range(steps):
        net.train()
        b = leaked[step % len(leaked)]
        _, loss = net(b, b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    correct, seen = 0, 0
    for b in eval_batches:
        has_item = (~b[stream]["padding_mask"]).any(dim=1)  # (B,)
        pred = eval_logits(net, leak_label(b, stream, level)) > 0  # (B,)
        correct += int(((pred == (b["label"] > 0.5)) & has_item).sum())
        seen += int(has_item.sum())
    acc = correct / max(seen, 1)
    return CheckResult(
        "leaked_label",
        seen > 0 and acc >= min_accuracy,
        f"label leaked into {stream}: held-out accuracy {acc:.3f} on {seen} examples with a "
        f"{stream} item after {steps} steps (final train loss {float(loss.detach()):.4f}, "
        f"{time.perf_counter() - start:.1f}s; need >= {min_accuracy})",
        {"accuracy": acc, "examples": seen, "final_train_loss": float(loss.detach())},
    )
