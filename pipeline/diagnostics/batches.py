"""Batch plumbing for the checks. The collate contract: a batch is a dict of batch-first
tensors; a stream is a dict with a `padding_mask` (B, T), True = padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.diagnostics.common import Batch


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


def is_stream(v: Any) -> bool:
    return isinstance(v, dict) and "padding_mask" in v


def pad_batch(batch: Batch, extra_items: int = 3, extra_foods: int = 2) -> Batch:
    """Append `extra_items` fully padded columns to every stream (and `extra_foods` padded
    foods to every meal): the same examples, only more padding."""
    out = dict(batch)
    for k, v in batch.items():
        if is_stream(v):
            T = v["padding_mask"].shape[1] + extra_items
            M = v["food_ids"].shape[2] + extra_foods if "food_ids" in v else None
            out[k] = _pad_stream(v, T, M)
    return out


def concat(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along the batch dim, padding streams to a common T (and M)."""
    first = batches[0]
    out: Batch = {}
    for k, v in first.items():
        if is_stream(v):
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
