"""`make evaluate`: the trained model, the baselines and (on simulator data) the oracle on
exactly the same examples of validation, test and out-of-time test (docs/design.md §7); metrics
and plots to MLflow; then the champion gate (pipeline/registry.py)."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from common.errors import UserError
from common.files import atomic_path
from features import contract as C
from features.aggregates import aggregates_of
from features.dataset import load_examples
from features.normalise import parse_timestamps
from features.store import SPLITS, UNLABELLED, build_id, feature_files, read_meta
from features.vocab import pseudonyms
from pipeline import serving, tracking
from pipeline.config import Config
from pipeline.evaluation import message_scores, plots, registry
from pipeline.evaluation.baselines import fit_baselines, predict
from pipeline.evaluation.blend import blend, crossfit_blend, fit_blend
from pipeline.evaluation.metrics import binary_metrics, paired_auc_difference
from pipeline.paths import Paths
from pipeline.training.train import BEST, DONE, PREDICTIONS, run_name

log = logging.getLogger(__name__)
EVAL_SPLITS = ("val", "test", "oot")
BLEND = "blend"  # the blend's key in `metrics` and `scores`
# Every learned model's ROC-AUC is also given as a difference to gradient boosting on the aggregates
# (issue 14's yardstick) with a 95% interval over users (`paired_auc_difference`); not for the
# trivial baselines and the oracle.
REFERENCE = "hgb"
NO_INTERVAL = {REFERENCE, "prevalence", "active_last_week", "oracle"}
GBMS = {"hgb", message_scores.NAME}  # the gradient boostings: MLflow models of their own, blend partners


@dataclass
class EvalResult:
    run_id: str | None
    metrics: dict[str, dict[str, dict]]  # model/baseline name -> split -> metrics
    decision: registry.GateDecision | None  # the sequence model's gate
    # Every gate in order: "model", then "hgb" (eval.champion_hgb) and "blend" (eval.champion_blend).
    decisions: dict[str, registry.GateDecision] = field(default_factory=dict)


def baselines_cache(cfg: Config, files: list[Path], name: str = "") -> Path:
    """Where the baselines' predictions (name "") or one fitted estimator (`name`) of this feature
    build are cached: keyed by the build and by the code that fits them, so a changed baseline is
    fitted again rather than read back from the code before."""
    code = message_scores.code_digest()
    return Paths.of(cfg).features / f"baselines-{build_id(files)}-{code}{'-' + name + '.pkl' if name else '.parquet'}"


def baseline_predictions(cfg: Config, files: list[Path], examples: dict, user_key: np.ndarray) -> dict[str, np.ndarray]:
    """p_engaged of each baseline (and of gradient boosting with message scores, `hgb_text`) for
    every example (NaN where unlabelled), fitted on the train split only; cached per feature
    build and code (`baselines_cache`) and logged once as MLflow runs."""
    cache = baselines_cache(cfg, files)
    if cache.exists():
        df = pd.read_parquet(cache)
        if set(cfg.eval.baselines) <= set(df.columns):
            return {b: df[b].to_numpy() for b in cfg.eval.baselines}
    X, names = aggregates_of(files)
    plain = [b for b in cfg.eval.baselines if b != message_scores.NAME]
    fitted = fit_baselines(X, examples["label"], examples["split"], names, plain,
                           seed=cfg.train.seed, min_active_days=cfg.labels.min_active_days, threads=1)
    labelled = examples["label"] != UNLABELLED
    out = {}
    for name, model in fitted.items():
        out[name] = np.full(len(X), np.nan)
        out[name][labelled] = predict(model, X[labelled])
    if message_scores.NAME in cfg.eval.baselines:
        msgs = message_scores.recent_user_messages(files)
        with threadpool_limits(1):
            fitted[message_scores.NAME] = model = message_scores.MessageScoredHGB(cfg.train.seed).fit(
                X, msgs, examples["label"], examples["split"], user_key)
            p = model.predict_proba(X, msgs)[:, 1]
        out[message_scores.NAME] = np.where(labelled, p, np.nan)
    for name in GBMS & set(fitted):  # kept for the runs' MLflow models (`_log`) and the blend's
        with atomic_path(_estimator_file(cfg, files, name)) as tmp, open(tmp, "wb") as f:
            pickle.dump((fitted[name], names), f)
    pd.DataFrame(out).to_parquet(cache)
    return {b: out[b] for b in cfg.eval.baselines}


def _estimator_file(cfg: Config, files: list[Path], name: str) -> Path:
    return baselines_cache(cfg, files, name)


def oracle_predictions(cfg: Config, examples: dict, user_key: np.ndarray) -> np.ndarray | None:
    """The simulator's own P(engaged) per example (NaN where missing): the ceiling."""
    if not cfg.data.truth or not Path(cfg.data.truth).exists():
        return None
    truth = pd.read_parquet(cfg.data.truth)
    as_of, _ = parse_timestamps(truth[C.AS_OF])
    keys = pseudonyms(truth[C.USER_ID].astype(str).to_numpy(), cfg.features.pseudonym_key)
    table = pd.Series(truth["p_engaged"].to_numpy(), index=pd.MultiIndex.from_arrays(
        [keys, as_of.astype("int64").to_numpy() // 10**6]))
    want = pd.MultiIndex.from_arrays([user_key, examples["as_of"]])
    return table.reindex(want).to_numpy(dtype=float)


def evaluate(cfg: Config, run_dir: Path | None = None) -> EvalResult:
    files = feature_files(Paths.of(cfg).features)
    run_dir = run_dir or Paths.of(cfg).runs / run_name(cfg)
    if not (run_dir / DONE).exists():
        raise UserError(f"{run_dir}: no finished training run; run `make train CONFIG=...` first")
    done = json.loads((run_dir / DONE).read_text())
    run_id = done["run_id"]
    # predictions.parquet names examples by row number in the build it was made on; a
    # rebuilt store numbers them anew, and the gate would compare mismatched examples.
    if done.get("build_id") != (current := build_id(files)):
        raise UserError(f"{run_dir}: trained on feature build {done.get('build_id') or '(not recorded)'}, but "
                        f"{files[0]} is build {current} (rebuilt since); run `make train` to retrain on it first")
    if cfg.eval.blend and cfg.eval.blend_with not in GBMS & set(cfg.eval.baselines):
        raise UserError(f"eval.blend_with={cfg.eval.blend_with!r}: blend with one of {sorted(GBMS)}, "
                        "listed in eval.baselines")
    preds = pd.read_parquet(run_dir / PREDICTIONS)
    examples, user_key, _ = load_examples(files)
    labels = examples["label"]
    rows = {s: np.flatnonzero((examples["split"] == SPLITS.index(s)) & (labels != UNLABELLED)) for s in EVAL_SPLITS}
    model_p = pd.Series(preds["p_engaged"].to_numpy(), index=preds["example"].to_numpy())
    scores: dict[str, np.ndarray] = {"model": model_p.reindex(np.arange(len(labels))).to_numpy()}
    scores |= baseline_predictions(cfg, files, examples, user_key)
    blend_params, partner = None, cfg.eval.blend_with
    val = rows["val"]
    if cfg.eval.blend and np.isfinite(scores["model"][val]).all():
        # The sequence model with gradient boosting (missing predictions fail just below).
        blend_params = fit_blend(scores["model"][val], scores[partner][val], labels[val])
        scores[BLEND] = blend(scores["model"], scores[partner], *blend_params)
        # On validation itself: out of fold (by user), never scored by the weight picked on it.
        scores[BLEND][val] = crossfit_blend(scores["model"][val], scores[partner][val], labels[val], user_key[val])
    oracle = oracle_predictions(cfg, examples, user_key)
    if oracle is not None:
        scores["oracle"] = oracle

    metrics: dict[str, dict[str, dict]] = {}
    for name, p in scores.items():
        metrics[name] = {}
        for s, r in rows.items():
            ok = r[np.isfinite(p[r])]
            if name == "model" and len(ok) != len(r):
                raise UserError(f"{run_dir}: predictions do not cover the {s} split; re-run `make train`")
            metrics[name][s] = binary_metrics(labels[ok], p[ok], cfg.eval.top_frac, cfg.eval.calibration_bins)
    against_reference(metrics, scores, labels, rows, user_key)
    blend_run = _log(cfg, run_id, files, metrics, scores, labels, rows, run_dir, blend_params)
    decisions: dict[str, registry.GateDecision] = {}
    if run_id:
        # The sequence model, then (if asked) gradient boosting and the blend (its validation
        # figure out of fold) as candidates too: the champion is the best of them on validation.
        candidates = [("model", run_id)]
        if cfg.eval.champion_hgb:
            candidates += [(name, _baseline_run(cfg, files, name)) for name in sorted(GBMS & set(scores))]
        if cfg.eval.champion_blend and blend_params is not None:
            candidates.append(("blend", blend_run))
        for name, candidate_run in candidates:
            if candidate_run is not None:
                p = scores[BLEND if name == "blend" else name]
                decisions[name] = registry.gate(cfg, candidate_run, files, rows, labels, {s: p[r] for s, r in rows.items()})
    decision = decisions.get("model")
    print_table(metrics, run_dir.name, decisions, cfg.eval.blend_with)
    (run_dir / "evaluation.json").write_text(json.dumps({"metrics": metrics, "decision": decision.__dict__ if decision else None,
                                                         "decisions": {k: d.__dict__ for k, d in decisions.items()}},
                                                        default=float, indent=1))
    return EvalResult(run_id, metrics, decision, decisions)


def against_reference(metrics: dict, scores: dict, labels: np.ndarray, rows: dict, user_key: np.ndarray) -> None:
    """Adds roc_auc_vs_hgb (and _lo, _hi: the 95% interval over users) to each learned model's
    metrics of each split where both it and REFERENCE score every example."""
    if REFERENCE not in scores:
        return
    for name in [n for n in scores if n not in NO_INTERVAL]:
        for s, r in rows.items():
            p, ref = scores[name][r], scores[REFERENCE][r]
            if len(r) and np.isfinite(p).all() and np.isfinite(ref).all():
                d = paired_auc_difference(labels[r], p, ref, user_key[r])
                metrics[name][s] |= {f"roc_auc_vs_{REFERENCE}": d["diff"], f"roc_auc_vs_{REFERENCE}_lo": d["lo"],
                                     f"roc_auc_vs_{REFERENCE}_hi": d["hi"]}


def _plots(cfg, files, scores, labels, rows, run_dir: Path) -> None:
    """The figures of test and out of time, and the attention maps, logged under plots/."""
    plot_dir = run_dir / "plots"
    for s in ("test", "oot"):
        curves = {f"blend with {cfg.eval.blend_with}" if n == BLEND else n: (labels[rows[s]], p[rows[s]])
                  for n, p in scores.items() if np.isfinite(p[rows[s]]).all()}
        paths = [plots.plot_roc(curves, plot_dir / f"roc_{s}.png", f"ROC ({s})"),
                 plots.plot_pr(curves, plot_dir / f"pr_{s}.png", f"Precision-recall, disengaged ({s})"),
                 plots.plot_calibration(curves, plot_dir / f"calibration_{s}.png", cfg.eval.calibration_bins,
                                        f"Calibration ({s})"),
                 plots.plot_lift(curves, plot_dir / f"lift_{s}.png", cfg.eval.top_frac, f"Lift ({s})")]
        tracking.log_artifacts(paths, "plots")
    from pipeline.evaluation.attention import attention_plots

    tracking.log_artifacts(attention_plots(cfg, run_dir, files, rows["test"], plot_dir), "plots")


def _log(cfg, run_id, files, metrics, scores, labels, rows, run_dir: Path, blend_params=None) -> str | None:
    """Metrics, plots and the runs of the blend, baselines and oracle; returns the blend's run id
    when that run holds an MLflow model (the champion gate's candidate), else None."""
    if not run_id:
        return None
    bid = build_id(files)
    tracking.setup(cfg)
    client = tracking.client(cfg)
    test_auc = {name: m["test"]["roc_auc"] for name, m in metrics.items()}

    def note(what: str, name: str) -> str:  # the run's description: beside gradient boosting's test ROC-AUC
        m, key = metrics[name]["test"], f"roc_auc_vs_{REFERENCE}"
        lead = (m[key], m[key + "_lo"], m[key + "_hi"]) if key in m else None
        return tracking.describe(what, bid, test_auc[name], None if name == "hgb" else test_auc.get("hgb"), lead)

    model_what = tracking.what("model", run_dir.name, client.get_run(run_id).data.tags)
    with mlflow.start_run(run_id=run_id):
        for s in EVAL_SPLITS:
            tracking.log_metrics(metrics["model"][s], prefix=f"{s}_")
            tracking.log_metrics({f"{s}_oracle_roc_auc": metrics.get("oracle", {}).get(s, {}).get("roc_auc")})
        mlflow.set_tags({"build_id": bid, tracking.NOTE: note(model_what, "model")})
        if cfg.eval.plots:
            _plots(cfg, files, scores, labels, rows, run_dir)
    exp_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    common = {"stage": "evaluate", "build_id": bid, "config_name": cfg.name, "git_commit": tracking.git_commit()}
    blend_run, partner = None, cfg.eval.blend_with
    if blend_params is not None:
        w, a, b = blend_params  # one blend run per model run and partner
        text = note(f"**Blend** of the sequence model `{run_dir.name}` (test ROC-AUC {test_auc['model']:.3f}) with "
                    f"{tracking.what(partner, partner, {})}: their logits averaged with a weight, then Platt-scaled, "
                    "both picked on validation", BLEND)
        where = f"tags.blend_of = '{run_id}' and tags.blend_with = '{partner}'"
        if _existing_run(client, exp_id, where, text) is None:
            with mlflow.start_run(run_name=f"{run_dir.name}+{partner}", description=text):
                mlflow.set_tags(common | {"kind": "blend", "blend_of": run_id, "blend_with": partner})
                mlflow.log_params({"model_weight": w, "calibration_scale": round(a, 4), "calibration_bias": round(b, 4)})
                for s in EVAL_SPLITS:
                    tracking.log_metrics(metrics[BLEND][s], prefix=f"{s}_")
        found = client.search_runs([exp_id], where, max_results=1)[0]
        _add_missing(client, found, metrics[BLEND])
        blend_run = found.info.run_id if serving.LOGGED_MODEL_TAG in found.data.tags else None
        if (cfg.eval.champion_blend and blend_run is None
                and (fitted := _estimator_file(cfg, files, partner)).exists() and (run_dir / BEST).exists()):
            # An MLflow model too, to compete for the alias: both models and the two numbers, scoring
            # raw events as one (also for a blend run logged before without one).
            with open(fitted, "rb") as f:
                estimator, names = pickle.load(f)
            with mlflow.start_run(run_id=found.info.run_id):
                info = serving.log_blend_model(run_dir / BEST, estimator, names, read_meta(files[0]), cfg, blend_params)
                mlflow.set_tag(serving.LOGGED_MODEL_TAG, info.model_id)
            blend_run = found.info.run_id
    # Baselines and the oracle: one run each per feature build, created once.
    for name in [n for n in metrics if n not in ("model", BLEND)]:
        kind = "oracle" if name == "oracle" else "boosting" if name == message_scores.NAME else "baseline"
        text = note(tracking.what(name, name, {}), name)
        if (old := _existing_run(client, exp_id, f"tags.build_id = '{bid}' and tags.baseline = '{name}'", text)):
            _add_missing(client, old, metrics[name])
            continue
        with mlflow.start_run(run_name=name, description=text):
            mlflow.set_tags(common | {"kind": kind, "baseline": name})
            tracking.log_dataset(str(files[0]), read_meta(files[0]).source_fingerprint, context="evaluation")
            for s in EVAL_SPLITS:
                tracking.log_metrics(metrics[name][s], prefix=f"{s}_")
            if name in GBMS and (fitted := _estimator_file(cfg, files, name)).exists():
                # Gradient boosting as an MLflow model too: it scores raw events like the sequence model.
                with open(fitted, "rb") as f:
                    estimator, names = pickle.load(f)
                info = serving.log_baseline_model(estimator, names, read_meta(files[0]), cfg)
                mlflow.set_tag(serving.LOGGED_MODEL_TAG, info.model_id)
    return blend_run


def _add_missing(client, run, metrics: dict) -> None:
    """Log to a run an earlier evaluate created the figures it lacks (the differences to `hgb`
    came later than some runs): the same examples and models, so the same figures."""
    have = run.data.metrics
    for s in EVAL_SPLITS:
        for k, v in metrics[s].items():
            if k.startswith(f"roc_auc_vs_{REFERENCE}") and f"{s}_{k}" not in have and np.isfinite(v):
                client.log_metric(run.info.run_id, f"{s}_{k}", float(v))


def _baseline_run(cfg: Config, files: list[Path], name: str) -> str | None:
    """The run id of baseline `name` (or `hgb_text`) on this feature build, when it logged an MLflow model."""
    client = tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    found = client.search_runs([exp], f"tags.build_id = '{build_id(files)}' and tags.baseline = '{name}'", max_results=1)
    return found[0].info.run_id if found and serving.LOGGED_MODEL_TAG in found[0].data.tags else None


def _existing_run(client, exp_id: str, where: str, description: str):
    """The run an earlier evaluate logged that `where` finds (it gets `description`: runs logged
    before descriptions have none), or None."""
    found = client.search_runs([exp_id], where, max_results=1)
    if found:
        client.set_tag(found[0].info.run_id, tracking.NOTE, description)
    return found[0] if found else None


def print_table(metrics: dict, model_name: str, decisions: dict, blend_with: str = "hgb") -> None:
    print(f"\nevaluation of {model_name} (ROC-AUC / PR-AUC of the disengaged / their recall in the top 10% riskiest, as a share of the most possible)")
    order = sorted(metrics, key=lambda n: -np.nan_to_num(metrics[n]["test"]["roc_auc"]))
    labels = {n: model_name if n == "model" else f"blend with {blend_with}" if n == BLEND else n for n in order}
    w = max(18, *map(len, labels.values()))
    print(f"  {'':<{w}}" + "".join(f"{s:>26}" for s in EVAL_SPLITS))
    for name in order:
        cells = "".join(f"{m['roc_auc']:>10.3f}{m['pr_auc']:>8.3f}{m['recall_at_top_of_max']:>8.3f}"
                        for m in (metrics[name][s] for s in EVAL_SPLITS))
        print(f"  {labels[name]:<{w}}{cells}")
    key = f"roc_auc_vs_{REFERENCE}"
    against = [n for n in order if any(key in metrics[n][s] for s in EVAL_SPLITS)]
    if against:
        print(f"  ROC-AUC minus {REFERENCE}'s [95% interval, users resampled]:")
        for name in against:
            cells = "".join(f"  {s} {m[key]:+.4f} [{m[key + '_lo']:+.4f}, {m[key + '_hi']:+.4f}]"
                            for s, m in ((s, metrics[name][s]) for s in EVAL_SPLITS) if key in m)
            print(f"    {labels[name]:<{w}}{cells}")
    for name, d in decisions.items():
        champ = "-" if d.champion is None else f"{d.champion:.4f}"
        who = "" if name == "model" else f" for {'the blend' if name == 'blend' else name}"
        outcome = (f"PROMOTED version {d.version}" if d.promoted
                   else f"champion stays version {d.champion_version}, candidate version {d.version} not promoted")
        print(f"  champion gate{who}: candidate {d.candidate:.4f} vs champion {champ} -> {outcome} ({d.reason})")
