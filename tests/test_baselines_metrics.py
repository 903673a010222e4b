"""Aggregate features against a brute-force pandas count, leakage, metrics against hand
computations, baselines' honesty (train labels only), and that the plots are written and
readable: legends beside the curves, figures as wide as the MLflow UI shows, tick labels
apart."""

from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from features.aggregates import RECENCY_CAP_DAYS, aggregate_features
from features.labels import DAY
from features.store import SPLITS, load_arrays
from features.vocab import pseudonyms
from pipeline.evaluation import metrics as M
from pipeline.evaluation import plots
from pipeline.evaluation.baselines import fit_baselines, predict, run_baselines, split_rows
from pipeline.evaluation.metrics import binary_metrics, calibration_table, lift_curve
from tests.event_factories import START, build_store, make_events


def _secs(ts: pd.Series) -> np.ndarray:
    return np.array([int(t.timestamp()) for t in ts], dtype=np.int64)


def brute_force(events: pd.DataFrame, uid: str, as_of: int) -> dict:
    """The features of one example, straight from the raw events with pandas."""
    u = events[events.user_id == uid].assign(t=lambda d: _secs(d.ts)).sort_values("t", kind="stable")
    program_start = u.t.min()  # no users table: the first event
    d = u[u.t < as_of]
    kind = np.where(d.event_type == "message", "message_from_" + d.sender.fillna(""), d.event_type)
    d = d.assign(kind=kind, own=kind != "message_from_coach")
    out = {}
    for k in ("message_from_user", "message_from_coach", "food_log", "weigh_in", "content_view", "water_log"):
        dk = d[d.kind == k]
        for w in (1, 7, 28):
            out[f"count_{k}_{w}d"] = int((dk.t >= as_of - w * DAY).sum())
        out[f"days_since_{k}"] = min(RECENCY_CAP_DAYS, (as_of - dk.t.max()) / DAY) if len(dk) else RECENCY_CAP_DAYS
    water = d[d.kind == "water_log"]
    for w in (7, 28):
        out[f"value_sum_water_log_{w}d"] = water[water.t >= as_of - w * DAY].value.sum()
    own = d[d.own]
    out["own_events_total"] = len(own)
    out["days_since_own_activity"] = min(RECENCY_CAP_DAYS, (as_of - own.t.max()) / DAY) if len(own) else RECENCY_CAP_DAYS
    for w in (7, 28):
        recent = own[own.t >= as_of - w * DAY]
        out[f"active_days_{w}d"] = len({(as_of - 1 - t) // DAY for t in recent.t})
    out["active_last_week"] = float(out["active_days_7d"] >= 3)
    out["tenure_days"] = (as_of - program_start) / DAY
    out["days_since_first_event"] = (as_of - d.t.min()) / DAY
    weigh = d[d.kind == "weigh_in"]
    recent = weigh[weigh.t >= as_of - 28 * DAY]
    out["weight_change_28d"] = recent.value.iloc[-1] - recent.value.iloc[0] if len(recent) else 0.0
    out["weight_last_delta"] = weigh.value.iloc[-1] - weigh.value.iloc[-2] if len(weigh) > 1 else 0.0
    out["has_weigh_in_28d"] = float(len(recent) > 0)
    meals = d[(d.kind == "food_log") & (d.t >= as_of - 7 * DAY)]
    out["foods_per_meal_7d"] = np.mean([len(f) for f in meals.food_ids]) if len(meals) else 0.0
    # Coach messages 28 d .. 48 h before as_of, answered by a user message within 48 h.
    user_t = d[d.kind == "message_from_user"].t.to_numpy()
    coach_t = d[d.kind == "message_from_coach"].t.to_numpy()
    asked = coach_t[(coach_t >= as_of - 28 * DAY) & (coach_t < as_of - 2 * DAY)]
    answered = [((user_t > c) & (user_t <= c + 2 * DAY)).any() for c in asked]
    out["coach_msgs_answered_share_28d"] = float(np.mean(answered)) if len(asked) else 0.0
    waiting = coach_t[coach_t > user_t.max()] if len(user_t) else coach_t
    out["unanswered_coach_msgs"] = len(waiting)
    out["days_since_unanswered_coach_msg"] = (
        min(RECENCY_CAP_DAYS, (as_of - waiting.max()) / DAY) if len(waiting) else RECENCY_CAP_DAYS
    )
    return out


@pytest.fixture(scope="module")
def app_store(tmp_path_factory, tiny_encoder):
    events = make_events(n_users=10, weeks=6, seed=11, per_user=(60, 160))
    path, cfg = build_store(tmp_path_factory.mktemp("agg"), events, tiny_encoder)
    return events, path, cfg


def _feature_rows(path, cfg):
    a, meta = load_arrays(path)
    X, names = aggregate_features(a, meta)
    ex = a["examples"]
    keys = a["users"]["key"][ex["user_row"]]
    return {(k, int(t)): dict(zip(names, x)) for k, t, x in zip(keys, ex["as_of"], X)}, names


def test_aggregates_equal_a_brute_force_pandas_count(app_store):
    events, path, cfg = app_store
    rows, names = _feature_rows(path, cfg)
    uids = events.user_id.unique()
    by_key = dict(zip(pseudonyms(uids, cfg.features.pseudonym_key), uids))
    shares = []
    for (key, as_of), got in rows.items():
        want = brute_force(events, by_key[key], as_of)
        assert set(want) <= set(names)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-5, abs=2e-3), f"{name} of {by_key[key]} at {as_of}"
        shares.append(want["coach_msgs_answered_share_28d"])
    assert len(rows) >= 30
    assert any(0 < s < 1 for s in shares) and 0.0 in shares  # the answered share was exercised


def test_events_at_or_after_as_of_change_nothing(app_store, tmp_path, tiny_encoder):
    events, path, cfg = app_store
    before, _ = _feature_rows(path, cfg)
    uids = events.user_id.unique()
    by_key = dict(zip(pseudonyms(uids, cfg.features.pseudonym_key), uids))
    rng = np.random.default_rng(0)
    for n, (key, as_of) in enumerate([list(before)[i] for i in rng.choice(len(before), 2, replace=False)]):
        user, cut = by_key[key], pd.Timestamp(as_of, unit="s", tz="UTC")
        later = events[(events.user_id == user) & (events.ts >= cut)]
        changed = events.drop(later.index[::2])
        moved = changed.index.isin(later.index)
        changed.loc[moved, "ts"] = changed.loc[moved, "ts"] + pd.Timedelta(hours=30)
        changed.loc[moved & (changed.event_type == "weigh_in"), "value"] = 150.0
        extra = pd.DataFrame({  # replies exactly at as_of, a new type, a meal, a weigh-in
            "user_id": [user] * 5, "ts": [cut, cut, cut + pd.Timedelta(hours=1), cut, cut],
            "event_type": ["message", "message", "brand_new_type", "food_log", "weigh_in"],
            "sender": ["user", "coach", None, None, None], "text": ["ok", "hi", None, None, None],
            "food_ids": [None, None, None, [101, 102, 103, 104], None],
            "meal": [None, None, None, "lunch", None], "value": [None, None, 3.0, None, 99.0],
        })
        path2, _ = build_store(tmp_path, pd.concat([changed, extra], ignore_index=True), tiny_encoder, f"b{n}")
        after, names2 = _feature_rows(path2, cfg)
        old, new = before[(key, as_of)], after[(key, as_of)]
        assert set(old) <= set(new)
        for name in old:
            assert new[name] == old[name], f"{name} changed by events after as_of"
        assert all(new[k] in (0.0, RECENCY_CAP_DAYS) for k in set(new) - set(old))  # brand_new_type


# --- metrics ---------------------------------------------------------------------------

def test_ranking_metrics_on_hand_made_cases():
    y = np.array([0, 0, 1, 1])
    good = binary_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))
    assert good["roc_auc"] == 1.0 and good["pr_auc"] == 1.0
    assert binary_metrics(y, np.array([0.9, 0.8, 0.2, 0.1]))["roc_auc"] == 0.0
    # disengaged at risk ranks 1 and 3: AP = (1/1 + 2/3) / 2
    m = binary_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.9]))
    assert m["pr_auc"] == pytest.approx(5 / 6) and m["roc_auc"] == pytest.approx(0.75)
    m = binary_metrics(np.array([1, 0]), np.array([0.8, 0.4]))
    assert m["brier"] == pytest.approx((0.2**2 + 0.4**2) / 2)
    assert m["log_loss"] == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert m["prevalence"] == 0.5 and m["n"] == 2


def test_degenerate_inputs_give_nan_not_a_crash():
    one = binary_metrics(np.ones(5, int), np.full(5, 0.7))
    assert np.isnan(one["roc_auc"]) and np.isnan(one["pr_auc"]) and np.isnan(one["recall_at_top"])
    assert np.isfinite(one["log_loss"]) and one["prevalence"] == 1.0
    assert np.isfinite(binary_metrics(np.array([0, 1]), np.array([1.0, 0.0]))["log_loss"])  # clipped
    empty = binary_metrics(np.zeros(0, int), np.zeros(0))
    assert empty["n"] == 0 and np.isnan(empty["roc_auc"])
    with pytest.raises(ValueError, match="same examples"):
        binary_metrics(np.array([0, 1]), np.array([0.5]))


def test_weighted_roc_auc_is_sklearns_with_sample_weights_ties_included():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.5 + 0.3 * y, 1)  # few distinct values: many ties
    w = rng.integers(0, 4, size=(4, 500))
    expected = [roc_auc_score(y, p, sample_weight=row) for row in w]
    np.testing.assert_allclose(M.weighted_roc_auc(y, p, w), expected)
    assert M.weighted_roc_auc(y, p, np.ones(500))[0] == pytest.approx(roc_auc_score(y, p))
    assert np.isnan(M.weighted_roc_auc(y, p, np.where(y == 1, 1, 0)[None])[0])  # no negative weight left


def test_the_auc_difference_interval_resamples_users_not_examples(monkeypatch):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    a, b = rng.random(300) * 0.5 + 0.2 * y, rng.random(300) * 0.5 + 0.15 * y
    users = np.arange(300)
    one = M.paired_auc_difference(y, a, b, users)
    assert one["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert one["lo"] < one["diff"] < one["hi"] and 0 <= one["share_not_above"] <= 1
    # Each user's example written 5 times: resampling users gives the same interval as one copy
    # each; resampling the examples would pretend to 5 times the data (a narrower interval).
    copies = [np.repeat(v, 5) for v in (y, a, b)]
    assert M.paired_auc_difference(*copies, np.repeat(users, 5)) == pytest.approx(one)
    naive = M.paired_auc_difference(*copies, np.arange(1500))
    assert naive["hi"] - naive["lo"] < 0.6 * (one["hi"] - one["lo"])
    same = M.paired_auc_difference(y, a, a, users)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and same["share_not_above"] == 1
    monkeypatch.setattr(M, "BOOT_CELLS", 700)  # resamples two at a time: the same draws, the same figures
    assert M.paired_auc_difference(y, a, b, users) == pytest.approx(one)


def test_expected_calibration_error():
    y = np.array([1, 0, 0, 0] + [1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)  # each bin's rate equals its prediction
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.0)
    assert binary_metrics(y, np.full(8, 0.9))["ece"] == pytest.approx(0.4)
    t = calibration_table(y, np.r_[p[:-1], 1.0], bins=10)
    assert t["n"].sum() == 8 and t["n"].iloc[-1] == 1  # p = 1 lands in the last bin


def test_recall_and_lift_at_the_top():
    y = np.ones(20, int)
    y[[0, 5, 6, 7, 8]] = 0  # 5 disengaged of 20
    p = np.linspace(0.5, 0.99, 20)
    p[0], p[10] = 0.01, 0.02  # riskiest two: one disengaged, one engaged
    m = binary_metrics(y, p, top_frac=0.1)
    assert m["recall_at_top"] == pytest.approx(1 / 5)
    assert m["lift_at_top"] == pytest.approx((1 / 2) / (5 / 20))
    flat = binary_metrics(y, np.full(20, 0.6), top_frac=0.1)  # ties count in expectation
    assert flat["recall_at_top"] == pytest.approx(0.1) and flat["lift_at_top"] == pytest.approx(1.0)
    assert m["precision_at_top"] == pytest.approx(1 / 2)
    assert m["recall_at_top_of_max"] == pytest.approx((1 / 5) / (2 / 5))  # 2 contacted: at most 2 of 5 found
    c = lift_curve(y, p)
    assert c["frac"][0] == 0 and c["frac"][-1] == 1 and c["recall"][-1] == 1
    assert np.all(np.diff(c["recall"]) >= 0)


def test_with_the_disengaged_in_the_majority_the_top_metrics_still_tell_good_from_random():
    """A MOOC-like split: 80% disengaged. Recall in the top 10% is capped at 0.1 / 0.8 = 0.125
    for every model, so it barely moves; its share of that cap and precision do."""
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.2).astype(int)  # 1 = engaged: 20%
    good = np.clip(0.2 + 0.6 * y + rng.normal(0, 0.2, len(y)), 0, 1)
    random_ = rng.random(len(y))
    g, r = binary_metrics(y, good), binary_metrics(y, random_)
    assert g["recall_at_top"] - r["recall_at_top"] < 0.03  # 0.125 at best against 0.1
    assert g["recall_at_top_of_max"] > 0.95 and abs(r["recall_at_top_of_max"] - 0.8) < 0.05
    assert g["precision_at_top"] == pytest.approx(g["recall_at_top_of_max"])  # k < disengaged: the same figure
    assert g["lift_at_top"] == pytest.approx(g["precision_at_top"] / (1 - y.mean()))


# --- baselines -------------------------------------------------------------------------

def engagement_events(n_users=240, weeks=10, seed=0) -> pd.DataFrame:
    """Own activity only (no messages): each user's daily activity chance drifts week to
    week, so next week's label depends on recent activity."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n_users, 1)) + np.cumsum(rng.normal(0, 0.7, (n_users, weeks)), axis=1)
    day_p = 1 / (1 + np.exp(-np.repeat(z, 7, axis=1)))  # (users, days)
    user, day = np.nonzero(rng.random(day_p.shape) < day_p)
    per_day = 1 + rng.poisson(1, len(user))  # events on an active day
    user, day = np.repeat(user, per_day), np.repeat(day, per_day)
    kind = rng.choice(["food_log", "content_view", "water_log", "weigh_in"], len(user))
    ev = pd.DataFrame({
        "user_id": [f"s{u}" for u in user], "event_type": kind,
        "ts": START + pd.to_timedelta(day * DAY + rng.integers(6 * 3600, 22 * 3600, len(day)), unit="s"),
        "food_ids": [[int(f) for f in rng.integers(1, 40, rng.integers(1, 4))] if k == "food_log" else None for k in kind],
        "meal": np.where(kind == "food_log", "lunch", None),
        "value": np.where(kind == "weigh_in", 80 + rng.normal(0, 1, len(kind)), np.where(kind == "water_log", 250.0, np.nan)),
    })
    return ev.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path, cfg = build_store(tmp_path_factory.mktemp("syn"), engagement_events(), None)
    a, meta = load_arrays(path)
    X, names = aggregate_features(a, meta)
    return a, meta, X, names


def test_baselines_beat_prevalence_when_the_label_follows_recent_activity(synthetic):
    a, meta, X, names = synthetic
    out = run_baselines(a, meta, seed=0, threads=1)
    ex = a["examples"]
    auc = {}
    for name, per_split in out.items():
        for s in SPLITS:
            assert len(per_split[s]) == len(split_rows(ex, s))  # the sequence model's rows
        y = ex["label"][split_rows(ex, "test")]
        auc[name] = binary_metrics(y, per_split["test"])["roc_auc"]
    assert auc["prevalence"] == 0.5
    assert auc["logistic"] > 0.75 and auc["hgb"] > 0.75
    assert auc["logistic"] > auc["active_last_week"] - 0.02


def test_active_last_week_is_two_valued_train_rates(synthetic):
    a, meta, X, names = synthetic
    ex = a["examples"]
    m = fit_baselines(X, ex["label"], ex["split"], names, ["active_last_week"], min_active_days=3)["active_last_week"]
    p = predict(m, X)
    train = split_rows(ex, "train")
    active = X[train, names.index("active_days_7d")] >= 3
    y = ex["label"][train]
    assert 0 < active.mean() < 1  # both groups exist
    assert set(np.unique(p)) == {y[active].mean(), y[~active].mean()}
    everyone_active = X[:, names.index("active_days_7d")] >= 3
    assert (p[everyone_active] == y[active].mean()).all() and (p[~everyone_active] == y[~active].mean()).all()


def test_baselines_never_see_test_or_oot_labels(synthetic):
    a, meta, X, names = synthetic
    ex = a["examples"]
    which = ["prevalence", "active_last_week", "logistic", "hgb"]
    fit = fit_baselines(X, ex["label"], ex["split"], names, which, seed=0, threads=1)
    held = np.isin(ex["split"], [SPLITS.index("test"), SPLITS.index("oot")])
    y2 = ex["label"].copy()
    y2[held] = np.random.default_rng(1).permutation(1 - y2[held])  # flipped and shuffled
    fit2 = fit_baselines(X, y2, ex["split"], names, which, seed=0, threads=1)
    for name in which:
        np.testing.assert_array_equal(predict(fit[name], X), predict(fit2[name], X), err_msg=name)
    y3 = ex["label"].copy()  # control: train labels do matter
    y3[ex["split"] == 0] = 1 - y3[ex["split"] == 0]
    fit3 = fit_baselines(X, y3, ex["split"], names, ["prevalence"])
    assert not np.array_equal(predict(fit["prevalence"], X), predict(fit3["prevalence"], X))


def test_learned_baselines_are_platt_scaled_on_validation_without_reranking(synthetic):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.metrics import log_loss, roc_auc_score

    a, meta, X, names = synthetic
    ex = a["examples"]
    y, split = ex["label"], ex["split"]
    fit = fit_baselines(X, y, split, names, ["logistic", "hgb"], seed=0, threads=1)
    val, test = split_rows(ex, "val"), split_rows(ex, "test")
    for name, model in fit.items():
        assert isinstance(model, CalibratedClassifierCV), name
        raw = model.estimator.estimator  # the tuned model, frozen
        assert roc_auc_score(y[test], predict(model, X[test])) == roc_auc_score(y[test], predict(raw, X[test]))
        assert log_loss(y[val], predict(model, X[val])) <= log_loss(y[val], predict(raw, X[val])) + 1e-3


def test_calibrated_moves_shifted_probabilities_to_the_validation_rate():
    from sklearn.linear_model import LogisticRegression

    from pipeline.evaluation.baselines import calibrated

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 3))
    y = (X[:, 0] + rng.normal(size=2000) > 0).astype(int)
    fit_rows = np.arange(2000) < 1000
    fit_rows &= (y == 0) | (rng.random(2000) < 0.3)  # trained where the engaged are rare
    val = np.arange(2000) >= 1000
    raw = LogisticRegression().fit(X[fit_rows], y[fit_rows])
    scaled = calibrated(raw, X, y, val)
    assert abs(predict(raw, X[val]).mean() - y[val].mean()) > 0.15  # shifted
    assert abs(predict(scaled, X[val]).mean() - y[val].mean()) < 0.02
    one_class = val & (y == 1)
    assert calibrated(raw, X, y, one_class) is raw  # nothing to fit on


# --- plots -----------------------------------------------------------------------------

def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    curves = {"sequence": (y, np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 200), 0, 1)),
              "prevalence": (y, np.full(200, y.mean()))}
    paths = [
        plots.plot_roc(curves, tmp_path / "roc.png"), plots.plot_pr(curves, tmp_path / "pr.png"),
        plots.plot_calibration(curves, tmp_path / "cal.png"), plots.plot_lift(curves, tmp_path / "lift.png"),
    ]
    att = rng.dirichlet(np.ones(6), size=(2, 6))  # (heads, 1+T, 1+T), rows sum to 1
    paths.append(plots.plot_attention([att, att], ["CLS"] + [f"e{i}" for i in range(5)], tmp_path / "att.png", "user"))
    paths.append(plots.plot_attention([att[:1]], ["CLS"] + list("abcde"), tmp_path / "att1.png", "one head"))
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    with pytest.raises(ValueError, match="heads"):
        plots.plot_attention([att], ["CLS", "x"], tmp_path / "bad.png")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, drawn as they would be saved, kept open."""
    import matplotlib.pyplot as plt

    made = []

    def keep(fig, path):
        fig.canvas.draw()
        made.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield made
    plt.close("all")


def _eight_curves(n: int = 300) -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    names = ["pretrained-100pct-all-cls", "prevalence", "active_last_week", "logistic", "hgb", "hgb_text",
             "blend with hgb_text", "oracle"]
    return {name: (y, np.clip(0.5 + 0.1 * (i + 1) * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1))
            for i, name in enumerate(names)}


def test_legends_cover_no_data_and_every_figure_fits_the_width_the_ui_shows(figures, tmp_path):
    curves = _eight_curves()
    plots.plot_roc(curves, tmp_path / "roc.png")
    plots.plot_pr(curves, tmp_path / "pr.png")
    plots.plot_calibration(curves, tmp_path / "cal.png")
    plots.plot_lift(curves, tmp_path / "lift.png")
    for fig, name in zip(figures, ("roc", "pr", "calibration", "lift")):
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1, name
        entries = [t.get_text() for t in legends[0].get_texts()]
        assert all(any(e.startswith(label) for e in entries) for label in curves), name  # every curve named
        box = legends[0].get_window_extent()
        for ax in fig.axes:  # the data area of every panel
            assert not box.overlaps(ax.get_window_extent()), f"{name}: the legend covers {ax.get_title()!r}"
        assert fig.get_tightbbox().width <= plots.WIDTH, name  # inches, legend included
        assert min(t.get_fontsize() for t in legends[0].get_texts()) >= plots.FONT


def _shown_labels(axis) -> list:
    return [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("items", [5, 40, 128])
def test_attention_tick_labels_are_legible_and_apart_at_every_length(figures, tmp_path, items):
    rng = np.random.default_rng(0)
    n = 1 + items
    maps = [rng.dirichlet(np.ones(n), size=(4, n)) for _ in range(2)]  # 2 layers x (4 heads, 1+T, 1+T)
    labels = ["CLS"] + [f"content_view {i} 18.3d-32.5d ago" for i in range(items)]
    plots.plot_attention(maps, labels, tmp_path / "att.png", "events attention, user 0123abcd")
    (fig,) = figures
    maps_axes = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    assert len(maps_axes) == 2
    shown = _shown_labels(fig.axes[2].xaxis)  # the bottom panel ([CLS] per head) carries the key labels
    if n <= 30:
        assert len(shown) == n  # short sequences: every item named
    assert len(shown) >= min(n, 20)
    assert fig.get_tightbbox().width <= plots.WIDTH
    for ax in fig.axes:  # maps, [CLS] strip and colour bars
        for axis in (ax.xaxis, ax.yaxis):
            texts = _shown_labels(axis)
            assert all(t.get_fontsize() >= plots.FONT for t in texts)
            for a, b in combinations([t.get_window_extent() for t in texts], 2):
                assert not a.overlaps(b), f"{ax.get_title()!r}: tick labels overlap"


def test_attention_takes_each_users_fullest_example_for_distinct_users():
    from pipeline.evaluation.attention import chosen_examples

    #                     rows: 0     1     2     3     4     5
    user_key = np.array([b"a", b"a", b"b", b"c", b"c", b"d"])
    conversation = np.array([9, 8, 3, 0, 2, 1])  # items per example in each stream
    food = np.array([9, 0, 3, 5, 2, 1])
    zeros = np.zeros(6, int)
    data = SimpleNamespace(user_key=user_key, examples={
        "conversation_start": zeros, "conversation_end": conversation, "food_start": zeros, "food_end": food})
    rows = np.arange(6)
    # a's two windows are the two fullest: a once, then the users whose examples have both streams.
    assert chosen_examples(data, rows, ["conversation", "food"], 3).tolist() == [0, 2, 4]
    assert chosen_examples(data, rows, ["conversation", "food"], 9).tolist() == [0, 2, 4, 5]
    assert chosen_examples(data, rows[[1, 4]], ["conversation", "food"], 3).tolist() == [4, 1]  # 2 streams beat 1
    assert chosen_examples(data, rows[:0], ["conversation"], 3).tolist() == []


def test_the_blend_weighs_an_informative_model_and_ignores_noise():
    from scipy.special import expit

    from pipeline.evaluation.blend import blend, fit_blend

    rng = np.random.default_rng(1)
    signal = rng.normal(0, 1.5, 6000)
    y = (rng.random(len(signal)) < expit(signal)).astype(int)
    a = expit(signal + rng.normal(0, 1.0, len(y)))  # two views of the signal, independent errors
    b = expit(signal + rng.normal(0, 1.0, len(y)))
    val, test = slice(0, 3000), slice(3000, None)
    w, scale, bias = fit_blend(a[val], b[val], y[val])
    assert 0.3 <= w <= 0.7  # equally good views: about half each
    both = blend(a, b, w, scale, bias)
    assert roc_auc_score(y[test], both[test]) > max(roc_auc_score(y[test], a[test]), roc_auc_score(y[test], b[test])) + 0.01
    noise = rng.random(len(y))
    assert fit_blend(a[val], noise[val], y[val])[0] >= 0.9  # pure noise gets (almost) no weight
    assert fit_blend(a[val], b[val], np.ones(3000))[:1] == (1.0,)


def test_the_blends_validation_figures_are_out_of_fold():
    """crossfit_blend: a user's validation examples are blended with the weight and scaling
    fitted on other users only, so their own labels never move their blended figures."""
    from pipeline.evaluation.blend import crossfit_blend

    rng = np.random.default_rng(1)
    n = 2000
    users = rng.integers(0, 300, n)
    y = rng.integers(0, 2, n)
    a, b = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99), rng.uniform(0.01, 0.99, n)
    out = crossfit_blend(a, b, y, users)
    assert np.isfinite(out).all() and np.array_equal(out, crossfit_blend(a, b, y, users))
    for u in (3, 17, 250):
        own = users == u
        assert own.any() and np.array_equal(crossfit_blend(a, b, np.where(own, 1 - y, y), users)[own], out[own])
    assert not np.array_equal(crossfit_blend(a, b, np.where(users < 150, 1 - y, y), users), out)  # labels count
