"""MLflow tracking (docs/design.md §8): one run per stage with the resolved config as params and
`config.yaml`, the data fingerprint as a logged input, the git commit, metrics and plots, and
a short markdown description (`describe`) that the UI shows on the run's page.

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

from features.store import build_id, feature_files
from pipeline.config import Config, flat_params, to_yaml

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
NOTE = "mlflow.note.content"  # the tag the MLflow UI shows and edits as a run's description


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

    data: {"path": feature file, "digest": source fingerprint} logged as the run's input; its
    feature build is named in the run's description and its `build_id` tag."""
    if not is_rank_zero():
        yield None
        return
    setup(cfg)
    tags = dict(tags or {})
    if data:
        tags["build_id"] = build_id(feature_files(Path(data["path"]).parent))
    with mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name) as run:
        if not resume_run_id:
            kind = tags.get("kind", stage)
            tags[NOTE] = describe(what(kind, run_name, tags), tags.get("build_id"))
            if kind == "model":
                tags[NOTE] += "\n\nTest ROC-AUC: not evaluated yet (`make evaluate` adds it here)."
            mlflow.set_tags({"stage": stage, "git_commit": git_commit(), "config_name": cfg.name, **tags})
            params = {k: str(v)[:500] for k, v in flat_params(cfg).items()}
            for chunk in _chunks(list(params.items()), 100):
                mlflow.log_params(dict(chunk))
            log_text(to_yaml(cfg), "config.yaml")
            if data:
                log_dataset(data["path"], data["digest"])
        yield run.info.run_id


WHAT = {  # a run's kind in words, for its description
    "pretrain": "**Pretraining** of the stream encoders on their self-supervised objectives (no labels)",
    "oracle": "**Oracle**, the simulator's own P(engaged): the ceiling no model can beat",
    "hgb": "**Gradient boosting** baseline (HistGradientBoosting on per-user aggregates)",
    "hgb_text": "**Gradient boosting with message scores** (HistGradientBoosting on per-user aggregates plus "
                "what a logistic regression on the message vectors makes of the user's messages of the last "
                "3 weeks, learned from the training labels)",
    "logistic": "**Logistic regression** baseline on per-user aggregates",
    "prevalence": "**Prevalence** baseline: the train engaged rate, for everyone",
    "active_last_week": "**Active last week** baseline: the train engaged rate with / without activity "
                        "on enough days of the last week",
}


def what(kind: str, name: str, tags: dict[str, str]) -> str:
    """What run `name` is, in words. kind: a run's `kind` tag (model, pretrain, oracle) or a
    baseline's name; a sequence model is described from the tags train gives it."""
    if kind == "pretrain":
        return f"{WHAT[kind]}: {name.removeprefix('pretrain-')}"
    if kind != "model":
        return WHAT.get(kind, f"**{kind}** `{name}`")
    fraction = f"{float(tags['label_fraction']):.0%}" if tags.get("label_fraction") else "?"
    hybrid = ", with the baselines' aggregates" if tags.get("aggregates") == "True" else ""
    return (f"**Sequence model** `{name}`: {tags.get('init', '?')} encoders, {fraction} of the training "
            f"labels, streams {tags.get('streams', '?')}, {tags.get('pooling', '?')} pooling{hybrid}")


def describe(what: str, build: str | None, test_auc: float | None = None, hgb_auc: float | None = None,
             lead: tuple[float, float, float] | None = None) -> str:
    """A run's description (markdown): what it is, on which feature build and, once
    evaluated, its test ROC-AUC beside gradient boosting's on the same examples, and `lead`
    (the difference, then its 95% interval over users) where the evaluation gave one."""
    parts = [what + ".", f"Feature build `{build}`." if build else "Feature build not recorded."]
    if _is_number(test_auc):
        beside = f"gradient boosting {hgb_auc:.3f} on the same examples" if _is_number(hgb_auc) else ""
        if beside and lead is not None and all(map(_is_number, lead)):
            beside += f"; the difference {lead[0]:+.4f}, 95% interval over users [{lead[1]:+.4f}, {lead[2]:+.4f}]"
        parts.append(f"Test ROC-AUC **{test_auc:.3f}**{f' ({beside})' if beside else ''}.")
    return "\n\n".join(parts)


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
