"""`make compare`: runs side by side, read back from MLflow itself (docs/design.md §8): the
sequence models (pretrained, scratch, label fractions, ablations), the baselines and, on
simulator data, the oracle, all on the same feature build and the same examples."""

from __future__ import annotations

import json
import sys

import mlflow
import pandas as pd

from common.errors import UserError
from pipeline import tracking
from pipeline.config import Config

METRICS = ["val_roc_auc", "test_roc_auc", "oot_roc_auc", "test_pr_auc", "test_log_loss", "test_brier",
           "test_ece", "test_recall_at_top", "test_precision_at_top", "test_recall_at_top_of_max", "test_lift_at_top"]
# Each learned model's ROC-AUC minus gradient boosting's on the aggregates, with its 95% interval over
# users (pipeline/evaluation/evaluate.py `against_reference`): raw columns in csv and json, one
# "+0.0081 [+0.0032, +0.0130]" column per split in the table and markdown.
AGAINST = [f"{s}_roc_auc_vs_hgb" for s in ("test", "oot")]
METRICS += [c + end for c in AGAINST for end in ("", "_lo", "_hi")]
KIND_ORDER = {"oracle": 0, "model": 1, "blend": 2, "boosting": 3, "baseline": 4}


def comparison(cfg: Config, all_builds: bool = False) -> pd.DataFrame:
    client = tracking.client(cfg)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment {cfg.tracking.experiment!r} at {tracking.tracking_uri(cfg)}; "
                        "run `make train` and `make evaluate` first")
    runs = client.search_runs([exp.experiment_id], "tags.build_id != ''", max_results=5000,
                              order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if r.data.tags.get("kind") in KIND_ORDER and "test_roc_auc" in r.data.metrics]
    if not runs:
        raise UserError(f"no evaluated runs in experiment {cfg.tracking.experiment!r}; run `make evaluate` first")
    latest_build = next(r.data.tags["build_id"] for r in runs if r.data.tags["kind"] == "model") \
        if any(r.data.tags["kind"] == "model" for r in runs) else runs[0].data.tags["build_id"]
    champion = _champion_run(cfg)
    rows, seen = [], set()
    for r in runs:
        t = r.data.tags
        if not all_builds and t["build_id"] != latest_build:
            continue
        name = r.info.run_name
        if (name, t["build_id"]) in seen:  # newest run of each name per build
            continue
        seen.add((name, t["build_id"]))
        rows.append({
            "name": name, "kind": t["kind"], "init": t.get("init", ""),
            "label_fraction": t.get("label_fraction", ""), "streams": t.get("streams", ""),
            "pooling": t.get("pooling", ""), **{m: r.data.metrics.get(m) for m in METRICS},
            "champion": "*" if r.info.run_id == champion else "", "build": t["build_id"],
            "run_id": r.info.run_id[:8],
        })
    df = pd.DataFrame(rows)
    df["_k"] = df["kind"].map(KIND_ORDER)
    return df.sort_values(["_k", "test_roc_auc"], ascending=[True, False]).drop(columns="_k").reset_index(drop=True)


def _champion_run(cfg: Config) -> str | None:
    from pipeline.evaluation.registry import champion_version

    mv = champion_version(cfg)
    return mv.run_id if mv else None


def compare(cfg: Config, fmt: str = "table", out=None, all_builds: bool = False) -> pd.DataFrame:
    out = out or sys.stdout  # looked up per call: a default bound at import misses a redirected stdout
    df = comparison(cfg, all_builds)
    if fmt == "csv":
        df.to_csv(out, index=False)
    elif fmt == "json":
        out.write(json.dumps(df.to_dict(orient="records"), indent=1, default=str) + "\n")
    elif fmt == "markdown":
        out.write(to_markdown(with_intervals(df)) + "\n")
    else:
        shown = with_intervals(df).drop(columns=["build", "init", "label_fraction", "streams", "pooling"])
        out.write(f"experiment {cfg.tracking.experiment!r} at {tracking.tracking_uri(cfg)}, "
                  f"feature build {df['build'].iloc[0]} (* = champion)\n")
        out.write(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n")
    return df


def to_markdown(df: pd.DataFrame) -> str:
    cols = [c for c in df.columns if c not in ("build", "run_id")]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """The difference columns as one text column per split ("" where a run has none)."""
    out = df.drop(columns=[c + end for c in AGAINST for end in ("", "_lo", "_hi")])
    for c in AGAINST:
        out[c] = [f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" if pd.notna(d) and pd.notna(lo) else ""
                  for d, lo, hi in zip(df[c], df[c + "_lo"], df[c + "_hi"])]
    return out
