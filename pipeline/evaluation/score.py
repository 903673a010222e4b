"""Scoring (docs/design.md §9): every eligible user's risk of not being engaged next week at
`as_of`, from the `champion` model, written atomically as Parquet for coaches' tools.

The scoring build reads the events before `as_of` only, reuses the message-vector cache
and the vocabularies of the main workdir (so ids mean what they meant in training), and
lives in its own folder so it never overwrites the training features."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import atomic_path
from features import contract as C
from features.dataset import FeatureDataset, collate
from features.normalise import to_utc
from features.store import read_meta
from features.validate import EVENTS
from features.vocab import pseudonyms
from models.checkpoint import load_model
from pipeline import tracking
from pipeline.config import Config
from pipeline.data.features import features_stage
from pipeline.data.validate import ensure_validated
from pipeline.evaluation import registry
from pipeline.paths import Paths
from pipeline.training import loop

log = logging.getLogger(__name__)
COLUMNS = ["user_id", "as_of", "risk", "rank", "model_name", "model_version", "run_id"]


def scoring_config(cfg: Config, as_of: str) -> Config:
    """A config whose feature build holds one cutoff, `as_of`, unlabelled, for all users."""
    base = Paths.of(cfg)
    day = to_utc(as_of).strftime("%Y-%m-%d")
    return replace(
        cfg,
        workdir=str(base.root / "scoring" / day),
        data=replace(cfg.data, until=to_utc(as_of).isoformat()),
        labels=replace(cfg.labels, first_cutoff=to_utc(as_of).isoformat(), include_unlabelled=True,
                       oot_cutoffs=0, lookback_days=cfg.labels.lookback_days),
        features=replace(cfg.features, cache_dir=str(base.text_cache), vocab_path=str(base.vocab), shard=None,
                         num_shards=1),
    )


def default_output(cfg: Config, as_of: str) -> Path:
    root = Path(cfg.jobs.scores_dir) if cfg.jobs.scores_dir else Paths.of(cfg).root / "scores"
    return root / f"scores-{to_utc(as_of).strftime('%Y-%m-%d')}.parquet"


def score(cfg: Config, as_of: str, out: Path | None = None) -> Path:
    """Write (user_id, as_of, risk, rank, model_name, model_version, run_id) for every
    eligible user at `as_of`; rank 1 is the riskiest."""
    champion = registry.champion_version(cfg)
    if champion is None:
        raise UserError(f"no '{registry.CHAMPION}' version of model {cfg.tracking.model_name!r} in "
                        f"{tracking.tracking_uri(cfg)}; train and evaluate one first (`make train evaluate`, "
                        "or `python -m jobs run weekly-retrain --as-of DATE`)")
    # Validate (or simulate) once, in the main workdir; the scoring build reads the result.
    vdir = ensure_validated(cfg)
    scfg = scoring_config(replace(cfg, data=replace(cfg.data, source="files", events=str(vdir))), as_of)
    path = features_stage(scfg)
    instant = int(to_utc(as_of).timestamp())
    model, _ = load_model(registry.download_model(cfg, champion.run_id))
    data = FeatureDataset(path, model.config)
    rows = np.flatnonzero(data.examples["as_of"] == instant)
    if not len(rows):
        raise UserError(f"no user is eligible at {as_of}: nobody has events before it in {cfg.data.events}")
    ids, _, p = loop.predict(model, loop.loader(data.subset(rows), 256, collate), next(model.parameters()).device)
    keys = data.user_key[ids]
    # Back from pseudonyms to the ids coaches use, through the same keyed hash.
    users = pq.read_table(vdir / EVENTS, columns=[C.USER_ID])[C.USER_ID].unique().to_numpy(
        zero_copy_only=False)
    raw = pd.Series(users, index=pseudonyms(users, cfg.features.pseudonym_key))
    risk = 1.0 - p.astype(np.float64)
    order = np.lexsort((keys, -risk))  # riskiest first; ties broken by pseudonym, stably
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    df = pd.DataFrame({
        "user_id": raw.reindex(keys).to_numpy(), "as_of": pd.Timestamp(instant, unit="s", tz="UTC"),
        "risk": risk, "rank": rank, "model_name": cfg.tracking.model_name,
        "model_version": str(champion.version), "run_id": champion.run_id,
    }).sort_values("rank", kind="stable")[COLUMNS]
    out = Path(out) if out else default_output(cfg, as_of)
    # Order: the complete file under a temporary name, then the MLflow run, then the rename.
    # A full disk fails before anything is logged; a logging failure leaves no score file
    # for coaches' tools without a run that accounts for it; nothing is ever half-written.
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        _log(cfg, as_of, df, read_meta(path).source_fingerprint, path, out)
    print(f"score: {len(df):,} users at {as_of} with {cfg.tracking.model_name} v{champion.version}; "
          f"mean risk {df.risk.mean():.3f}, {int((df.risk > 0.5).sum()):,} above 0.5 -> {out}")
    return out


def _log(cfg: Config, as_of: str, df: pd.DataFrame, digest: str, path: Path, out: Path) -> None:
    """Summary statistics only: no user id goes to MLflow."""
    tracking.setup(cfg)
    with mlflow.start_run(run_name=f"score-{as_of}"):
        mlflow.set_tags({"stage": "score", "kind": "score", "as_of": as_of, "model_version": df.model_version.iloc[0],
                         "git_commit": tracking.git_commit(), "config_name": cfg.name, "scores_file": str(out)})
        tracking.log_dataset(str(path), digest, context="scoring")
        q = df.risk.quantile([0.1, 0.5, 0.9])
        tracking.log_metrics({"users": len(df), "risk_mean": df.risk.mean(), "risk_p10": q[0.1], "risk_p50": q[0.5],
                              "risk_p90": q[0.9], "share_risk_above_0_5": (df.risk > 0.5).mean()})
