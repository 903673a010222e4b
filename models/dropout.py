"""Dropout whose mask costs a quarter of the random numbers.

A profile of the demo's training step on 2 CPU cores (docs/benchmarks.md) found dropout's
`bernoulli_` at a fifth of the step: torch's CPU generator draws one number per element. Here
one 64-bit draw gives four 16-bit uniforms, and an element is kept when its uniform is at or
above round(p * 65536) / 65536 (p is exact to 1/65536). Same contract as `nn.Dropout`:
identity in eval mode, kept elements scaled by 1 / (1 - p) in training, masks from torch's
global generator (so a checkpointed RNG state resumes the same masks), or inside
`masks_from(generator)` from that generator, on that thread only: parts of a batch run on
threads of their own each draw from their own, so their masks do not depend on which thread
draws first (pipeline/training/loop.py: parallel_backward).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

_local = threading.local()


@contextmanager
def masks_from(generator: torch.Generator):
    """Within this block, on this thread, FastDropout masks come from `generator`."""
    before = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = before

_SPAN = 1 << 16
_LOW = -(1 << 15)  # int16 uniforms lie in [-32768, 32767]


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - p (to 1/65536)."""
    n = shape.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device,
                          generator=getattr(_local, "generator", None))
    return words.view(torch.int16)[:n].view(shape) >= _LOW + round(p * _SPAN)


class FastDropout(nn.Dropout):
    """An `nn.Dropout` (code that finds dropout modules by type still finds it) whose masks
    come from `keep_mask`."""

    def __init__(self, p: float = 0.1):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1); got {p}")
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # One float mask holding 0 or 1 / (1 - p): one multiply forward and one backward.
        # (a cast and an in-place scale ran at twice the speed of torch.where on two scalars)
        scale = keep_mask(x.shape, self.p, x.device).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scale


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every `nn.Dropout` inside `module` (transformer layers included) by a
    `FastDropout` of the same p; returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module
