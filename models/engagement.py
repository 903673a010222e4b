"""The engagement classifier: stream encoders' [CLS] states + presence flags -> one logit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_encoder_state
from models.config import ModelConfig
from models.dropout import use_fast_dropout
from models.encoders import ENCODERS

STREAMS = ("conversation", "food", "events")  # also the column order of batch["presence"]


class EngagementModel(nn.Module):
    """P(engaged next week) from the enabled streams (`config.streams`, any non-empty subset
    of conversation/food/events; the others are not built, so ablations carry none of their
    parameters).

    fusion input = [cls_stream for enabled streams] + [presence flag of each enabled stream]
    (+ [projected aggregate features] with `config.aggregates`, the hybrid)
    (+ [user attributes: summed embeddings of the categorical ones + a linear map of the
    numeric ones] when the config names attributes)
    -> LayerNorm -> Linear -> GELU -> Dropout -> Linear -> logit.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        streams = list(config.streams)
        unknown = [s for s in streams if s not in STREAMS]
        if not streams or unknown or len(set(streams)) != len(streams):
            raise ValueError(
                f"model.streams={streams}: use a non-empty subset of {list(STREAMS)} "
                "without repeats"
            )
        self.config = config
        self.streams = [s for s in STREAMS if s in streams]  # canonical order
        # Presence columns of the enabled streams only: a flag of a disabled stream would leak
        # that stream into an ablation.
        self.register_buffer(
            "presence_index",
            torch.tensor([STREAMS.index(s) for s in self.streams]),
            persistent=False,
        )
        self.encoders = nn.ModuleDict({s: ENCODERS[s](config) for s in self.streams})
        self._freeze_pretraining_only()
        S, D, H = len(self.streams), config.d_model, config.fusion_hidden
        # The hybrid: aggregate features (already signed-log1p) -> (B, D), beside the states.
        self.aggregate_proj = None
        if config.aggregates:
            if not config.aggregate_names:
                raise ValueError("model.aggregates=true needs aggregate_names (filled from the feature store)")
            self.aggregate_proj = nn.Sequential(nn.Linear(len(config.aggregate_names), D), nn.GELU())
        # User attributes -> (B, D): one embedding table per categorical column (stacked in
        # one table, column j's ids offset by j * n_attribute_ids), summed, plus the numeric
        # values and their missing flags through a linear map.
        n_cat, n_num = len(config.categorical_attributes), len(config.numeric_attributes)
        self.attribute_embedding = nn.Embedding(n_cat * config.n_attribute_ids, D) if n_cat else None
        if n_cat:
            self.register_buffer("attribute_offsets", torch.arange(n_cat) * config.n_attribute_ids, persistent=False)
        self.attribute_values = nn.Linear(2 * n_num, D) if n_num else None
        A = (D if config.aggregates else 0) + (D if n_cat or n_num else 0)
        self.head = nn.Sequential(
            nn.LayerNorm(S * D + S + A),
            nn.Linear(S * D + S + A, H),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(H, 1),
        )
        # Dense auxiliary targets: own activity on each of the next future_days days, read from
        # the head's hidden layer (more supervision per example than the one binary label).
        self.future_head = nn.Linear(H, config.future_days) if config.future_days > 0 else None
        if config.fast_dropout:
            use_fast_dropout(self.head)

    def forward(
        self, batch: dict[str, Any], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            batch: the collated batch (see features' collate): per enabled stream a dict of
                batch-first (B, T, ...) tensors with `padding_mask` (B, T) bool, True =
                padding; `presence` (B, 3) float32, 1 where the stream has >= 1 item;
                `aggregates` (B, F) float32 with `config.aggregates`; `attr_codes` (B, C)
                int64 and `attr_values` (B, 2N) float32 when the config names attributes.
            labels: optional (B,) float32 in {0, 1}, 1 = engaged next week.

        Returns:
            logits: (B,) float32, log-odds of being engaged.
            loss: mean binary cross-entropy with logits (scalar), or None without labels; with
                `config.future_days` and `batch["future"]`, plus `future_weight` x the mean
                binary cross-entropy of the per-day activity outputs over the known days.
        """
        states = [self.encoders[s](batch[s], items=False)[0] for s in self.streams]  # S x (B, D)
        presence = batch["presence"].index_select(1, self.presence_index)  # (B, 3) -> (B, S)
        parts = states + [presence]
        if self.aggregate_proj is not None:
            parts.append(self.aggregate_proj(batch["aggregates"]))  # (B, F) -> (B, D)
        if self.attribute_embedding is not None or self.attribute_values is not None:
            parts.append(self._attributes(batch))  # (B, D)
        x = torch.cat(parts, dim=-1)  # (B, S*D + S [+ D] [+ D])
        hidden = self.head[:-1](x)  # (B, H)
        logits = self.head[-1](hidden).squeeze(-1).float()  # (B, 1) -> (B,); fp32 under bf16 autocast too
        if (self.config.calibration_scale, self.config.calibration_bias) != (1.0, 0.0):  # fitted after training
            logits = self.config.calibration_scale * logits + self.config.calibration_bias
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            if self.future_head is not None and "future" in batch:
                future = self.future_head(hidden).float()  # (B, future_days)
                target = batch["future"].to(future.dtype)  # -1: a day after the data's end
                known = (target >= 0).to(future.dtype)
                aux = F.binary_cross_entropy_with_logits(future, target.clamp(min=0), weight=known, reduction="sum")
                loss = loss + self.config.future_weight * aux / known.sum().clamp(min=1)
        return logits, loss

    def _attributes(self, batch: dict[str, Any]) -> torch.Tensor:
        out = 0
        if self.attribute_embedding is not None:
            ids = batch["attr_codes"] + self.attribute_offsets  # (B, C)
            out = out + self.attribute_embedding(ids).sum(dim=1)  # (B, C, D) -> (B, D)
        if self.attribute_values is not None:
            out = out + self.attribute_values(batch["attr_values"])  # (B, 2N) -> (B, D)
        return F.gelu(out)

    def set_output_bias(self, prevalence: float) -> None:
        """Start the logit at the training prevalence (log-odds) so the initial loss equals
        the label entropy instead of ln 2 ("init well", Karpathy's recipe)."""
        p = min(max(float(prevalence), 1e-4), 1 - 1e-4)
        with torch.no_grad():
            self.head[-1].bias.fill_(math.log(p / (1 - p)))

    # -- pretrained encoders -------------------------------------------------------------

    def _encoder(self, name: str) -> nn.Module:
        if name not in self.encoders:
            raise KeyError(f"stream {name!r} is not enabled; model.streams={self.streams}")
        return self.encoders[name]

    def load_encoder(
        self, name: str, path_or_state_dict: str | Path | dict[str, Any], freeze: bool = False
    ) -> None:
        """Load a checkpoint written by `models.checkpoint.save_encoder` into encoder `name`
        (ValueError if its stream or shape-defining config fields differ), optionally frozen."""
        state = load_encoder_state(path_or_state_dict, self.config, name)
        self._encoder(name).load_state_dict(state, strict=True)
        if freeze:
            self.freeze_encoder(name)

    def freeze_encoder(self, name: str) -> None:
        """No gradient for encoder `name` (its dropout still follows train/eval mode)."""
        self._encoder(name).requires_grad_(False)

    def unfreeze_encoder(self, name: str) -> None:
        self._encoder(name).requires_grad_(True)
        self._freeze_pretraining_only()

    def _freeze_pretraining_only(self) -> None:
        # The conversation "split" embedding serves negative-sampling pretraining only; it
        # never reaches this model's loss, and DistributedDataParallel refuses parameters
        # that require grad but get none.
        if "conversation" in self.encoders:
            self.encoders["conversation"].split_embedding.requires_grad_(False)
