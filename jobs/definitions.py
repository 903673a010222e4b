"""The scheduled jobs (docs/design.md §9) as ordered lists of named steps.

weekly-retrain:  features -> pretrain (only when stale) -> train -> evaluate (ends with the
                 champion gate, so a failure in any earlier step never moves `champion`)
nightly-score:   score every eligible user with the champion

Each step is a plain function of a `Context` (the base config and one as-of date); what it
returns is recorded in the job's state file. Steps rebuild the per-date config from the base
config, so a step can run in a fresh process after a crash (runner.py resumes there).

Each weekly as-of date gets its own workdir, <workdir>/jobs/weekly-retrain/<date>/ (features,
runs, state), while the message-vector cache, the vocabularies and the pretrained encoders
live in the base workdir and are shared by every date.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from common import stamps
from common.errors import UserError
from pipeline.config import Config
from pipeline.paths import Paths

PRETRAIN_STAMP = "jobs-pretrain.json"  # which as-of the shared encoders were pretrained for


@dataclass
class Context:
    cfg: Config  # the base config (as loaded)
    job: str
    as_of: datetime  # 00:00 UTC of the scheduled day
    folder: Path  # <workdir>/jobs/<job>/<date>: state file (and, weekly, features + runs)
    results: dict[str, dict] = field(default_factory=dict)  # earlier steps' results

    @property
    def day(self) -> str:
        return self.as_of.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], dict[str, Any] | None]


@dataclass(frozen=True)
class Job:
    name: str
    description: str
    cron_key: str  # the JobsConfig field holding its cron expression
    steps: tuple[Step, ...]

    def cron(self, cfg: Config) -> str:
        return getattr(cfg.jobs, self.cron_key)


# --- configs derived from the base config ------------------------------------------------


def validated_dir(cfg: Config) -> Path:
    """Where the base config's validated events are (see pipeline.data.validate.ensure_validated)."""
    given = Path(cfg.data.events)
    from features.validate import REPORT

    return given if given.is_dir() and (given / REPORT).exists() else Paths.of(cfg).validated


def on_validated(cfg: Config) -> Config:
    """Read the base workdir's validated events as they are: validation (and the simulator)
    run once, in the base workdir, not again in every dated or scoring workdir."""
    return replace(cfg, data=replace(cfg.data, source="files", events=str(validated_dir(cfg))))


def retrain_config(cfg: Config, as_of: datetime) -> Config:
    """The weekly retrain's config for one as-of: events before it only, its own workdir,
    the shared cache, vocabularies and encoders of the base workdir."""
    base = Paths.of(cfg)
    day = as_of.strftime("%Y-%m-%d")
    from pipeline.training.train import run_name

    dated = on_validated(cfg)
    return replace(
        dated,
        workdir=str(base.jobs / "weekly-retrain" / day),
        data=replace(dated.data, until=as_of.isoformat()),
        # The base config's num_shards (and scheduler) hold: features_step builds every shard.
        features=replace(cfg.features, cache_dir=str(base.text_cache), vocab_path=str(base.vocab), shard=None),
        pretrain=replace(cfg.pretrain, dir=str(base.pretrain)),
        train=replace(cfg.train, run_name=f"{run_name(cfg)}-{day}"),  # one MLflow run name per week
    )


@contextmanager
def shared_inputs(cfg: Config):
    """Held while a step writes what every job shares (validated events, the message-vector
    cache, the append-only vocabularies): the nightly score and the weekly retrain may
    overlap, and two vocabulary writers would hand one id to two different foods."""
    path = Paths.of(cfg).jobs / "shared-inputs.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=cfg.jobs.shared_lock_timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"waited {cfg.jobs.shared_lock_timeout_s}s for {path}: another job is still building "
                        "features; rerun later (finished steps are kept) or raise jobs.shared_lock_timeout_s") from None
    try:
        yield
    finally:
        lock.release()


def check_feed(cfg: Config, as_of: datetime, vdir: Path) -> None:
    """A one-line error when the newest event validated into `vdir` is more than
    `jobs.max_event_lag_days` before `as_of`: the feed has stopped, and every user would look gone."""
    import json

    from features.normalise import to_utc
    from features.validate import REPORT

    lag_max = cfg.jobs.max_event_lag_days
    newest = json.loads((vdir / REPORT).read_text()).get("ts_max")
    if lag_max is None or newest is None:
        return
    lag = (to_utc(as_of) - to_utc(newest)).total_seconds() / 86_400  # a report's naive time is UTC
    if lag > lag_max:
        raise UserError(f"as-of {as_of:%Y-%m-%d} is {lag:.1f} days after the newest event ({newest[:19]}), more than "
                        f"jobs.max_event_lag_days={lag_max:g}: has the event feed stopped? Fix the feed, run an "
                        "as-of inside the log, or raise jobs.max_event_lag_days")


# --- weekly retrain ----------------------------------------------------------------------


def features_step(ctx: Context) -> dict:
    """Validate new raw events (base workdir), then build this as-of's feature store from
    the events before it: with features.num_shards N, its N shards (each from its own
    partitions of a streamed validation; on the Dask cluster with features.scheduler)."""
    from pipeline.data.fanout import build_shards
    from pipeline.data.validate import ensure_validated

    with shared_inputs(ctx.cfg):
        check_feed(ctx.cfg, ctx.as_of, ensure_validated(ctx.cfg))
        files = build_shards(retrain_config(ctx.cfg, ctx.as_of))
    return {"feature_files": [str(f) for f in files]}


def stale_reason(rcfg: Config, as_of: datetime) -> str | None:
    """Why the shared encoders must be pretrained again for this as-of, or None when they
    can be reused: missing, unknown provenance, pretrained on data after `as_of` (a backfill
    must not see the future), older than `jobs.pretrain_max_age_days`, or no longer fitting
    the new store's vocabularies."""
    from features.dataset import load_examples, model_config_for, streams_with_items
    from features.store import feature_files, read_meta
    from models.checkpoint import load_encoder_state
    from models.engagement import STREAMS

    pdir = Paths.of(rcfg).pretrain
    files = feature_files(Paths.of(rcfg).features)
    mcfg = model_config_for(rcfg.model, read_meta(files[0]))
    streams = streams_with_items(load_examples(files)[0], [s for s in STREAMS if s in mcfg.streams])
    missing = [s for s in streams if not (pdir / f"{s}.pt").exists()]
    if missing:
        return f"no pretrained {', '.join(missing)} encoder in {pdir}"
    stamp = stamps.read_stamp(pdir / PRETRAIN_STAMP)
    if stamp is None or "as_of" not in stamp:
        return f"no {pdir / PRETRAIN_STAMP}: unknown which data the encoders were pretrained on"
    then = datetime.fromisoformat(stamp["as_of"])
    if then > as_of:
        return f"the encoders were pretrained for {then:%Y-%m-%d}, after this as-of (they have seen its future)"
    age = (as_of - then).days
    if age > rcfg.jobs.pretrain_max_age_days:
        return f"the encoders are {age} days old at this as-of (jobs.pretrain_max_age_days={rcfg.jobs.pretrain_max_age_days})"
    for s in streams:
        try:
            load_encoder_state(pdir / f"{s}.pt", mcfg, s)
        except ValueError as e:
            return f"the {s} encoder no longer fits the new feature store ({str(e).splitlines()[0]})"
    return None


def pretrain_step(ctx: Context) -> dict:
    rcfg = retrain_config(ctx.cfg, ctx.as_of)
    if rcfg.train.init != "pretrained":
        return {"pretrained": False, "reason": f"train.init={rcfg.train.init}"}
    reason = stale_reason(rcfg, ctx.as_of)
    pdir = Paths.of(rcfg).pretrain
    if reason is None:
        print(f"pretrain: the encoders in {pdir} are fresh and fit this store; reusing them", flush=True)
        return {"pretrained": False, "reason": "fresh"}
    print(f"pretrain: {reason}; pretraining again", flush=True)
    from features.store import feature_files
    from pipeline.pretraining.pretrain import pretrain

    result = pretrain(rcfg)
    stamps.mark_done(pdir / PRETRAIN_STAMP, result.fingerprint, as_of=ctx.as_of.isoformat(),
                     feature_files=[str(f) for f in feature_files(Paths.of(rcfg).features)], run_id=result.run_id,
                     written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return {"pretrained": True, "reason": reason, "run_id": result.run_id}


def train_step(ctx: Context) -> dict:
    from pipeline.training.train import train

    r = train(retrain_config(ctx.cfg, ctx.as_of))
    return {"run_id": r.run_id, "run_dir": str(r.run_dir), "val_roc_auc": r.val_roc_auc}


def evaluate_step(ctx: Context) -> dict:
    """Metrics against the baselines, then the champion gate: last, so nothing that fails
    before it can move `champion`."""
    from pipeline.evaluation.evaluate import evaluate

    result = evaluate(retrain_config(ctx.cfg, ctx.as_of))
    d = result.decision  # the sequence model's gate
    if d is None:
        return {"promoted": False, "reason": "no MLflow run to register"}
    # The blend (or gradient boosting) may be gated after the model: the step promoted if any
    # candidate did, and `version` is then where `champion` points at the end.
    last = next((x for x in reversed(result.decisions.values()) if x.promoted), d)
    return {"promoted": last.promoted, "version": last.version, "reason": last.reason, "candidate": d.candidate,
            "champion": d.champion, "champion_before": d.champion_version,  # plain JSON types (GateDecision)
            "gates": {name: {"promoted": x.promoted, "version": x.version, "candidate": x.candidate, "reason": x.reason}
                      for name, x in result.decisions.items()}}


# --- nightly score -----------------------------------------------------------------------


def score_step(ctx: Context) -> dict:
    """Score every eligible user with the champion into jobs.scores_dir (atomic write)."""
    import pyarrow.parquet as pq

    from pipeline.evaluation.score import score

    with shared_inputs(ctx.cfg):  # the scoring build appends to the shared vocabularies too
        from pipeline.data.validate import ensure_validated

        check_feed(ctx.cfg, ctx.as_of, ensure_validated(ctx.cfg))
        out = score(on_validated(ctx.cfg), ctx.day)  # that day at 00:00 UTC
    table = pq.read_table(out, columns=["model_version"])
    versions = sorted(set(table["model_version"].to_pylist()))
    return {"scores": str(out), "users": table.num_rows, "model_version": versions[0] if versions else None}


JOBS: dict[str, Job] = {
    "weekly-retrain": Job(
        "weekly-retrain",
        "features -> pretrain if stale -> train -> evaluate + champion gate",
        "weekly_retrain_cron",
        (Step("features", features_step), Step("pretrain", pretrain_step), Step("train", train_step),
         Step("evaluate", evaluate_step)),
    ),
    "nightly-score": Job(
        "nightly-score",
        "risk of not being engaged next week for every eligible user, from the champion",
        "nightly_score_cron",
        (Step("score", score_step),),
    ),
}


def get_job(name: str) -> Job:
    if name not in JOBS:
        raise UserError(f"unknown job {name!r}; choose one of {', '.join(JOBS)}")
    return JOBS[name]


def move_champion(cfg: Config, version: str) -> tuple[str | None, str]:
    """Point `champion` at `version` by hand (`rollback` to undo a promotion, `promote` where
    the gate could not compare); returns (before, after)."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.evaluation import registry

    before = registry.champion_version(cfg)
    try:
        registry.set_champion(cfg, str(version))
    except MlflowException:
        name = cfg.tracking.model_name
        known = sorted(int(mv.version) for mv in tracking.client(cfg).search_model_versions(f"name='{name}'"))
        raise UserError(f"model {name!r} has no version {version} in {tracking.tracking_uri(cfg)}; "
                        f"its versions: {', '.join(map(str, known)) or 'none yet'}") from None
    return (str(before.version) if before else None), str(version)
