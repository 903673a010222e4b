"""The shared sequence encoder: a learned [CLS] vector + a pre-norm Transformer encoder.

Every stream encoder (conversation, food, events) embeds its items into (B, T, D) and hands
them here. Everything is batch-first: the founding bug of this project (docs/design.md §5) was a
(batch, seq, dim) tensor fed to a (seq, batch, dim) encoder, which silently mixed the users
of a batch and left the loss at ln 2. `batch_first=True` is set once, here, and the
batch-independence test in tests/test_models.py fails if anyone changes it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig

POOLINGS = ("cls", "mean")
ENCODER_LAYERS = ("sdpa", "torch")


@contextmanager
def _without_mha_fastpath():
    """PyTorch's fused inference path for encoder layers (taken without gradients) ran the
    demo's validation at 500 examples/s on 2 CPU cores against 900 for the ordinary path
    (docs/benchmarks.md), and the ordinary path is what training runs: use it always."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class EncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm GELU encoder layer computed batch first from end to end.

    The parameters (names and shapes) are `nn.TransformerEncoderLayer`'s, and so is the
    function: in eval mode the outputs equal the reference's (tests/test_models.py). What
    differs is the path: `nn.MultiheadAttention` transposes (B, T, D) to (T, B, D) inside, then
    splits the packed q/k/v projection through an unflatten/transpose/contiguous whose backward
    zero-fills and copies a (3, T, B, D) tensor; a profile of the demo's step put that fill at
    a tenth of the step (docs/benchmarks.md). Here the packed projection is viewed as
    (B, T, 3, heads, head_dim) and handed to `scaled_dot_product_attention` as strided views.
    Only `norm_first=True` with GELU is implemented (what SequenceEncoder builds).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.norm_first or self.activation is not F.gelu:
            raise ValueError("EncoderLayer implements the pre-norm GELU layer only (norm_first=True, activation='gelu')")

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """src: (B, T, D); src_key_padding_mask: (B, T), bool with True = padding, or the
        additive float mask (0 / -inf) `nn.TransformerEncoder` turns it into. Returns (B, T, D)."""
        if src_mask is not None or is_causal:
            raise ValueError("EncoderLayer takes a key padding mask only")
        x = src
        x = x + self._attention(self.norm1(x), src_key_padding_mask)  # (B, T, D)
        return x + self._ff_block(self.norm2(x))  # (B, T, D)

    def _attention(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.self_attn
        B, T, D = h.shape
        H = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D/H)
        return self._attend(q, k, v, padding_mask)  # (B, T, D)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                padding_mask: torch.Tensor | None) -> torch.Tensor:
        """q: (B, H, R, D/H) queries, k and v: (B, H, T, D/H); padding_mask as `forward`'s.
        Returns the attention block's output for the R queries, (B, R, D), its dropout included."""
        attn = self.self_attn
        mask = None
        if padding_mask is not None:
            # SDPA's bool masks mean True = attend; additive float masks are used as they are.
            mask = ~padding_mask if padding_mask.dtype == torch.bool else padding_mask  # (B, T)
            mask = mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        p = attn.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, R, D/H)
        B, H, R, d = o.shape
        o = o.transpose(1, 2).reshape(B, R, H * d)  # (B, R, D)
        return self.dropout1(attn.out_proj(o))  # (B, R, D)

    def forward_rows(self, src: torch.Tensor, padding_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`forward(src, padding_mask)` at positions `rows` only: those rows query the keys and
        values of every position, and no other row's query, attention output or feed-forward is
        computed. For a last layer of which a caller reads a few rows (a classifier its [CLS],
        a masked objective [CLS] and the masked items) that skips most of the layer's
        arithmetic: per item only the k and v projections remain, 2 D^2 of the layer's 8 D^2
        multiply-adds at d_ff = 2 D (the default), and the attention has one query per kept row
        instead of one per position.
        src: (B, T, D); padding_mask: (B, T) bool, True = padding; rows: (B, R) long positions
        (repeats allowed). Returns (B, R, D)."""
        attn = self.self_attn
        B, T, D = src.shape
        R, H = rows.shape[1], attn.num_heads
        at = rows.unsqueeze(-1).expand(B, R, D)  # (B, R, D) gather index
        h = self.norm1(src)  # (B, T, D): keys and values need every position's norm
        w, b = attn.in_proj_weight, attn.in_proj_bias  # (3D, D), (3D,): q, k, v stacked
        q = F.linear(h.gather(1, at), w[:D], b[:D])  # (B, R, D)
        q = q.view(B, R, H, D // H).transpose(1, 2)  # (B, H, R, D/H)
        kv = F.linear(h, w[D:], b[D:])  # (B, T, 2D)
        k, v = kv.view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, T, D/H)
        x = src.gather(1, at) + self._attend(q, k, v, padding_mask)  # (B, R, D)
        return x + self._ff_block(self.norm2(x))  # (B, R, D)


class SequenceEncoder(nn.Module):
    """[CLS] + items -> TransformerEncoder (batch_first, pre-norm) -> final LayerNorm.

    The [CLS] vector sits at position 0 and is never masked, so a user with an empty stream
    (every item padding) still has one valid key per attention row: no fully masked row, no
    NaN, in train or eval mode (BERT's [CLS]; pytorch-lifestream's starter token).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={config.pooling!r}; use one of {POOLINGS}")
        if config.d_model % config.n_heads:
            raise ValueError(
                f"model.d_model={config.d_model} is not divisible by model.n_heads={config.n_heads}"
            )
        if config.encoder_layer not in ENCODER_LAYERS:
            raise ValueError(f"model.encoder_layer={config.encoder_layer!r}; use one of {ENCODER_LAYERS}")
        self.pooling = config.pooling
        self.cls = nn.Parameter(torch.randn(1, 1, config.d_model) * 0.02)  # (1, 1, D)
        layer_class = EncoderLayer if config.encoder_layer == "sdpa" else nn.TransformerEncoderLayer
        layer = layer_class(
            d_model=config.d_model,
            nhead=config.n_heads,
            dim_feedforward=config.d_ff,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,  # (B, T, D) everywhere; see the module docstring
            norm_first=True,  # pre-norm trains without warm-up tricks (Xiong et al. 2020)
        )
        # enable_nested_tensor=False: nested tensors are not used with norm_first anyway, and
        # we want eval outputs on padded positions to be ordinary (finite) numbers.
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=config.n_layers, enable_nested_tensor=False
        )
        # TransformerEncoder deep-copies `layer`, so every layer would start from the same
        # weights; give each its own draw.
        for block in self.transformer.layers:
            block.self_attn._reset_parameters()
            block.linear1.reset_parameters()
            block.linear2.reset_parameters()
            # Dropout on the attention probabilities is separate (model.attention_dropout,
            # default 0): on CPU its Bernoulli draws over (B, heads, T, T) cost more than the
            # attention itself, and at 0 PyTorch can take its fused attention kernel.
            block.self_attn.dropout = config.attention_dropout
        self.ln_f = nn.LayerNorm(config.d_model)  # pre-norm stacks need a final norm

    def _prepend_cls(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        if padding_mask is None:
            padding_mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)  # (B, T)
        if padding_mask.shape != (B, T) or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {(B, T)} (True = padding); "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        x = torch.cat([self.cls.expand(B, 1, D), x], dim=1)  # (B, 1+T, D)
        cls_valid = torch.zeros(B, 1, dtype=torch.bool, device=x.device)  # (B, 1)
        mask = torch.cat([cls_valid, padding_mask], dim=1)  # (B, 1+T), CLS never masked
        return x, mask

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, items: bool | torch.Tensor = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode one stream.

        Args:
            x: (B, T, D) float32 item vectors, batch first.
            padding_mask: (B, T) bool, **True = padding** (the `src_key_padding_mask`
                convention); None means no padding. A row may be all True (empty stream).
            items: which item states the caller reads: True all, False none (the pooled
                state only), or a (B, R) long tensor of item indices (0 to T-1) per row. With
                `pooling="cls"` and this module's `EncoderLayer`, the last layer then computes
                [CLS] and those rows alone (`EncoderLayer.forward_rows`): the same function
                for them, for a fraction of the arithmetic.

        Returns:
            pooled: (B, D) float32 — the [CLS] state (`pooling="cls"`), or the mean over
                [CLS] and the valid items (`pooling="mean"`; [CLS] keeps it finite when a
                stream is empty).
            items: (B, T, D) float32 item states, exactly 0 at padded positions; with a
                tensor `items`, (B, R, D) the states of those items (0 where one is padding);
                None with `items=False` where the last layer skipped them (else all of them).
        """
        rows = None if isinstance(items, bool) else items  # (B, R) item indices
        x, mask = self._prepend_cls(x, padding_mask)  # (B, 1+T, D), (B, 1+T)
        layers = self.transformer.layers
        if items is not True and self.pooling == "cls" and isinstance(layers[-1], EncoderLayer):
            for layer in layers[:-1]:
                x = layer(x, src_key_padding_mask=mask)  # (B, 1+T, D)
            at = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)  # (B, 1): [CLS]
            if rows is not None:
                at = torch.cat([at, rows + 1], dim=1)  # (B, 1+R): [CLS], then the items
            h = self.ln_f(layers[-1].forward_rows(x, mask, at))  # (B, 1+R, D)
            if rows is None:
                return h[:, 0], None  # (B, D)
            valid = (~mask).gather(1, at[:, 1:]).unsqueeze(-1).to(h.dtype)  # (B, R, 1)
            return h[:, 0], h[:, 1:] * valid  # (B, D), (B, R, D)
        with _without_mha_fastpath():
            h = self.transformer(x, src_key_padding_mask=mask)  # (B, 1+T, D)
        h = self.ln_f(h)  # (B, 1+T, D)
        valid = (~mask).unsqueeze(-1).to(h.dtype)  # (B, 1+T, 1)
        h = h * valid  # (B, 1+T, D) padded states zeroed, so nothing downstream can use them
        if self.pooling == "cls":
            pooled = h[:, 0]  # (B, D)
        else:
            pooled = h.sum(dim=1) / valid.sum(dim=1)  # (B, D), count >= 1 thanks to [CLS]
        if rows is not None:  # the states asked for, taken from all of them
            return pooled, h[:, 1:].gather(1, rows.unsqueeze(-1).expand(*rows.shape, h.shape[-1]))  # (B, R, D)
        return pooled, h[:, 1:]  # (B, D), (B, T, D)

    @torch.no_grad()
    def attention_maps(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-layer, per-head attention weights, [CLS] included at index 0.

        Args: as `forward`. Runs in the module's current mode (call `.eval()` first for
        deterministic maps).

        Returns:
            one (B, n_heads, 1+T, 1+T) float32 tensor per layer: row i = query i, column j =
            key j; each row sums to 1 and padded key columns are exactly 0.
        """
        x, mask = self._prepend_cls(x, padding_mask)  # (B, 1+T, D), (B, 1+T)
        maps = []
        for layer in self.transformer.layers:
            # Re-run the layer's own attention on its pre-norm input (norm_first=True) with
            # need_weights, then run the real layer to move on to the next one.
            h = layer.norm1(x)  # (B, 1+T, D)
            _, weights = layer.self_attn(
                h, h, h, key_padding_mask=mask, need_weights=True, average_attn_weights=False
            )  # (B, n_heads, 1+T, 1+T)
            maps.append(weights)
            x = layer(x, src_key_padding_mask=mask)  # (B, 1+T, D)
        return maps
