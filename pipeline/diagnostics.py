"""Checks that catch the founding bug class (seeds/003: a (batch, seq, dim) tensor fed to a
(seq, batch, dim) encoder; the loss sat at ln 2 and nothing crashed).

Every check is a pure function of a model (or a zero-argument factory returning a fresh
one) and batches in the collate contract (dicts of batch-first tensors, `label` (B,) float,
padding masks True = padding). A model passed as an instance is deep-copied before anything
trains or changes it. Each returns a `CheckResult(name, passed, detail, figures)`.

The model interface assumed is the project's: `logits, loss = model(batch, labels)` with
logits (B,). `run_diagnostics` runs them all; tests/test_models.py runs them on random
batches, `python -m pipeline diagnose` on real ones.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = dict[str, Any]
ModelOrFactory = nn.Module | Callable[[], nn.Module]


@dataclass
class CheckResult:
    """`passed` False = FAIL: something is broken. `warn` marks a passed check whose figures
    deserve a look (a trade-off, not a bug): verdict WARN."""

    name: str
    passed: bool
    detail: str
    figures: dict[str, float] = field(default_factory=dict)
    warn: bool = False

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.passed else "WARN" if self.warn else "PASS"

    def __str__(self) -> str:
        return f"[{self.verdict}] {self.name}: {self.detail}"


# -- batch plumbing (the collate contract: every tensor is batch-first) -----------------------


def select(batch: Batch, index: Sequence[int] | torch.Tensor) -> Batch:
    """The examples `index` of a batch, in that order (every tensor indexed on dim 0)."""
    index = torch.as_tensor(index, dtype=torch.long)
    out: Batch = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = select(v, index)
        elif isinstance(v, torch.Tensor):
            out[k] = v.index_select(0, index.to(v.device))
        else:
            out[k] = v
    return out


def _pad_stream(s: dict[str, torch.Tensor], T: int, M: int | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in s.items():
        pad_t = T - v.shape[1]
        if k == "padding_mask":
            out[k] = torch.cat([v, v.new_ones(v.shape[0], pad_t)], dim=1)  # (B, T) True = pad
            continue
        if k == "food_ids" and M is not None and M > v.shape[2]:
            v = torch.cat([v, v.new_zeros(*v.shape[:2], M - v.shape[2])], dim=2)  # (B, T0, M)
        out[k] = torch.cat([v, v.new_zeros(v.shape[0], pad_t, *v.shape[2:])], dim=1)  # (B, T, ...)
    return out


def _is_stream(v: Any) -> bool:
    return isinstance(v, dict) and "padding_mask" in v


def pad_batch(batch: Batch, extra_items: int = 3, extra_foods: int = 2) -> Batch:
    """Append `extra_items` fully padded columns to every stream (and `extra_foods` padded
    foods to every meal): the same examples, only more padding."""
    out = dict(batch)
    for k, v in batch.items():
        if _is_stream(v):
            T = v["padding_mask"].shape[1] + extra_items
            M = v["food_ids"].shape[2] + extra_foods if "food_ids" in v else None
            out[k] = _pad_stream(v, T, M)
    return out


def concat(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along the batch dim, padding streams to a common T (and M)."""
    first = batches[0]
    out: Batch = {}
    for k, v in first.items():
        if _is_stream(v):
            parts = [b[k] for b in batches]
            T = max(p["padding_mask"].shape[1] for p in parts)
            M = max(p["food_ids"].shape[2] for p in parts) if "food_ids" in v else None
            parts = [_pad_stream(p, T, M) for p in parts]
            out[k] = {f: torch.cat([p[f] for p in parts], dim=0) for f in v}
        elif isinstance(v, torch.Tensor):
            out[k] = torch.cat([b[k] for b in batches], dim=0)
        else:
            out[k] = v
    return out


def batch_size(batch: Batch) -> int:
    return int(batch["presence"].shape[0]) if "presence" in batch else int(batch["label"].shape[0])


def _instance(model: ModelOrFactory) -> nn.Module:
    return copy.deepcopy(model) if isinstance(model, nn.Module) else model()


@torch.inference_mode()
def _eval_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    return model(batch)[0].float()  # (B,)


def _cross_entropy(p: float, q: float) -> float:
    """Mean BCE of labels with prevalence p against the constant prediction q (nats);
    q = p gives the label entropy, q = 0.5 gives ln 2 whatever p is."""
    q = min(max(q, 1e-12), 1 - 1e-12)
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


# -- checks ------------------------------------------------------------------------------------


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
    net = _instance(model)
    total, n, positives = 0.0, 0, 0.0
    with torch.inference_mode():
        net.eval()
        for b in batches:
            _, loss = net(b, b["label"])
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
        {"loss": loss, "expected": expected, "entropy": _cross_entropy(prevalence, prevalence),
         "prevalence": prevalence, "start_prevalence": start},
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
    net = _instance(model)
    worst = {"reorder": 0.0, "alone": 0.0, "replaced": 0.0, "cross_grad": 0.0}
    own = math.inf
    for k, b in enumerate(batches):
        B = batch_size(b)
        ref = _eval_logits(net, b)  # (B,)
        rev = torch.arange(B - 1, -1, -1)
        worst["reorder"] = max(
            worst["reorder"], _maxdiff(_eval_logits(net, select(b, rev)), ref[rev])
        )
        for i in range(min(B, max_alone)):
            alone = _eval_logits(net, select(b, [i]))
            worst["alone"] = max(worst["alone"], _maxdiff(alone, ref[i : i + 1]))
        if B >= 2:
            keep = torch.arange(B // 2)
            other = batches[(k + 1) % len(batches)]
            filler = select(other, torch.arange(batch_size(other)).roll(1)[: B - len(keep)])
            mixed = _eval_logits(net, concat([select(b, keep), filler]))
            worst["replaced"] = max(worst["replaced"], _maxdiff(mixed[: len(keep)], ref[keep]))
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
        if _is_stream(v):
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
        if _is_stream(v):
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
    net = _instance(model)
    worst = 0.0
    for b in batches:
        padded = pad_batch(b, extra_items, extra_foods)
        worst = max(worst, _maxdiff(_eval_logits(net, padded), _eval_logits(net, b)))
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
    inference_mode (PyTorch's fused `_transformer_encoder_layer_fwd` fast path) must give the
    same logits.

    Failure usually means: the two attention paths treat the padding mask differently — a
    fully masked row (no [CLS]) gives NaN in one and zeros in the other — or a module behaves
    differently in eval (BatchNorm statistics, a custom `if self.training` branch).
    """
    net = _instance(model)
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
        eval_logits = _eval_logits(net, b)  # (B,)
        finite &= bool(torch.isfinite(train_logits).all() and torch.isfinite(eval_logits).all())
        worst = max(worst, _maxdiff(train_logits, eval_logits))
    return CheckResult(
        "train_eval_agreement",
        finite and worst <= atol,
        f"max |Δlogit| train vs eval (dropout 0): {worst:.2e}, finite={finite} (atol {atol:g})",
        {"max_abs_diff": worst},
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
    net = _instance(model)
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
    net = _instance(model)
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


def leaked_label_check(
    model_factory: Callable[[], nn.Module],
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    stream: str = "conversation",
    steps: int = 300,
    lr: float = 1e-3,
    min_accuracy: float = 0.98,
) -> CheckResult:
    """Write the label into one input feature of `stream` (`leak_label`), train a fresh model
    `steps` Adam steps on `train_batches`, and measure accuracy on *other* examples
    (`eval_batches`, also leaked) that have at least one `stream` item: it must be ~100%.
    Held-out examples matter: a small model can memorise random labels of its training set.

    Failure usually means: the feature cannot reach [CLS] — the seed's bug (its leaked
    0.01s never moved the loss from ln 2), items masked as padding, [CLS] read from the wrong
    position — or the stream is not wired into the model at all.
    """
    net = model_factory()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    leaked = [leak_label(b, stream) for b in train_batches]
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
        pred = _eval_logits(net, leak_label(b, stream)) > 0  # (B,)
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


# -- helpers ----------------------------------------------------------------------------------


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs()
    return float(d.max()) if d.numel() and bool(torch.isfinite(d).all()) else math.inf


def _group(name: str) -> str:
    """`encoders.food.encoder.transformer...` -> `encoders.food`; `head.1.weight` -> `head`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "encoders" and len(parts) > 2 else parts[0]
