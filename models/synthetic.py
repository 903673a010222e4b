"""Synthetic inputs for tests and benchmarks: tiny model configs and random batches in the
collate contract (features/dataset.py): batch-first, right-padded, padding masks True =
padding, index 0 = padding everywhere, items in time order (oldest first) so `position`
counts down to 1 at the most recent item."""

from __future__ import annotations

import dataclasses

import torch

from models.config import ModelConfig

STREAMS = ("conversation", "food", "events")


def tiny_config(**overrides) -> ModelConfig:
    """DistilBERT-test sized: hidden 32, 2 heads (even, so eval takes PyTorch's fast path)."""
    cfg = ModelConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        d_ff=64,
        dropout=0.1,
        fusion_hidden=32,
        max_len_conversation=12,
        max_len_food=12,
        max_len_events=12,
        max_foods_per_meal=4,
        text_dim=12,
        n_event_types=9,
        n_foods=30,
        n_meals=6,
        n_senders=3,
        n_dt_buckets=10,
        n_mention_buckets=10,
        n_content=20,
        max_msg_no=40,
        max_day=30,
    )
    return dataclasses.replace(cfg, **overrides)


def default_lengths(B: int, T: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random lengths in [0, T]; example 0 is full in every stream, examples 1-3 each miss one
    stream and example 4 has none."""
    lengths = {s: torch.randint(0, T + 1, (B,), generator=g) for s in STREAMS}
    for s in STREAMS:
        lengths[s][0] = T
    for i, s in enumerate(STREAMS, start=1):
        if i < B:
            lengths[s][i] = 0
    if B > 4:
        for s in STREAMS:
            lengths[s][4] = 0
    return lengths


def random_batch(
    cfg: ModelConfig,
    B: int = 13,
    T: int = 7,
    lengths: dict[str, torch.Tensor | list[int]] | None = None,
    seed: int = 0,
    M: int | None = None,
) -> dict:
    """A batch exactly in the contract. `lengths` maps stream -> (B,) item counts (<= T);
    T is the padded width of every stream (>= 1 even when all lengths are 0)."""
    g = torch.Generator().manual_seed(seed)
    M = M or cfg.max_foods_per_meal
    T = max(T, 1)
    given = lengths or {}
    auto = default_lengths(B, T, g)
    lengths = {s: torch.as_tensor(given.get(s, auto[s]), dtype=torch.long) for s in STREAMS}

    def ints(lo: int, hi: int, shape=(B, T)) -> torch.Tensor:  # uniform in [lo, hi)
        return torch.randint(lo, hi, shape, generator=g)

    def timeline(s: str) -> dict[str, torch.Tensor]:
        n = lengths[s][:, None]  # (B, 1)
        t = torch.arange(T)[None, :]  # (1, T)
        pad = t >= n  # (B, T) True = padding
        dt = ints(2, cfg.n_dt_buckets)
        dt[:, 0] = torch.where(torch.rand(B, generator=g) < 0.5, 1, dt[:, 0])  # 1 = no previous
        recency = ints(2, cfg.n_dt_buckets).sort(dim=1, descending=True).values  # older = larger
        return {
            "dt_bucket": dt.masked_fill(pad, 0),
            "recency": recency.masked_fill(pad, 0),
            "position": (n - t).masked_fill(pad, 0),  # 1 = most recent
            "padding_mask": pad,
        }

    conv = timeline("conversation")
    pad = conv["padding_mask"]
    start = ints(0, 10, (B, 1))
    conv |= {
        "embedding": torch.randn(B, T, cfg.text_dim, generator=g).masked_fill(pad[..., None], 0.0),
        "sender": ints(1, cfg.n_senders).masked_fill(pad, 0),
        "msg_no": (start + torch.arange(T) + 1).clamp(max=cfg.max_msg_no).masked_fill(pad, 0),
        **{k: ints(1, max(2, cfg.n_mention_buckets)).masked_fill(pad, 0) for k in ("mention_first", "mention_last")},
    }

    food = timeline("food")
    pad = food["padding_mask"]
    n_foods = torch.randint(1, M + 1, (B, T, 1), generator=g)
    food_ids = ints(1, cfg.n_foods, (B, T, M)).masked_fill(torch.arange(M) >= n_foods, 0)
    food |= {
        "food_ids": food_ids.masked_fill(pad[..., None], 0),
        "meal": ints(1, cfg.n_meals).masked_fill(pad, 0),
    }

    events = timeline("events")
    pad = events["padding_mask"]
    has_value = (torch.rand(B, T, generator=g) < 0.5) & ~pad
    events |= {
        "type_id": ints(1, cfg.n_event_types).masked_fill(pad, 0),
        "day": ints(1, cfg.max_day + 2).sort(dim=1).values.masked_fill(pad, 0),
        "value": torch.randn(B, T, generator=g) * has_value,
        "value_delta": torch.randn(B, T, generator=g) * has_value,
        "has_value": has_value.float(),
        "content": ints(1, cfg.n_content).masked_fill(pad, 0),
    }
    presence = torch.stack([(lengths[s] > 0).float() for s in STREAMS], dim=1)  # (B, 3)
    label = torch.randint(0, 2, (B,), generator=g).float()
    return {
        "label": label,
        "conversation": conv,
        "food": food,
        "events": events,
        "presence": presence,
    }


def save_tiny_text_encoder(directory) -> None:
    """A random 1-layer DistilBERT (dim 16) with a character-level WordPiece vocabulary, saved
    where `transformers.AutoModel.from_pretrained` (features/text_vectors.py) loads it: a text
    encoder for tests and benchmarks that needs no download and encodes fast."""
    import string
    from pathlib import Path

    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + [f"##{c}" for c in chars]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    DistilBertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    config = DistilBertConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=256)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(d)
