"""Gradient boosting with message scores (pipeline/evaluation/message_scores.py): which messages
it reads, what it makes of them, and that a training example's scores never come from a scorer
that saw its user."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from features import contract as C
from features.store import SPLITS, load_arrays
from features.vocab import SENDER_IDS
from pipeline.evaluation import message_scores as ms
from pipeline.evaluation.baselines import fit_baselines, predict

DAY = 86400


def test_recent_messages_are_the_users_own_of_the_three_weeks_before_each_cutoff(sim_store):
    path = sim_store[0]
    got = ms.recent_user_messages([path, path])  # two files: the second's examples follow the first's
    a, _ = load_arrays(path, ("examples", "conversation"))
    ex, cv = a["examples"], a["conversation"]
    n = len(ex["as_of"])
    want = []
    for i in range(n):  # the reference: every item the example may see, filtered one by one
        for j in range(int(ex["conversation_start"][i]), int(ex["conversation_end"][i])):
            age = (int(ex["as_of"][i]) - int(cv["ts"][j])) / DAY
            if cv["sender"][j] == SENDER_IDS[C.SENDER_USER] and age < 21:
                want.append((i, age, j))
    assert np.isfinite(cv["mention_first"]).any()  # some of the simulator's messages name a day
    assert len(want) > 50 and got.n_examples == 2 * n and len(got.example) == 2 * len(want)
    rows, ages, items = map(np.array, zip(*want))
    assert (ages > 0).all()  # strictly before the cutoff
    for half, offset in ((slice(0, len(want)), 0), (slice(len(want), None), n)):
        assert np.array_equal(got.example[half], rows + offset)
        assert np.allclose(got.age_days[half], ages)
        assert np.array_equal(got.vectors[half], cv["embedding"][items])
        mentioned = np.column_stack([cv["mention_first"][items], cv["mention_last"][items]]) - ages[:, None]
        assert np.allclose(got.mentions[half], mentioned, equal_nan=True)  # from the cutoff, not the message


def test_pooled_columns_are_lowest_mean_and_count_per_window():
    msgs = ms.RecentMessages(example=np.array([0, 0, 0, 2]), age_days=np.array([1.0, 6.5, 10.0, 20.9]),
                             vectors=np.zeros((4, 3), np.float32), n_examples=3)
    out = ms.pooled(np.array([-1.0, 3.0, 2.0, 5.0]), msgs)
    assert ms.COLUMNS == ["msg_min_score_0_7d", "msg_mean_score_0_7d", "msg_count_0_7d",
                          "msg_min_score_7_21d", "msg_mean_score_7_21d", "msg_count_7_21d"]
    assert out.tolist() == [[-1, 1, 2, 2, 2, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 5, 5, 1]]


def _world(seed: int, announce: float, identity: float, users: int = 400, weeks: int = 4, dim: int = 16):
    """Users with `weeks` examples each, split by user: an aggregate column that tells the
    label weakly, and user messages of the last week. A disengaged week is announced by a
    message along one direction with probability `announce`; every message also carries its
    user's own random direction times `identity` (who wrote it, which says nothing about
    other users)."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), weeks)
    n = len(user)
    split = np.array([SPLITS.index(s) for s in ("train", "train", "train", "val", "test")])[user % 5]
    trait = rng.random(users) < 0.5  # some users are mostly disengaged: their labels lean one way
    y = (rng.random(n) < np.where(trait[user], 0.2, 0.8)).astype(np.int64)
    X = np.column_stack([y + rng.normal(0, 1.2, n), rng.normal(0, 1, n)]).astype(np.float32)
    direction, who = rng.normal(size=dim), rng.normal(size=(users, dim))
    example, age, vectors = [], [], []
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            v = rng.normal(0, 1, dim) + identity * who[user[i]]
            if y[i] == 0 and rng.random() < announce:
                v = v + 3 * direction
            example.append(i), age.append(rng.uniform(0.1, 6.9)), vectors.append(v)
    msgs = ms.RecentMessages(np.array(example), np.array(age), np.array(vectors, np.float32), n)
    return X, msgs, y, split, np.array([f"u{u}".encode() for u in user])


def _val_auc(p, y, split):
    val = split == SPLITS.index("val")
    return roc_auc_score(y[val], p[val])


def test_it_learns_what_messages_announce_and_beats_gradient_boosting_on_aggregates():
    X, msgs, y, split, users = _world(0, announce=0.5, identity=0.0)
    text = ms.MessageScoredHGB().fit(X, msgs, y, split, users)
    hgb = fit_baselines(X, y, split, [], ["hgb"])["hgb"]
    with_text, without = _val_auc(text.predict_proba(X, msgs)[:, 1], y, split), _val_auc(predict(hgb, X), y, split)
    assert with_text > without + 0.05, (with_text, without)
    # Platt-scaled on validation as the other learned models are, its ranking untouched
    raw = text.model.estimator.estimator.predict_proba(text.features(X, msgs))[:, 1]
    assert _val_auc(raw, y, split) == with_text and not np.allclose(raw, text.predict_proba(X, msgs)[:, 1])


def test_training_scores_come_from_scorers_that_never_saw_the_user():
    # Messages say only who wrote them, and users' labels lean their own way: a scorer that
    # has seen a user recognises the user and "knows" the label. Scored in sample, the training
    # rows' message columns would look near perfect, gradient boosting would lean on them, and
    # fail on validation's new users; out of fold they look as useless as they are.
    X, msgs, y, split, users = _world(1, announce=0.0, identity=3.0, users=300, dim=256)  # 180 training users: separable
    text = ms.MessageScoredHGB().fit(X, msgs, y, split, users)
    hgb = fit_baselines(X, y, split, [], ["hgb"])["hgb"]
    with_text, without = _val_auc(text.predict_proba(X, msgs)[:, 1], y, split), _val_auc(predict(hgb, X), y, split)
    train = split == SPLITS.index("train")
    in_sample = text._scores(text.scorer, msgs)
    assert roc_auc_score(y[msgs.example[train[msgs.example]]], in_sample[train[msgs.example]]) > 0.8  # it does memorise
    assert with_text > without - 0.02, (with_text, without)


def test_without_messages_it_is_gradient_boosting_on_aggregates():
    X, msgs, y, split, users = _world(2, announce=0.5, identity=0.0)
    none = ms.RecentMessages.none(len(y), 16)
    text = ms.MessageScoredHGB().fit(X, none, y, split, users)
    assert text.scorer is None and not text.reads_messages  # scoring it needs no text encoder
    hgb = fit_baselines(X, y, split, [], ["hgb"])["hgb"]
    assert np.array_equal(text.predict_proba(X, none)[:, 1], predict(hgb, X))


def test_a_store_of_another_text_width_is_refused():
    X, msgs, y, split, users = _world(3, announce=0.5, identity=0.0)
    text = ms.MessageScoredHGB().fit(X, msgs, y, split, users)
    assert ms.text_misfit(text, 16) is None and ms.text_misfit(text, 0) is None  # 0: a log without messages
    assert ms.text_misfit(text, 384) == "text_dim 16 in the message scorer, 384 in the store"
    assert ms.text_misfit(object(), 384) is None  # gradient boosting on aggregates reads no text


@pytest.mark.parametrize("name", ["hgb", "hgb_text"])
def test_predict_files_matches_the_fitted_models_predictions(sim_store, name):
    from features.aggregates import aggregates_of
    from features.dataset import load_examples

    path = sim_store[0]
    examples, user_key, _ = load_examples([path])
    X, names = aggregates_of([path])
    if name == "hgb":
        model = fit_baselines(X, examples["label"], examples["split"], names, ["hgb"])["hgb"]
        want = predict(model, X)
    else:
        msgs = ms.recent_user_messages([path])
        model = ms.MessageScoredHGB().fit(X, msgs, examples["label"], examples["split"], user_key)
        want = model.predict_proba(X, msgs)[:, 1]
    assert np.array_equal(ms.predict_files(model, [path], names), want)


def test_mention_columns_keep_the_messages_whose_dates_reach_into_the_horizon():
    # days after the cutoff: [3, 10] reaches in, [-4, -1] is over, [8, 12] starts after the week
    msgs = ms.RecentMessages(example=np.array([0, 0, 0, 1, 2]), age_days=np.array([2.0, 5.0, 1.0, 3.0, 4.0]),
                             vectors=np.zeros((5, 3), np.float32), n_examples=4,
                             mentions=np.array([[3, 10], [-4, -1], [8, 12], [np.nan, np.nan], [-1, 0]], np.float32),
                             horizon_days=7)
    out = ms.mention_columns(np.array([-2.0, -9.0, -7.0, -5.0, 4.0]), msgs)
    assert ms.MENTION_COLUMNS == ["mention_count", "mention_first_day", "mention_last_day", "mention_min_score"]
    assert out.tolist() == [[1, 3, 10, -2], [0, 0, 0, 0], [1, -1, 0, 4], [0, 0, 0, 0]]


def test_it_learns_when_a_mentioned_date_falls_in_the_week_after_the_cutoff():
    # Every example has the same kind of message ("away from <date>"); what tells the label is
    # whether that date lands in the week after the cutoff: a vector scorer cannot see it, the
    # mention columns can.
    X, msgs, y, split, users = _world(4, announce=0.0, identity=0.0)
    rng = np.random.default_rng(4)
    start = np.where(y[msgs.example] == 0, rng.uniform(0, 6, len(msgs.example)), rng.uniform(8, 20, len(msgs.example)))
    msgs.mentions = np.column_stack([start, start + 5]).astype(np.float32)
    text = ms.MessageScoredHGB().fit(X, msgs, y, split, users)
    hgb = fit_baselines(X, y, split, [], ["hgb"])["hgb"]
    with_dates, without = _val_auc(text.predict_proba(X, msgs)[:, 1], y, split), _val_auc(predict(hgb, X), y, split)
    msgs.mentions = None
    no_dates = _val_auc(ms.MessageScoredHGB().fit(X, msgs, y, split, users).predict_proba(X, msgs)[:, 1], y, split)
    assert with_dates > without + 0.05 and with_dates > no_dates + 0.05, (with_dates, without, no_dates)


def test_a_model_saved_before_the_mention_columns_still_scores():
    # A champion pickled by the code before the mention columns has no `reads_mentions`: it must
    # be given the columns it was fitted on, not a wider matrix (the champion gate scores it).
    X, msgs, y, split, users = _world(5, announce=0.5, identity=0.0)
    old = ms.MessageScoredHGB()
    old.reads_mentions = False
    old.fit(X, msgs, y, split, users)
    del old.reads_mentions
    assert old.model.n_features_in_ == X.shape[1] + len(ms.COLUMNS)
    assert old.predict_proba(X, msgs).shape == (len(y), 2)
    # and one saved without the flag but fitted with the mention columns reads them
    new = ms.MessageScoredHGB().fit(X, msgs, y, split, users)
    want = new.predict_proba(X, msgs)
    del new.reads_mentions
    np.testing.assert_array_equal(new.predict_proba(X, msgs), want)
