"""`make diagnose`: when a model "learns nothing", say why (the tool the seed's author
needed). Runs the model checks of pipeline/diagnostics/ on real batches of the feature
store, plus facts about the data itself, and prints one verdict per check: PASS, WARN (a
trade-off worth a look, such as truncated sequences) or FAIL (something is broken).
`python -m pipeline diagnose` exits 1 when any check fails (`exit_code`), 0 otherwise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from common.errors import UserError
from features.dataset import FeatureDataset, collate, model_config_for
from features.labels import window_items
from features.store import SPLITS, STREAMS, UNLABELLED, feature_files, load_arrays, read_meta
from models.engagement import EngagementModel
from pipeline.config import Config
from pipeline.diagnostics import CheckResult, run_diagnostics
from pipeline.paths import Paths

# Share of examples cut to max_len above which the truncation check warns.
TRUNCATION_WARN = 0.10


def stream_checks(n: np.ndarray, stream: str, max_len: int) -> list[CheckResult]:
    """Two checks on the item counts n (one per example) of a stream: the share of empty
    streams (FAIL when most are empty), and the share cut to max_len (WARN above
    TRUNCATION_WARN: the model sees only the latest max_len items of those examples)."""
    empty, cut = float((n == 0).mean()), float((n > max_len).mean())
    longest = int(n.max()) if len(n) else 0
    p95 = int(np.ceil(np.quantile(n, 0.95))) if len(n) else 0
    key = f"model.max_len_{stream}"
    truncation = (
        f"{cut:.1%} of examples have more than {key}={max_len} {stream} items and the model "
        f"sees only their latest {max_len} (95th percentile {p95}, longest {longest})"
    )
    if cut > TRUNCATION_WARN:
        truncation += (
            f"; over {TRUNCATION_WARN:.0%}: {key}={p95} would keep 95% of "
            "examples whole (attention cost grows with its square)"
        )
    return [
        CheckResult(
            f"data: {stream} stream", empty < 0.5,
            f"{empty:.1%} of examples have no {stream} items"
            + ("; most examples are empty: this stream can barely help" if empty >= 0.5 else ""),
            {"empty": empty},
        ),
        CheckResult(
            f"data: {stream} truncation", True, truncation,
            {"cut": cut, "p95": p95, "longest": longest}, warn=cut > TRUNCATION_WARN,
        ),
    ]


def data_checks(data: FeatureDataset, rows: np.ndarray, streams: list[str]) -> list[CheckResult]:
    """Per stream: share of examples with no items, share cut to max_len; then the labels."""
    ex = data.examples
    out = []
    for s in streams:
        n = ex[f"{s}_end"][rows] - ex[f"{s}_start"][rows]  # (N,) items per example
        out += stream_checks(n, s, getattr(data.model, f"max_len_{s}"))
    labels = ex["label"][rows]
    out.append(CheckResult("data: labels", 0.02 < labels.mean() < 0.98,
                           f"{len(rows):,} train examples, engaged rate {labels.mean():.3f}"))
    return out


# Above this share of the validation, test or out-of-time items whose token (event type, content
# bucket, meal, food) no labelled training example's window holds, the token check warns: the
# model reads those tokens through embedding rows fine-tuning never updated.
UNSEEN_WARN = 0.01
TOKENS = {"events": (("event types", "type_id"), ("content", "content")),
          "food": (("meals", "meal"), ("foods", "food_ids"))}
HELD_OUT = {"val": "validation", "test": "test", "oot": "out-of-time"}


def _tokens(arrays: dict, stream: str, column: str, items: np.ndarray) -> np.ndarray:
    """The token ids of `items` of a stream (a meal's foods for `food_ids`), real tokens only (>= 2)."""
    a = arrays[stream]
    if column == "food_ids":
        offsets = a["meal_offsets"].astype(np.int64)
        ids = a["food_ids"][window_items(offsets[items], offsets[items + 1] - offsets[items])]
    else:
        ids = a[column][items]
    return ids[ids >= 2]


def token_checks(files: list, examples: dict, file_of: np.ndarray, streams: list[str]) -> list[CheckResult]:
    """One line per kind of token of the events and food streams: the share of the held-out
    splits' items (each item once per split) whose token no labelled training example's window
    holds. Such a token reads an embedding row that fine-tuning never updated (pretraining may
    have); WARN above UNSEEN_WARN, as where a new event type or food appeared after the
    training weeks."""
    kinds = [(s, name, col) for s in streams if s in TOKENS for name, col in TOKENS[s]]
    if not kinds:
        return []
    split = examples["split"]
    groups = {"train": (split == SPLITS.index("train")) & (examples["label"] != UNLABELLED)}
    groups |= {k: split == SPLITS.index(k) for k in HELD_OUT}
    tokens: dict = {(name, g): [] for _, name, _ in kinds for g in groups}
    for k, f in enumerate(files):
        arrays = load_arrays(f, tuple({s for s, _, _ in kinds}))[0]
        for g, rows in groups.items():
            here = np.flatnonzero(rows & (file_of == k))
            for stream, name, col in kinds:
                start = examples[f"{stream}_start"][here].astype(np.int64)
                items = np.unique(window_items(start, examples[f"{stream}_end"][here].astype(np.int64) - start))
                tokens[(name, g)].append(_tokens(arrays, stream, col, items))
    out = []
    for _, name, _ in kinds:
        seen = np.unique(np.concatenate(tokens[(name, "train")]))
        shares, unseen = {}, set()
        for g in HELD_OUT:
            ids = np.concatenate(tokens[(name, g)])
            new = ~np.isin(ids, seen)
            shares[g] = float(new.mean()) if len(ids) else 0.0
            unseen |= set(np.unique(ids[new]).tolist())
        warn = max(shares.values()) > UNSEEN_WARN
        detail = (", ".join(f"{shares[g]:.2%} of {label}" for g, label in HELD_OUT.items())
                  + f" items carry {name} no labelled training window has ({len(unseen)} distinct)")
        if warn:
            detail += ("; the model reads them through embedding rows fine-tuning never updated (new since the "
                       "training weeks?): train on more recent weeks (docs/models.md)")
        out.append(CheckResult(f"data: unseen {name}", True, detail, shares | {"distinct": len(unseen)}, warn=warn))
    return out


# An attribute that alone ranks the train labels this well is worth a look: a column such as
# a churn date or a cancellation flag tells the label, and nothing will work without it.
ATTRIBUTE_LEAK_WARN = 0.95


def attribute_checks(data: FeatureDataset, rows: np.ndarray, heldout: np.ndarray) -> list[CheckResult]:
    """One line per user attribute the model reads: its missing share, its categories, and
    how well it alone ranks the labels of the `heldout` rows (ROC-AUC of the attribute as the
    only score: a category scores its engaged rate over the train `rows`, so many small
    categories cannot look predictive by chance; a number scores itself, either direction).
    WARN above ATTRIBUTE_LEAK_WARN."""
    if data.attributes is None:
        return []
    from sklearn.metrics import roc_auc_score

    codes, values = data.attributes
    labels = data.examples["label"]
    m = data.model
    n_num = len(m.numeric_attributes)
    columns = [(n, codes[:, j], codes[:, j] < 2, True) for j, n in enumerate(m.categorical_attributes)]
    columns += [(n, values[:, j], values[:, n_num + j] > 0, False) for j, n in enumerate(m.numeric_attributes)]
    y = labels[heldout]
    out = []
    for name, x, missing, categorical in columns:
        if categorical:
            n = np.bincount(x[rows], minlength=m.n_attribute_ids)
            rate = np.bincount(x[rows], weights=labels[rows], minlength=m.n_attribute_ids) / np.maximum(n, 1)
            score, kind = rate[x[heldout]], f"{int((n > 0).sum())} categories"
        else:
            score, kind = x[heldout], "numeric"
        auc = roc_auc_score(y, score) if 0 < y.mean() < 1 else 0.5
        auc = max(auc, 1 - auc)
        detail = (f"{kind}, {missing[rows].mean():.1%} missing, alone ranks the validation labels "
                  f"at ROC-AUC {auc:.3f}")
        if auc > ATTRIBUTE_LEAK_WARN:
            detail += "; so high it may tell the label (a churn date, a cancellation?): see docs/contract.md#user-attributes"
        out.append(CheckResult(f"data: attribute {name}", True, detail, {"auc": auc}, warn=auc > ATTRIBUTE_LEAK_WARN))
    return out


def exit_code(results: list[CheckResult]) -> int:
    """1 when any check fails, else 0 (warnings do not fail the command)."""
    return int(any(not r.passed for r in results))


def diagnose(
    cfg: Config, n_batches: int = 8, batch_size: int = 32, overfit_steps: int = 200, leak_steps: int = 300
) -> list[CheckResult]:
    files = feature_files(Paths.of(cfg).features)
    # The checks are about the label's path: without the auxiliary head, whose targets would
    # share the few steps the overfit and leaked-label checks allow.
    mcfg = replace(model_config_for(cfg.model, read_meta(files[0])), future_days=0)
    data = FeatureDataset(files, mcfg)
    mcfg = data.model  # with the hybrid's aggregate columns
    rows = data.select(["train"])
    if len(rows) < 2 * batch_size:
        raise UserError(f"{files[0]}: only {len(rows)} labelled train examples; diagnose needs {2 * batch_size}")
    rng = np.random.default_rng(cfg.train.seed)
    picked = rng.choice(rows, size=min(len(rows), n_batches * batch_size), replace=False)
    batches = [collate([data[int(i)] for i in picked[j : j + batch_size]]) for j in range(0, len(picked), batch_size)]
    prevalence = float(data.examples["label"][rows].mean())  # as train.py sets the output bias

    def factory() -> EngagementModel:
        torch.manual_seed(cfg.train.seed)
        model = EngagementModel(mcfg)
        model.set_output_bias(prevalence)
        return model

    streams = [s for s in STREAMS if s in mcfg.streams]
    leak = "conversation" if "conversation" in streams else streams[0]
    results = data_checks(data, rows, streams) + token_checks(data.files, data.examples, data.file_of, streams)
    results += attribute_checks(data, rows, data.select(["val"])) + run_diagnostics(
        factory, batches, leak_stream=leak, leak_steps=leak_steps, overfit_steps=overfit_steps,
        start_prevalence=prevalence,
    )
    width = max(len(r.name) for r in results)
    print(f"diagnose {files[0]} ({len(batches)} batches of {batch_size} train examples, streams {'+'.join(streams)})")
    for r in results:
        print(f"  {r.verdict}  {r.name:<{width}}  {r.detail}")
    failed = [r.name for r in results if not r.passed]
    warned = [r.name for r in results if r.passed and r.warn]
    verdict = "every check passed" if not failed else "look at: " + ", ".join(failed)
    print("verdict: " + verdict + (f" (warnings: {', '.join(warned)})" if warned else ""))
    return results
