"""What every check shares: the result type, the batch and model types, fresh model copies
and eval-mode logits."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
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


def instance(model: ModelOrFactory) -> nn.Module:
    return copy.deepcopy(model) if isinstance(model, nn.Module) else model()


@torch.inference_mode()
def eval_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    return model(batch)[0].float()  # (B,)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs()
    return float(d.max()) if d.numel() and bool(torch.isfinite(d).all()) else math.inf
