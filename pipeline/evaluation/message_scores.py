"""Gradient boosting with message scores (issue 14): the aggregates of the hgb baseline plus what
a user's own recent messages say, learned from the training labels.

Why: a few messages announce an absence ("flying to Lisbon on Monday") that no activity count
shows coming. The sequence model reads every message vector, but its [CLS] state turned that
into little accuracy beyond the counts (docs/results.md), and gradient boosting on aggregates
never sees text. Here a logistic regression scores each message vector a user wrote in the last
7 days before an example's cutoff against that example's label (a weak label: the week after
the cutoff is what the message is scored for); an example then gets, per window of its last 7
and the 7 to 21 days before, the lowest score (the most disengaged-sounding message), the mean
score and the number of messages, as six columns beside the aggregates of one tuned
HistGradientBoosting (pipeline/evaluation/baselines.py; Platt-scaled on validation as the
baselines are). Four more columns say when: of the messages of the last 21 days whose mentioned
dates (features/text_dates.py) reach into the label's window after the cutoff, how many, the
earliest and latest such day counted from the cutoff, and the lowest score among them ("flying to Lisbon on Friday for a week" written on
Saturday lands in the week after a Monday cutoff; written a month before, it does not).

No leak: the columns of a training example come from a scorer fitted on the other folds of
training users (5 folds by user), so gradient boosting learns how far to trust a score on
messages its scorer never saw, as it will at validation, test and scoring time, where the scorer
fitted on all training users is used. Labels of other splits are never read except the
validation ones that pick gradient boosting's leaves, as for the baseline. A log without
messages gives ten zero columns: the same model as the baseline.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from common.errors import UserError
from features import contract as C
from features.aggregates import aggregates_of
from features.labels import first_at_or_after, row_keys, window_items
from features.store import SPLITS, UNLABELLED, load_arrays
from features.vocab import SENDER_IDS
from pipeline.evaluation import baselines
from pipeline.evaluation.baselines import calibrated, hgb_candidates, predict, tuned
from pipeline.evaluation.blend import user_folds

NAME = "hgb_text"  # its name in eval.baselines, MLflow and `make compare`
WINDOWS = ((0, 7), (7, 21))  # days before the cutoff: the features' windows
FIT_DAYS = 7  # the scorer learns from messages this recent only
SCORER_C = 0.1  # inverse L2 strength of the scorer (picked on validation, docs/results.md)
FOLDS = 5
MENTION_COLUMNS = ["mention_count", "mention_first_day", "mention_last_day", "mention_min_score"]
COLUMNS = [f"msg_{what}_{a}_{b}d" for a, b in WINDOWS for what in ("min_score", "mean_score", "count")]
TRAIN, VAL = SPLITS.index("train"), SPLITS.index("val")
_DAY = 86400


@dataclass
class RecentMessages:
    """The user-written messages of the last `max(WINDOWS)` days before each example's cutoff:
    one row per (example, message)."""

    example: np.ndarray  # (P,) int64 global example row
    age_days: np.ndarray  # (P,) float64, cutoff minus the message's time, in days (> 0)
    vectors: np.ndarray  # (P, D) float32 message vectors
    n_examples: int
    # (P, 2) float32: the start of the earliest / latest day the message mentions, in days after
    # the example's cutoff (NaN: none); None: no message mentions one
    mentions: np.ndarray | None = None
    horizon_days: int = 7  # the label's window after the cutoff, in days

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def none(cls, n_examples: int, dim: int = 0) -> RecentMessages:
        """No message for any of `n_examples` examples."""
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, dim), np.float32), n_examples)


def recent_user_messages(files) -> RecentMessages:
    """RecentMessages of every example of one or more feature files (shards), global example
    rows in file order as `features.dataset.load_examples` numbers them. Vectorised: per file,
    one search for each example's first message inside the window."""
    horizon = max(b for _, b in WINDOWS)
    parts, offset, dim, horizon_days = [], 0, 0, 7
    for f in files:
        a, meta = load_arrays(f, ("examples", "conversation"))
        horizon_days = meta.config.get("labels", {}).get("horizon_days", horizon_days)
        ex, cv = a["examples"], a["conversation"]
        n = len(ex["as_of"])
        ts = cv["ts"].astype(np.int64)
        dim = max(dim, cv["embedding"].shape[1] if cv["embedding"].ndim == 2 else 0)
        offsets = cv["user_offsets"]
        item_user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        as_of, user = ex["as_of"].astype(np.int64), ex["user_row"].astype(np.int64)
        start, end = ex["conversation_start"].astype(np.int64), ex["conversation_end"].astype(np.int64)
        lo = np.clip(first_at_or_after(row_keys(item_user, ts), user, as_of - horizon * _DAY), start, end)
        count = np.maximum(end - lo, 0)
        row = np.repeat(np.arange(n), count)
        item = window_items(lo, count)
        mine = cv["sender"][item] == SENDER_IDS[C.SENDER_USER]
        row, item = row[mine], item[mine]
        age = (as_of[row] - ts[item]) / _DAY
        mentions = np.column_stack([cv["mention_first"][item], cv["mention_last"][item]]) - age[:, None]
        parts.append((row + offset, age, cv["embedding"][item], mentions))
        offset += n
    vectors = [v for _, _, v, _ in parts if len(v)]
    return RecentMessages(
        np.concatenate([r for r, _, _, _ in parts]).astype(np.int64),
        np.concatenate([a for _, a, _, _ in parts]).astype(np.float64),
        np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32),
        offset,
        np.concatenate([m for _, _, _, m in parts]).astype(np.float32),
        horizon_days,
    )


def pooled(scores: np.ndarray, msgs: RecentMessages) -> np.ndarray:
    """(n_examples, len(COLUMNS)) float32: per window the lowest and mean message score and the
    message count (0, 0, 0 without a message)."""
    out = np.zeros((msgs.n_examples, len(COLUMNS)), np.float32)
    for j, (a, b) in enumerate(WINDOWS):
        k = (msgs.age_days >= a) & (msgs.age_days < b)
        e, s = msgs.example[k], scores[k]
        count = np.bincount(e, minlength=msgs.n_examples)
        low = np.full(msgs.n_examples, np.inf)
        np.minimum.at(low, e, s)
        total = np.bincount(e, weights=s, minlength=msgs.n_examples)
        has = count > 0
        out[:, 3 * j] = np.where(has, low, 0.0)
        out[:, 3 * j + 1] = np.where(has, total / np.maximum(count, 1), 0.0)
        out[:, 3 * j + 2] = count
    return out


def mention_columns(scores: np.ndarray, msgs: RecentMessages) -> np.ndarray:
    """(n_examples, len(MENTION_COLUMNS)) float32: of the messages whose mentioned dates reach
    into [0, horizon_days) days after the cutoff, the count, the earliest first and latest last
    mentioned day (from the cutoff), and the lowest score; all 0 without one, as `pooled` (a
    column of NaN only would stop gradient boosting's binning)."""
    n = msgs.n_examples
    out = np.zeros((n, len(MENTION_COLUMNS)), np.float32)
    if msgs.mentions is None or not len(msgs.example):
        return out
    first, last = msgs.mentions[:, 0], msgs.mentions[:, 1]
    hit = np.isfinite(first) & (last >= 0) & (first < msgs.horizon_days)
    e = msgs.example[hit]
    count = np.bincount(e, minlength=n)
    out[:, 0] = count
    for j, (values, reduce) in enumerate(((first[hit], np.minimum), (last[hit], np.maximum),
                                          (scores[hit], np.minimum)), start=1):
        col = np.full(n, np.inf if reduce is np.minimum else -np.inf)
        reduce.at(col, e, values)
        out[:, j] = np.where(count > 0, col, 0.0)
    return out


class MessageScoredHGB:
    """The scorer (fitted on all training users) and gradient boosting on the aggregates plus
    the pooled scores, its leaves picked on validation as the baseline's are."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.scorer: LogisticRegression | None = None
        self.model = None
        self.reads_mentions = True  # the mention columns beside the pooled scores

    @property
    def reads_messages(self) -> bool:
        """Scoring needs message vectors (pipeline/serving.py): not when training had no message."""
        return self.scorer is not None

    def _fit_scorer(self, msgs: RecentMessages, y: np.ndarray, pairs: np.ndarray) -> LogisticRegression | None:
        target = y[msgs.example[pairs]]
        if not pairs.any() or len(np.unique(target)) < 2:
            return None  # no message (or one class) to learn from: the columns stay 0
        return LogisticRegression(C=SCORER_C, max_iter=3000).fit(msgs.vectors[pairs], target)

    @staticmethod
    def _scores(scorer, msgs: RecentMessages, which: np.ndarray | None = None) -> np.ndarray:
        v = msgs.vectors if which is None else msgs.vectors[which]
        return scorer.decision_function(v) if scorer is not None and len(v) else np.zeros(len(v))

    def fit(self, X: np.ndarray, msgs: RecentMessages, y: np.ndarray, split: np.ndarray,
            groups: np.ndarray) -> MessageScoredHGB:
        """X (n, F) aggregates; y (n,) labels (UNLABELLED = -1); split (n,) codes of SPLITS;
        groups (n,) user keys."""
        labelled = y != UNLABELLED
        train, val = labelled & (split == TRAIN), labelled & (split == VAL)
        Z = self.fit_columns(X, msgs, y, train, groups)
        self.model = calibrated(tuned(hgb_candidates(self.seed), Z, y, train, val, NAME), Z, y, val)
        return self

    def fit_columns(self, X: np.ndarray, msgs: RecentMessages, y: np.ndarray, train: np.ndarray,
                    groups: np.ndarray) -> np.ndarray:
        """Fit the scorer on the `train` rows' messages; return every example's columns as
        gradient boosting is fitted on them (the train rows' out of fold)."""
        on_train, fold = train[msgs.example], user_folds(groups, FOLDS)[msgs.example]  # per message
        fits = on_train & (msgs.age_days < FIT_DAYS)
        self.scorer = self._fit_scorer(msgs, y, fits)
        scores = np.zeros(len(msgs.example))
        scores[~on_train] = self._scores(self.scorer, msgs, ~on_train)
        for k in range(FOLDS):  # training examples: scored by a scorer that never saw their user
            held = on_train & (fold == k)
            if held.any():
                scores[held] = self._scores(self._fit_scorer(msgs, y, fits & (fold != k)), msgs, held)
        return self._columns(X, scores, msgs)

    def _columns(self, X: np.ndarray, scores: np.ndarray, msgs: RecentMessages) -> np.ndarray:
        # A model saved without the flag (a registered champion of older code) reads the columns
        # its booster was fitted on: the mention columns only if it counts them.
        reads = getattr(self, "reads_mentions", None)
        if reads is None:
            reads = self.model is not None and self.model.n_features_in_ == X.shape[1] + len(COLUMNS) + len(MENTION_COLUMNS)
        mentions = [mention_columns(scores, msgs)] if reads else []
        return np.hstack([X, pooled(scores, msgs), *mentions])

    def features(self, X: np.ndarray, msgs: RecentMessages) -> np.ndarray:
        return self._columns(X, self._scores(self.scorer, msgs), msgs)

    def predict_proba(self, X: np.ndarray, msgs: RecentMessages) -> np.ndarray:
        """(n, 2) like an sklearn classifier's, every example scored by the full scorer."""
        return self.model.predict_proba(self.features(X, msgs))


def code_digest(*extra) -> str:
    """8 hex digits of the source that fits the gradient boostings (baselines.py and this file)
    and of the `extra` modules: a cache keyed by it is fitted again when that code changes."""
    modules = (baselines, sys.modules[__name__], *extra)
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()[:8]


def text_misfit(estimator, text_dim: int) -> str | None:
    """Why `estimator` cannot read message vectors `text_dim` wide (a store built with another
    text encoder), or None; gradient boosting on aggregates alone reads none."""
    scorer = getattr(estimator, "scorer", None)
    if scorer is None or text_dim in (0, scorer.n_features_in_):
        return None
    return f"text_dim {scorer.n_features_in_} in the message scorer, {text_dim} in the store"


def predict_files(estimator, files, names: list[str]) -> np.ndarray:
    """p_engaged float64 (n_examples,) of a fitted gradient boosting, `hgb` or `hgb_text`, for
    every example of these feature files; `names`: the aggregate columns it was fitted on."""
    X, _ = aggregates_of(files, names)
    if not isinstance(estimator, MessageScoredHGB):
        return predict(estimator, X)
    if not estimator.reads_messages:  # trained without a message: its columns were all 0
        return estimator.predict_proba(X, RecentMessages.none(len(X)))[:, 1]
    msgs = recent_user_messages(files)
    if why := text_misfit(estimator, msgs.dim):
        raise UserError(f"{NAME} cannot score this store: {why}")
    return estimator.predict_proba(X, msgs)[:, 1]
