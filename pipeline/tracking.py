"""MLflow tracking (docs/design.md §8): one run per stage with the resolved config as params and
`config.yaml`, the data fingerprint as a logged input, the git commit, metrics and plots.

Tracking URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the
working directory; artifacts of a new experiment go beside a SQLite file (mlartifacts/).
Only rank 0 of a distributed run logs. Nothing here ever receives message text or raw
user ids: configs are redacted (`pipeline.config.to_dict`) before they are logged.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from pipeline.config import Config, flat_params, to_yaml

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite migrations are chatty
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(cfg.tracking.experiment)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    data: dict[str, str] | None = None,
) -> Iterator[str | None]:
    """An MLflow run for one stage; yields its run id (None on ranks other than 0).

    data: {"path": feature file, "digest": source fingerprint} logged as the run's input."""
    if not is_rank_zero():
        yield None
        return
    setup(cfg)
    with mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name) as run:
        if not resume_run_id:
            mlflow.set_tags({"stage": stage, "git_commit": git_commit(), "config_name": cfg.name, **(tags or {})})
            params = {k: str(v)[:500] for k, v in flat_params(cfg).items()}
            for chunk in _chunks(list(params.items()), 100):
                mlflow.log_params(dict(chunk))
            log_text(to_yaml(cfg), "config.yaml")
            if data:
                log_dataset(data["path"], data["digest"])
        yield run.info.run_id


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def log_dataset(path: str, digest: str, context: str = "training") -> None:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=Path(path).name, digest=digest), context=context)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_metrics(metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if _is_number(v)}
    if clean and is_rank_zero():
        mlflow.log_metrics(clean, step=step)


def _is_number(v: Any) -> bool:
    try:
        return v is not None and float(v) == float(v)  # drops NaN
    except (TypeError, ValueError):
        return False


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def download(run_id: str, artifact_path: str, cfg: Config) -> Path:
    setup(cfg)
    dst = tempfile.mkdtemp(prefix="mlflow-")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst))


def client(cfg: Config) -> MlflowClient:
    setup(cfg)
    return MlflowClient()
