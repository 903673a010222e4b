"""Checkpoints, saved with `torch.save` and read back with `torch.load(weights_only=True)` (no
pickled code runs on load, docs/design.md §10):

- encoders: `{"format", "config", "stream", "state_dict", "meta"}` (pretraining -> training);
- engagement models: `{"state_dict", "model_config", "config", "epoch", "val_roc_auc"}`
  (training -> evaluation, the registry and scoring).

A checkpoint is refused — a ValueError naming the field — when its stream or any config field
that fixes the weights' shapes (vocabulary sizes, d_model, ...) differs from the model it is
loaded into: a silently mis-indexed food vocabulary would train, just badly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_path
from models.config import ModelConfig
from models.encoders import ENCODERS, StreamEncoder

FORMAT = "engagement-encoder-v1"


def save_encoder(
    encoder: StreamEncoder,
    config: ModelConfig | Any,
    path: str | Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `encoder`'s weights and the `ModelConfig` they were built with to `path`.

    `meta` holds extra plain values (objective metrics, step, the resolved run config as a
    dict). The write is atomic: a temporary file renamed into place.
    """
    config = getattr(config, "model", config)  # a full pipeline Config works too
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "stream": encoder.stream,
        "config": dataclasses.asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "meta": _plain(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _plain(value: Any) -> Any:
    """Numpy scalars/arrays and paths as plain Python values: weights_only loading refuses
    anything else (a numpy float64 metric would make the checkpoint unreadable)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "tolist"):  # numpy scalar (np.float64 is also a float) or array
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_checkpoint(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of a path (loaded with weights_only=True) or of a dict as is."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist; run `make pretrain`")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_encoder_state(
    source: str | Path | dict[str, Any], config: ModelConfig, stream: str
) -> dict[str, torch.Tensor]:
    """The state dict of an encoder checkpoint, after checking it fits `config` and `stream`.

    `source` is a path, a checkpoint dict as written by `save_encoder`, or a bare state dict
    (then only the tensor shapes can be checked, by `load_state_dict`).
    """
    ckpt = read_checkpoint(source)
    if "state_dict" not in ckpt:  # a bare state dict
        return ckpt
    where = source if isinstance(source, (str, Path)) else "the checkpoint"
    if ckpt.get("stream") != stream:
        raise ValueError(
            f"{where} holds a {ckpt.get('stream')!r} encoder, not a {stream!r} encoder"
        )
    saved = ckpt.get("config", {})
    for field in ENCODERS[stream].config_fields:
        ours = getattr(config, field)
        theirs = saved.get(field)
        if theirs != ours:
            raise ValueError(
                f"{where}: model.{field}={theirs} in the checkpoint but {ours} in this model's "
                f"config; the {stream} encoder's weights do not fit. Re-run pretraining on the "
                "same feature store, or train from scratch (train.init=scratch)"
            )
    return ckpt["state_dict"]


def save_model(path: str | Path, model: torch.nn.Module, config: ModelConfig, run_config: dict[str, Any],
               epoch: int, val_roc_auc: float) -> Path:
    """Write an engagement model's weights, the `ModelConfig` it was built with and the
    resolved run config (plain data) to `path`, atomically."""
    payload = {"state_dict": model.state_dict(), "model_config": dataclasses.asdict(config),
               "config": _plain(run_config), "epoch": int(epoch), "val_roc_auc": float(val_roc_auc)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """A saved engagement model, in eval mode on `device`, and its checkpoint dict."""
    # Imported here: models/engagement.py imports this module for the encoder checkpoints.
    from models.engagement import EngagementModel

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # A model saved before `mention_days` existed embeds no mentioned days.
    model = EngagementModel(ModelConfig(**{"mention_days": False, **ckpt["model_config"]}))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
