"""The `features` stage: validate (when the input changed), build, write the HDF5 store and
its JSON manifest atomically, print a summary."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import stamps
from common.errors import UserError
from features import stream
from features import validate as V
from features.build import build_features, check_shards, text_steps
from features.io import fingerprint, read_table
from features.labels import check_labels
from features.normalise import to_utc
from features.store import SCHEMA_VERSION, read_meta, write_store
from features.text_vectors import TextEncoder
from features.vocab import Vocab
from pipeline.config import Config, save_config, to_dict
from pipeline.data.validate import ensure_validated
from pipeline.paths import Paths

log = logging.getLogger(__name__)


def output_path(cfg: Config) -> Path:
    paths = Paths.of(cfg)
    if cfg.features.shard is None:
        return paths.feature_file
    return paths.shard_feature_file(cfg.features.shard, cfg.features.num_shards)


def config_name(out: Path, cfg: Config) -> str:
    """The name of a build's saved config, beside its store: `config.yaml` for an unsharded
    store; one per shard (`features-001-of-004.config.yaml`): shards run side by side and
    their configs differ (features.shard)."""
    return "config.yaml" if cfg.features.shard is None else f"{out.stem}.config.yaml"


@functools.lru_cache(maxsize=1)
def feature_code() -> str:
    """A digest of the feature layer's source (every .py file of the `features` package): a
    store built by other code is rebuilt, even when its schema version is the same."""
    root = Path(stream.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_key(cfg: Config, report: dict, encoder: TextEncoder | None) -> str:
    """Everything a feature file depends on: inputs (raw events and users, how validation
    treated them, the food catalog that numbers the foods, supplied labels), label/feature
    settings, the encoder's weights, the feature code. The same key means the existing file is
    what a rebuild would write."""
    from features.text_vectors import encoder_identity

    d = to_dict(cfg)
    feats = {k: v for k, v in d["features"].items() if k not in ("text_batch_size", "text_device", "scheduler")}
    validation = {k: report.get(k) for k in ("settings", "accepted", "duplicates", "quarantined", "reasons")}
    parts = [SCHEMA_VERSION, report["source_fingerprint"], validation, d["labels"], feats, d["data"]["until"],
             fingerprint([cfg.data.labels]) if cfg.data.labels else None,
             fingerprint([cfg.data.foods]) if cfg.data.foods else None,
             encoder.identity if encoder else encoder_identity(cfg.features.text_encoder), feature_code()]
    return stamps.fingerprint(*parts)


def _up_to_date(out: Path, key: str) -> bool:
    if not out.exists() or stamps.is_current(out.with_suffix(".json"), key) is None:
        return False
    try:
        read_meta(out)  # still a readable store of this schema version
    except UserError:
        return False
    return True


def features_stage(cfg: Config, encoder: TextEncoder | None = None, validated: Path | None = None) -> Path:
    """Build <workdir>/features/features.h5 (or a shard file) from `data.events`; a file
    already built from the same inputs and settings is reused as is. `validated`: the folder a
    caller has just validated `data.events` into (pipeline/data/fanout.py), else checked here."""
    check_shards(cfg.features)  # before any work
    check_labels(cfg.labels)
    if cfg.data.until:
        to_utc(cfg.data.until, "data.until")
    paths = Paths.of(cfg)
    vdir = validated or ensure_validated(cfg)
    report = json.loads((vdir / V.REPORT).read_text())
    out = output_path(cfg)
    key = build_key(cfg, report, encoder)
    if _up_to_date(out, key):
        print(f"features: {out} is up to date (same inputs and settings); reusing it")
        return out
    events, facts = _events_of(vdir, cfg)
    if cfg.data.until:  # as if the log ended there (backfills, scoring a past date)
        until = pa.scalar(to_utc(cfg.data.until), pa.timestamp("us", tz="UTC"))
        events = events.filter(pc.less(events["ts"], until))
    users = read_table(vdir / V.USERS, "users") if (vdir / V.USERS).exists() else None
    labels = read_table(cfg.data.labels, "labels") if cfg.data.labels else None

    fc = cfg.features
    has_messages = bool(pc.any(pc.equal(events["event_type"], "message")).as_py())
    if has_messages:  # data without messages (e.g. KDD Cup) needs no text encoder
        encoder = encoder or TextEncoder.load(fc.text_encoder, fc.text_device)

    embed, dates = text_steps(fc, encoder, paths.text_cache)
    vocab_path = paths.vocab
    vocab = Vocab.load(vocab_path)
    built = build_features(
        events, users, cfg, embed if has_messages else None,
        encoder.dim if has_messages else 0, encoder.identity if has_messages else "none", vocab, labels,
        source_fingerprint=report["source_fingerprint"], config=to_dict(cfg), facts=facts,
        dates=dates if has_messages else None,
    )
    write_store(out, built.arrays, built.meta)
    vocab.save(vocab_path)
    manifest = {
        "feature_file": str(out),
        "schema_version": built.meta.schema_version,
        "created_at": built.meta.created_at,
        "source_fingerprint": built.meta.source_fingerprint,
        "text_encoder": built.meta.text_encoder,
        "validation": {k: report[k] for k in ("rows_in", "accepted", "duplicates", "quarantined", "reasons")},
        **built.summary,
    }
    manifest = stamps.mark_done(out.with_suffix(".json"), key, **manifest)  # the build's stamp
    save_config(cfg, out.parent, config_name(out, cfg))
    print_summary(manifest, whole=cfg.features.shard is None)
    return out


def _events_of(vdir: Path, cfg: Config) -> tuple[pa.Table, dict | None]:
    """The validated events this build reads, and the global facts when they are some of a
    streaming validation's partitions only (memory: the shard's users, not the whole log).

    Partition p of P holds the users whose hash is p mod P; shard i of N those whose hash is
    i mod N. So with N dividing P, shard i is exactly partitions i, i + N, ...; with P dividing
    N, shard i lies inside partition i mod P (the build keeps the shard's users). With
    `data.until` the facts are cut there (`stream.facts_until`). Other counts, or a summary that
    cannot be cut, read every partition."""
    path = V.validated_events(vdir)
    summary = vdir / stream.SUMMARY
    i, N = cfg.features.shard, cfg.features.num_shards
    if path.is_dir() and summary.exists() and i is not None:
        facts = json.loads(summary.read_text())
        if cfg.data.until:
            facts = stream.facts_until(facts, to_utc(cfg.data.until).value // 1000)
        P = facts["num_partitions"] if facts else 0
        parts = range(i, P, N) if P and P % N == 0 else [i % P] if P and N % P == 0 else None
        if parts is not None:
            return pa.concat_tables([stream.read_partition(path / stream.partition_name(p, P)) for p in parts]), facts
    return pq.read_table(path), None


INACTIVE_WARN = 0.3  # the share of long-inactive examples above which the summary points at eligibility
# Below this many users in validation or test, their ROC-AUC and its interval over users say
# little (the demo has about 300 in each): the summary says so rather than letting the figures pass.
FEW_USERS_WARN = 50


def few_users_warning(users: dict[str, int]) -> str | None:
    """The warning for a build whose validation or test split (`users`: users per split, of the
    whole build) holds under FEW_USERS_WARN users; None when both hold enough."""
    few = [f"{name} {users[name]}" for name in ("val", "test") if name in users and users[name] < FEW_USERS_WARN]
    if not few:
        return None
    return (f"few users to judge models on ({', '.join(few)}; under {FEW_USERS_WARN}): their ROC-AUCs and intervals "
            "will move a lot with who is in them; more users (or a smaller labels.train_frac, which leaves more to "
            "validation and test) make them worth reading (docs/contract.md#using-your-own-data)")


def print_summary(m: dict, whole: bool = True) -> None:
    """`whole`: the store holds every user (not one shard of them), so its split sizes are the run's."""
    v = m["validation"]
    lines = [
        f"feature store {m['feature_file']}",
        f"  rows in {v['rows_in']:,} = accepted {v['accepted']:,} + duplicates {v['duplicates']:,}"
        f" + quarantined {v['quarantined']:,} {v['reasons'] or ''}",
        f"  users {m['users']:,}  examples {m['examples']:,} (unlabelled {m['unlabelled_examples']:,})",
        "  items: " + ", ".join(f"{k} {n:,}" for k, n in m["items"].items()),
    ]
    for name, s in m["splits"].items():
        rate = "-" if s["label_rate"] is None else f"{s['label_rate']:.3f}"
        lines.append(f"  {name:<5} examples {s['examples']:>7,}  users {s['users']:>6,}  engaged rate {rate}")
    if whole and (warning := few_users_warning({k: s["users"] for k, s in m["splits"].items()})):
        lines.append(f"  {warning}")
    mv = m["message_vectors"]
    if mv:
        lines.append(
            f"  message vectors: {mv['messages']:,} messages, {mv['unique']:,} distinct, "
            f"{mv['cached']:,} from cache, {mv['encoded']:,} encoded in {mv['seconds']}s"
        )
    quiet = m.get("labels", {}).get("inactive_28d_share")
    if quiet is not None:
        lines.append(f"  examples whose user had no own activity in the 28 days before as_of: {quiet:.1%}")
        if quiet > INACTIVE_WARN:
            lines.append("  many examples are users long gone (easy negatives that inflate ROC-AUC): see "
                         "labels.max_inactive_days, labels.last_cutoff and program_end in the users table "
                         "(docs/contract.md#eligibility)")
    lines.append("  seconds per step: " + ", ".join(f"{k} {s}" for k, s in m["seconds"].items()))
    print("\n".join(lines))
