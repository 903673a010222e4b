"""The model section of the config: sizes of the stream encoders and the fusion head, and
the vocabulary sizes a feature store fills in (features/dataset.py: model_config_for)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1  # residual and feed-forward dropout
    attention_dropout: float = 0.0  # on attention probabilities
    # Dropout masks from a quarter of the random draws (models/dropout.py); false: nn.Dropout,
    # the recipe before 2026-12-02 (a fifth of a CPU training step went to its bernoulli_).
    fast_dropout: bool = True
    # How an encoder layer runs: "sdpa" (models/sequence.py EncoderLayer: packed q/k/v straight
    # into scaled_dot_product_attention, batch first throughout; ~20% faster CPU steps) or
    # "torch" (nn.TransformerEncoderLayer's own forward, the reference and the recipe before
    # 2026-12-03). Same weights and names, so a checkpoint loads into either.
    encoder_layer: str = "sdpa"
    pooling: str = "cls"  # "cls" or "mean"
    streams: list[str] = field(default_factory=lambda: ["conversation", "food", "events"])
    max_len_conversation: int = 64
    max_len_food: int = 64
    max_len_events: int = 128
    max_foods_per_meal: int = 8
    fusion_hidden: int = 64
    # A hybrid: also feed the baselines' aggregate features (features/aggregates.py, signed
    # log1p) to the fusion head, beside the [CLS] states.
    aggregates: bool = False
    # Filled by the first FeatureDataset that computes them: the aggregate columns the model
    # is trained on (later stores are matched by name).
    aggregate_names: list[str] = field(default_factory=list)
    # User attributes (the users table's further columns, docs/contract.md#user-attributes):
    # embedded into the fusion input when the feature store has any (false: ignored). The
    # names and the ids per categorical column are filled from the store, and later stores
    # are matched by name.
    attributes: bool = True
    categorical_attributes: list[str] = field(default_factory=list)
    numeric_attributes: list[str] = field(default_factory=list)
    n_attribute_ids: int = 2
    # Per categorical attribute, the ids its build knew (2 + its values; n_attribute_ids for a
    # hashed one): a value appended to the vocabulary later reads as unknown, never as an
    # embedding row training never saw.
    attribute_known_ids: list[int] = field(default_factory=list)
    # Filled by training: the largest day of program and message number in its examples'
    # windows (-1: not set). Inputs are clamped to them, so an out-of-time example further
    # into a program than training reached reads the latest row training updated, never an
    # embedding row it left at its initialisation (docs/models.md).
    trained_max_day: int = -1
    trained_max_msg_no: int = -1
    # The conversation encoder also embeds the first and last day each message mentions,
    # counted from the cutoff (features/text_dates.py, features/timebuckets.py): "on Friday"
    # written on Saturday lands in the label's week, written a month before it does not.
    mention_days: bool = True
    # Dense auxiliary targets (issue 14): a second output of the fusion head predicts the
    # user's own activity on each of the next `future_days` days (-1: every day of the label's
    # horizon, labels.horizon_days, unless labels are supplied (data.labels): then none; 0: no
    # such head), a training target only, never an input;
    # its loss is added with `future_weight`.
    future_days: int = -1
    future_weight: float = 0.5
    # Platt scaling: the logit z becomes calibration_scale * z + calibration_bias. (1, 0) while
    # training; `make train` then fits both on the validation split (train.calibrate) and saves
    # them with the model.
    calibration_scale: float = 1.0
    calibration_bias: float = 0.0
    # Filled from the feature store at build time (vocabulary sizes and text width).
    text_dim: int = 0
    n_event_types: int = 0
    n_foods: int = 0
    n_meals: int = 0
    n_senders: int = 0
    n_dt_buckets: int = 0
    n_mention_buckets: int = 0
    n_content: int = 0
    max_msg_no: int = 1024
    max_day: int = 730
