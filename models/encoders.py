"""Bare stream encoders: conversation, food and events (docs/design.md §5).

Each turns one stream of the batch (a dict of batch-first tensors, see `features` collate)
into item vectors (B, T, D) — a sum of per-field embeddings, then LayerNorm + dropout as in
BERT's embedding block — and runs its own `SequenceEncoder`. They return
`(cls (B, D), items (B, T, D))` and know nothing of how they are trained: pretraining
objectives and the engagement head take them as arguments.

Shared conventions of every stream dict: (B, T) long fields use 0 for padding;
`padding_mask` is (B, T) bool with True = padding; `dt_bucket`/`recency` are log-scale time
buckets (< n_dt_buckets); `position` is 1 for the most recent item, 2 for the one before, ...
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.dropout import use_fast_dropout
from models.sequence import SequenceEncoder

# ModelConfig fields that fix the shape of an encoder's weights: a pretrained checkpoint must
# agree on all of them (models/checkpoint.py refuses it otherwise).
SHARED_FIELDS = ("d_model", "n_heads", "n_layers", "d_ff", "n_dt_buckets")


def _embedding(rows: int, dim: int, field: str) -> nn.Embedding:
    if rows < 2:
        raise ValueError(
            f"model.{field} gives an embedding table of {rows} row(s); vocabulary sizes are "
            "filled from the feature store (index 0 is padding), so build features first or "
            f"set model.{field} explicitly"
        )
    emb = nn.Embedding(rows, dim, padding_idx=0)
    _init_embedding(emb.weight)
    return emb


def _init_embedding(weight: torch.Tensor) -> None:
    # Small init (GPT-2/BERT use std 0.02); the LayerNorm after the sum sets the scale.
    with torch.no_grad():
        weight.normal_(0.0, 0.02)
        weight[0].zero_()  # padding row


class StreamEncoder(nn.Module):
    """Base class: time embeddings every stream shares + the SequenceEncoder.

    Subclasses set `stream` (the batch key), `config_fields` and implement `embed_fields`.
    """

    stream: str = ""
    config_fields: tuple[str, ...] = SHARED_FIELDS

    def __init__(self, config: ModelConfig, max_len: int):
        super().__init__()
        D = config.d_model
        self.dt_embedding = _embedding(config.n_dt_buckets, D, "n_dt_buckets")
        self.recency_embedding = _embedding(config.n_dt_buckets, D, "n_dt_buckets")
        self.position_embedding = _embedding(max_len + 1, D, f"max_len_{self.stream}")
        self.norm = nn.LayerNorm(D)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = SequenceEncoder(config)
        if config.fast_dropout:
            use_fast_dropout(self)

    def embed_fields(self, s: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, s: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """Item vectors (B, T, D) of one stream dict; exactly 0 at padded positions."""
        x = self.embed_fields(s, **kwargs)  # (B, T, D)
        x = x + self.dt_embedding(s["dt_bucket"])  # (B, T, D)
        x = x + self.recency_embedding(s["recency"])  # (B, T, D)
        x = x + self.position_embedding(s["position"])  # (B, T, D)
        x = self.drop(self.norm(x))  # (B, T, D)
        return x * (~s["padding_mask"]).unsqueeze(-1).to(x.dtype)  # (B, T, D)

    def forward(self, s: dict[str, torch.Tensor], items: bool | torch.Tensor = True,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode one stream.

        Args:
            s: the stream dict of the batch (fields in the subclass docstring): (B, T) long
                ids with 0 = padding, (B, T) float32 values, `padding_mask` (B, T) bool with
                True = padding (a row may be all padding: the stream is empty).
            items: True for every item state, False for none (only `cls` is read), or a
                (B, R) long tensor of the item indices per row to return; the last layer
                then skips the others (`SequenceEncoder.forward`).

        Returns:
            cls: (B, D) float32 pooled state (config.pooling) and items: (B, T, D) float32,
            exactly 0 at padding ((B, R, D) for a tensor `items`; None after `items=False`).
        """
        return self.encoder(self.embed(s, **kwargs), s["padding_mask"], items=items)  # (B, D), (B, T, D)

    def attention_maps(self, s: dict[str, torch.Tensor], **kwargs) -> list[torch.Tensor]:
        """One (B, n_heads, 1+T, 1+T) tensor per layer; index 0 is [CLS]."""
        return self.encoder.attention_maps(self.embed(s, **kwargs), s["padding_mask"])


class ConversationEncoder(StreamEncoder):
    """Messages: projected message vector + sender + dt bucket + message number + recency +
    position (+ an optional "split" embedding for negative-sampling pretraining).

    Stream dict (B batch, T messages, E = config.text_dim):
        embedding (B, T, E) float32 precomputed message vectors;
        sender (B, T) long 0 pad / 1 user / 2 coach; msg_no (B, T) long 1-based, 0 pad;
        dt_bucket, recency, position (B, T) long; padding_mask (B, T) bool, True = padding;
        with config.mention_days, mention_first, mention_last (B, T) long: the day mentioned,
        from the cutoff (features.timebuckets.mention_buckets; 0 pad, 1 none).
    """

    stream = "conversation"
    config_fields = SHARED_FIELDS + ("text_dim", "n_senders", "max_msg_no", "max_len_conversation", "mention_days",
                                     "n_mention_buckets")
    N_SPLIT = 3  # 0 none (padding row), 1 before the cut, 2 after the cut

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.max_len_conversation)
        if config.text_dim < 1:
            raise ValueError(
                "model.text_dim is 0; it is filled from the feature store (the message-vector "
                "size), so build features first or set model.text_dim"
            )
        D = config.d_model
        self.text_projection = nn.Linear(config.text_dim, D)
        self.sender_embedding = _embedding(config.n_senders, D, "n_senders")
        self.msg_no_embedding = _embedding(config.max_msg_no + 1, D, "max_msg_no")
        self.split_embedding = _embedding(self.N_SPLIT, D, "split")
        self.mention_days = config.mention_days
        if config.mention_days:  # the first / last day a message mentions, from the cutoff
            # Zero at first (and drawing nothing from the generator): pretraining never sees them
            # (negative sampling blanks them), so fine-tuning starts from the pretrained function.
            rows = config.n_mention_buckets
            if rows < 2:
                raise ValueError("model.n_mention_buckets is filled from the feature store (features.timebuckets); "
                                 "build features first, set it, or set model.mention_days=false")
            self.mention_first_embedding = nn.Embedding(rows, D, padding_idx=0, _weight=torch.zeros(rows, D))
            self.mention_last_embedding = nn.Embedding(rows, D, padding_idx=0, _weight=torch.zeros(rows, D))

    def embed_fields(
        self, s: dict[str, torch.Tensor], split: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.text_projection(s["embedding"])  # (B, T, E) -> (B, T, D)
        x = x + self.sender_embedding(s["sender"])  # (B, T, D)
        x = x + self.msg_no_embedding(s["msg_no"])  # (B, T, D)
        if self.mention_days:
            x = x + self.mention_first_embedding(s["mention_first"]) + self.mention_last_embedding(s["mention_last"])
        if split is not None:  # (B, T) long: 0 none, 1 before the cut, 2 after
            x = x + self.split_embedding(split)  # (B, T, D)
        return x

    def forward(
        self, conv: dict[str, torch.Tensor], split: torch.Tensor | None = None, items: bool | torch.Tensor = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: conv, the conversation stream dict (see class docstring); split, optional
        (B, T) long, 0 none / 1 before the cut / 2 after the cut; items as `StreamEncoder`'s.
        Returns cls (B, D) float32 and items (B, T, D) float32 (0 at padding) or None."""
        return super().forward(conv, items=items, split=split)  # (B, D), (B, T, D)


class FoodEncoder(StreamEncoder):
    """Meals: sum of the meal's food embeddings (EmbeddingBag) + meal slot + dt bucket +
    recency + position.

    Stream dict (M foods per meal):
        food_ids (B, T, M) long 0 pad / 1 unknown / 2.. foods / `n_foods` = [MASK];
        meal (B, T) long 0 pad / 1 unknown / 2.. slots; dt_bucket, recency, position (B, T)
        long; padding_mask (B, T) bool, True = padding.

    `food_embedding.weight` (n_foods + 1, D) is exposed so a masked-food head can tie its
    output layer to it; row `mask_id` is the [MASK] food.
    """

    stream = "food"
    config_fields = SHARED_FIELDS + ("n_foods", "n_meals", "max_len_food")

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.max_len_food)
        D = config.d_model
        if config.n_foods < 2:
            raise ValueError(
                "model.n_foods must count padding + unknown + the real foods (>= 2); it is "
                "filled from the feature store, so build features first or set model.n_foods"
            )
        self.mask_id = config.n_foods
        # mode="sum": a meal is the sum of its foods; padding_idx=0 foods add nothing.
        self.food_embedding = nn.EmbeddingBag(config.n_foods + 1, D, mode="sum", padding_idx=0)
        _init_embedding(self.food_embedding.weight)
        self.meal_embedding = _embedding(config.n_meals, D, "n_meals")

    def embed_fields(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        food_ids = s["food_ids"]  # (B, T, M)
        B, T, M = food_ids.shape
        x = self.food_embedding(food_ids.reshape(B * T, M))  # (B*T, D)
        x = x.view(B, T, -1)  # (B, T, D)
        return x + self.meal_embedding(s["meal"])  # (B, T, D)


class EventEncoder(StreamEncoder):
    """All events: event type + dt bucket + day of program + (value, value_delta, has_value)
    through a Linear + content + recency + position.

    Stream dict:
        type_id (B, T) long 0 pad / 1 unknown / 2.. types / `n_event_types` = [MASK];
        day (B, T) long day of program + 1 (capped at max_day + 1), 0 pad;
        value, value_delta, has_value (B, T) float32 (0 where absent);
        content (B, T) long 0 pad / 1 none / 2.. hashed ids;
        dt_bucket, recency, position (B, T) long; padding_mask (B, T) bool, True = padding.

    `type_embedding.weight` (n_event_types + 1, D) is exposed for a tied masked-event head.
    """

    stream = "events"
    config_fields = SHARED_FIELDS + ("n_event_types", "max_day", "n_content", "max_len_events")

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.max_len_events)
        D = config.d_model
        self.mask_id = config.n_event_types
        self.type_embedding = _embedding(config.n_event_types + 1, D, "n_event_types")
        self.day_embedding = _embedding(config.max_day + 2, D, "max_day")
        self.content_embedding = _embedding(config.n_content, D, "n_content")
        self.value_projection = nn.Linear(3, D)  # (value, value_delta, has_value) -> D

    def embed_fields(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.type_embedding(s["type_id"])  # (B, T, D)
        x = x + self.day_embedding(s["day"])  # (B, T, D)
        x = x + self.content_embedding(s["content"])  # (B, T, D)
        numeric = torch.stack([s["value"], s["value_delta"], s["has_value"]], dim=-1)  # (B, T, 3)
        return x + self.value_projection(numeric)  # (B, T, D)


ENCODERS: dict[str, type[StreamEncoder]] = {
    cls.stream: cls for cls in (ConversationEncoder, FoodEncoder, EventEncoder)
}
