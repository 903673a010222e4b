"""Device choice in one place: `auto` means CUDA when present, else CPU. Mixed precision
(bf16 autocast) is only ever enabled on CUDA: on this project's CPUs bf16 is ~7x slower."""

from __future__ import annotations

import torch

from common.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is visible; use device=auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: this pipeline runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
