"""The pretraining section of the config (`pretrain`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PretrainConfig:
    dir: str = ""  # encoder checkpoints; default <workdir>/pretrain
    objectives: list[str] = field(default_factory=lambda: ["conversation", "food", "events"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"conversation": 1.0, "food": 1.0, "events": 1.0}
    )
    epochs: int = 3
    batch_size: int = 64
    batching: str = "length"  # as train.batching: "length" (similar lengths per batch) or "random"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    min_messages: int = 4  # conversations shorter than this are not used for negative sampling
    mask_prob_events: float = 0.15
    max_examples_per_user: int = 4  # windows per user per epoch
    # "coles" in objectives: CoLES (contrastive, pipeline/pretraining/objectives.py) on these
    # streams' encoders, with `coles_splits` random slices of >= `coles_min_len` items per row.
    coles_streams: list[str] = field(default_factory=lambda: ["food", "events"])
    coles_splits: int = 3
    coles_min_len: int = 4
    # As train.step_threads: each batch split over this many threads (CPU, one process), each part
    # with its own corruption and dropout generators seeded from the epoch's.
    step_threads: int = 2
    num_workers: int = 0
    seed: int = 0
