"""What the conversation encoder's [CLS] state knows (issue 14, item 5): linear probes on it,
cross-validated by user, for facts about each example that the model would need to read its
messages. A diagnostic (docs/results.md): nothing here is a model input.

    python -m pipeline.diagnostics.probe --config configs/demo.yaml

Encoders probed, on the validation, test and out-of-time examples whose user wrote or received a
message before the cutoff (what training never fitted):
- the trained model's (`<workdir>/runs/<run>/best.pt`, the run `make train` names);
- the pretrained one (`<pretrain.dir>/conversation.pt`), when there is one;
- the same architecture at random initialisation: the floor, what a linear read-out of the inputs
  through untrained weights already finds;
- beside them, the trained model's own output (its logit) as the only input: a fact the [CLS]
  state tells better than the output does is known to the encoder and not used by the head.

Facts (targets), each a yes / no per example:
- `wrote_last_7d`: the user wrote a message in the 7 days before the cutoff (from the store);
- `mentions_next_week`: one of the user's messages of the last 21 days mentions a day inside the
  label's week after the cutoff (features/text_dates.py, from the store);
- `announced_in_week` (simulator logs only): a trip, work crunch or decision to quit the user had
  announced before the cutoff overlaps the label's week (the simulator's own ledger, as
  pipeline/diagnostics/headroom.py matches it);
- `engaged`: the label itself, for reference.

A probe is a logistic regression on the standardised [CLS] states, 5 folds by user; its
out-of-fold ROC-AUC is printed per fact and encoder (nan where a fact has fewer than 10 cases of
either answer).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common.errors import UserError
from features.dataset import FeatureDataset
from features.store import SPLITS, feature_files
from models.checkpoint import load_model
from models.engagement import EngagementModel
from pipeline.config import load_config
from pipeline.evaluation.message_scores import (
    COLUMNS,
    MENTION_COLUMNS,
    mention_columns,
    pooled,
    recent_user_messages,
)
from pipeline.paths import Paths
from pipeline.training.train import BEST, run_name

log = logging.getLogger(__name__)
STREAM = "conversation"
FOLDS = 5
MIN_CASES = 10  # of either answer, for a probe to mean anything


@torch.inference_mode()
def cls_states(model: EngagementModel, data: FeatureDataset, rows: np.ndarray, batch_size: int = 256,
               logit: bool = False) -> np.ndarray:
    """(len(rows), d_model) float32: the conversation encoder's [CLS] state of each global
    example row, in the order given, the model in eval mode (what its classifier head reads);
    logit=True: (len(rows), 1), the model's own output instead."""
    model.eval()
    part, out = data.subset(rows), []
    for lo in range(0, len(rows), batch_size):
        batch = part.batch(range(lo, min(lo + batch_size, len(rows))))
        out.append(model(batch)[0][:, None] if logit else model.encoders[STREAM](batch[STREAM], items=False)[0])
    return torch.cat(out).float().numpy() if out else np.zeros((0, 1 if logit else model.config.d_model), np.float32)


def probe_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """Out-of-fold ROC-AUC of a logistic regression from X to the bool `y`, folds by `groups`
    (no user on both sides); nan with fewer than MIN_CASES of either answer."""
    y = np.asarray(y, dtype=bool)
    if min(y.sum(), (~y).sum()) < MIN_CASES or len(np.unique(groups)) < folds:
        return float("nan")
    score = np.zeros(len(y))
    with threadpool_limits(1):  # BLAS threads on (n, 64) products: 4x slower than one here
        for fit, held in GroupKFold(folds).split(X, y, groups):
            if len(np.unique(y[fit])) < 2:
                return float("nan")
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
            score[held] = clf.fit(X[fit], y[fit]).decision_function(X[held])
    return float(roc_auc_score(y, score))


def store_facts(files: list, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The facts read from the store, per global example row of `rows` (bool arrays)."""
    msgs = recent_user_messages(files)
    scores = np.zeros(len(msgs.example))  # the counts below do not depend on them
    wrote = pooled(scores, msgs)[:, COLUMNS.index("msg_count_0_7d")] > 0
    mentions = mention_columns(scores, msgs)[:, MENTION_COLUMNS.index("mention_count")] > 0
    return {"wrote_last_7d": wrote[rows], "mentions_next_week": mentions[rows]}


def announced_facts(cfg, files: list, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`announced_in_week` from the simulation the store came from; {} for another log."""
    from pipeline.diagnostics.headroom import life_columns, match

    if cfg.data.source != "simulator" or len(files) != 1:
        return {}
    try:
        m = match(cfg, str(files[0]))
    except (ValueError, KeyError) as e:  # another simulation than the config's
        log.warning("probe: no simulator facts (%s)", e)
        return {}
    overlap = life_columns(m, announced_only=True)[:, 0::2]  # per kind: days inside the label's window
    return {"announced_in_week": (overlap > 0).any(axis=1)[rows]}


def probe_table(encoders: dict[str, EngagementModel], data: FeatureDataset, rows: np.ndarray,
                facts: dict[str, np.ndarray]) -> list[tuple[str, int, dict[str, float]]]:
    """[(fact, how many yes, {encoder name: out-of-fold ROC-AUC})] over `rows`; the first
    encoder's model output beside them ("its output"): a state that tells a fact better than
    the output does holds more than the head uses."""
    groups = data.user_number[rows]
    states = {name: cls_states(model, data, rows) for name, model in encoders.items()}
    first = next(iter(encoders))
    states["its output"] = cls_states(encoders[first], data, rows, logit=True)
    return [(fact, int(y.sum()), {name: probe_auc(X, y, groups) for name, X in states.items()})
            for fact, y in facts.items()]


def probe(cfg) -> list[tuple[str, int, dict[str, float]]]:
    """The table for the trained model of `cfg` (see the module docstring)."""
    paths = Paths.of(cfg)
    files = feature_files(paths.features)
    best = paths.runs / run_name(cfg) / BEST
    if not best.exists():
        raise UserError(f"{best}: no trained model; run `make train CONFIG=...` first")
    trained, _ = load_model(best)
    if STREAM not in trained.streams:
        raise UserError(f"{run_name(cfg)} has no {STREAM} encoder (model.streams={list(trained.streams)}): nothing to probe")
    data = FeatureDataset(files, trained.config)
    ex = data.examples
    held = np.isin(ex["split"], [SPLITS.index(s) for s in ("val", "test", "oot")])
    rows = np.flatnonzero(held & (ex["conversation_end"] > ex["conversation_start"]) & (ex["label"] >= 0))
    if not len(rows):
        raise UserError("no labelled validation, test or out-of-time example has a message: nothing to probe")
    encoders = {"trained": trained}
    pretrained = Path(paths.pretrain) / f"{STREAM}.pt"
    if pretrained.exists():
        encoders["pretrained"] = EngagementModel(trained.config)
        encoders["pretrained"].load_encoder(STREAM, pretrained)
    torch.manual_seed(0)
    encoders["random"] = EngagementModel(trained.config)
    facts = store_facts(files, rows) | announced_facts(cfg, files, rows) | {"engaged": ex["label"][rows] == 1}
    return probe_table(encoders, data, rows, facts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        table = probe(load_config(args.config, args.overrides))
    except UserError as e:  # one line and exit 2, as the pipeline's commands do
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(table[0][2]) if table else []
    print(f"{'linear probe of the conversation [CLS] state':36s} {'yes':>6s} " + " ".join(f"{n:>10s}" for n in names))
    for fact, yes, aucs in table:
        print(f"{fact:36s} {yes:6d} " + " ".join(f"{aucs[n]:10.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
