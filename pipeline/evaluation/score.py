"""Scoring (docs/design.md §9): every eligible user's risk of not being engaged next week at
`as_of`, from the `champion` model, written atomically as Parquet for coaches' tools.

The champion is loaded by its alias as an MLflow model and scores through its own bundle
(pipeline/serving.py: the vocabularies of its training build, so ids mean what they meant in
training). The scoring build reads the events before `as_of` only, reuses the main workdir's
message-vector cache, and lives in its own folder so it never overwrites the training features."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import atomic_path
from features.io import read_table
from features.normalise import to_utc
from features.store import read_meta
from features.validate import REPORT, USERS, validated_events
from pipeline import tracking
from pipeline.config import Config
from pipeline.data.validate import ensure_validated
from pipeline.evaluation import registry
from pipeline.paths import Paths

log = logging.getLogger(__name__)
COLUMNS = ["user_id", "as_of", "risk", "rank", "model_name", "model_version", "run_id"]


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
    # Validate (or simulate) once, in the main workdir; the champion, loaded by its alias as
    # any notebook would, scores the validated events with the pipeline's own feature code.
    vdir = ensure_validated(cfg)
    scorer = registry.load_champion(cfg).unwrap_python_model().scorer
    users = read_table(vdir / USERS, "users") if (vdir / USERS).exists() else None
    workdir = Paths.of(cfg).root / "scoring" / to_utc(as_of).strftime("%Y-%m-%d")
    report = json.loads((vdir / REPORT).read_text())
    # A streaming validation's partitions are scored one at a time (a user lives in one), so
    # memory follows the largest partition, not the log.
    source = validated_events(vdir)
    parts = sorted(source.glob("part-*.parquet")) if source.is_dir() else []
    keys, p, raw, path = [], [], [], None
    for f in parts or [source]:
        events = pq.read_table(f)
        k, q, built = scorer.score_table(events, users, as_of, workdir / f.stem if parts else workdir,
                                         cache_dir=Paths.of(cfg).text_cache, some=bool(parts),
                                         source_fingerprint=report["source_fingerprint"])
        keys.append(k)
        p.append(q)
        raw.append(scorer.raw_ids(events, k))
        path = built or path
    keys, p, raw = np.concatenate(keys), np.concatenate(p), np.concatenate(raw)
    if not len(keys):
        raise UserError(f"no user is eligible at {as_of}")
    instant = int(to_utc(as_of).timestamp())
    risk = 1.0 - p.astype(np.float64)
    order = np.lexsort((keys, -risk))  # riskiest first; ties broken by pseudonym, stably
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    df = pd.DataFrame({
        "user_id": raw,  # back from pseudonyms to the ids coaches use
        "as_of": pd.Timestamp(instant, unit="s", tz="UTC"),
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
