"""The simulator: contract, determinism, day-level activity, calibrated ground truth, text.

Labels here are recomputed from events.parquet by the rule of docs/design.md §3, independently
of the simulator's own bookkeeping, so a drift between the two is caught."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from common.errors import UserError
from features.contract import (
    AS_OF,
    CONTENT_ID,
    CONTENT_VIEW,
    EVENT_TYPE,
    FOOD_ID,
    FOOD_IDS,
    FOOD_LOG,
    MEAL,
    MEALS,
    MESSAGE,
    NORMALISED_SCHEMA,
    PROGRAM_START,
    SENDER,
    SENDER_COACH,
    SENDER_USER,
    SENDERS,
    TEXT,
    TS,
    USER_ID,
    VALUE,
    WEIGH_IN,
    is_user_activity,
)
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.simulator import run
from pipeline.simulator.catalog import CITIES
from pipeline.simulator.config import SimConfig
from pipeline.simulator.run import (
    P_ENGAGED,
    TABLES,
    day_zero,
    run_simulation,
    simulate,
    simulate_to_dir,
)

DAY = pd.Timedelta(days=1)
CALIB = SimConfig(users=300, weeks=8, seed=7, truth_samples=128)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The calibration-sized run, written through the CLI's entry point and read back."""
    cfg = Config(workdir=str(tmp_path_factory.mktemp("work")), sim=CALIB)
    run_stage("simulate", cfg, argparse.Namespace(out=None))
    out = Path(cfg.workdir) / "raw"  # the default folder, as `Paths.raw` says
    assert (out / "config.yaml").exists()
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in TABLES} | {"_dir": out}


@pytest.fixture(scope="module")
def hidden():
    """The same run's hidden side (life events, day history): for checks only."""
    return run_simulation(CALIB)


def realised_labels(events: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Engaged next week: user-initiated activity on >= 3 distinct days of [as_of, +7d)."""
    act = events[is_user_activity(events[EVENT_TYPE], events[SENDER]).fillna(True)]
    merged = truth[[USER_ID, AS_OF]].reset_index().merge(act[[USER_ID, TS]], on=USER_ID)
    day = (merged[TS] - merged[AS_OF]) // DAY
    merged = merged[(day >= 0) & (day < 7)].assign(day=day)
    days = merged.groupby("index")["day"].nunique()
    return (days.reindex(truth.index, fill_value=0) >= 3).to_numpy()


def test_same_seed_same_data_other_seed_other_data():
    small = SimConfig(users=60, weeks=4, seed=1, truth_samples=16)
    a, b = simulate(small), simulate(small)
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name])
    other = simulate(SimConfig(users=60, weeks=4, seed=2, truth_samples=16))
    assert not a["events"][[USER_ID, TS]].equals(other["events"][[USER_ID, TS]])
    # The truth's Monte-Carlo draws use their own stream: more samples, same events.
    more = simulate(SimConfig(users=60, weeks=4, seed=1, truth_samples=32))
    pd.testing.assert_frame_equal(a["events"], more["events"])


def test_files_follow_the_contract(written):
    out = written["_dir"]
    assert pq.read_schema(out / "events.parquet").remove_metadata() == NORMALISED_SCHEMA
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    ev, users, foods, truth = (written[k] for k in TABLES)
    utc = pd.DatetimeTZDtype("us", "UTC")
    assert list(users.columns) == [USER_ID, PROGRAM_START] and users[PROGRAM_START].dtype == utc
    assert list(truth.columns) == [USER_ID, AS_OF, P_ENGAGED] and truth[AS_OF].dtype == utc
    assert users[USER_ID].str.fullmatch(r"u\d{5}").all() and users[USER_ID].is_unique

    assert set(ev[EVENT_TYPE]) == {MESSAGE, FOOD_LOG, WEIGH_IN, CONTENT_VIEW, "water_log"}
    keys = list(zip(ev[USER_ID], ev[TS]))
    assert keys == sorted(keys)
    msg = ev[ev[EVENT_TYPE] == MESSAGE]
    assert (
        set(msg[SENDER]) == set(SENDERS)
        and msg[TEXT].notna().all()
        and (msg[TEXT].str.len() > 0).all()
    )
    assert ev.loc[ev[EVENT_TYPE] != MESSAGE, [SENDER, TEXT]].isna().all().all()
    food = ev[ev[EVENT_TYPE] == FOOD_LOG]
    sizes = food[FOOD_IDS].map(len)
    assert sizes.between(1, 6).all() and set(food[MEAL]) == set(MEALS)
    assert set(np.concatenate(food[FOOD_IDS].tolist())) <= set(foods[FOOD_ID])
    kg = ev.loc[ev[EVENT_TYPE] == WEIGH_IN, VALUE]
    assert kg.between(40, 200).all() and np.allclose(kg, kg.round(1))
    views = ev[ev[EVENT_TYPE] == CONTENT_VIEW]
    assert views[CONTENT_ID].str.fullmatch(r"c\d{4}").all() and (views[VALUE] > 0).all()
    assert ev.loc[ev[EVENT_TYPE] == "water_log", VALUE].between(100, 1000).all()

    assert 250 <= len(foods) <= 350 and foods[FOOD_ID].is_unique and foods["name"].is_unique
    assert foods["category"].nunique() >= 10 and foods[FOOD_ID].min() > len(foods)


def test_activity_is_day_aligned_and_after_program_start(written, hidden):
    ev, users = written["events"], written["users"]
    day0 = day_zero(CALIB.start_date)
    start = ev[USER_ID].map(users.set_index(USER_ID)[PROGRAM_START])
    assert (ev[TS] >= start).all()  # nothing before program_start, coach messages included
    assert (ev[TS] < day0 + 7 * CALIB.weeks * DAY).all()
    # Days with a user-initiated event are exactly the simulator's active days: an event
    # that leaked out of its day would mark a neighbouring day active.
    act = ev[is_user_activity(ev[EVENT_TYPE], ev[SENDER]).fillna(True)]
    seen = set(zip(((act[TS] - day0) // DAY).astype(int), act[USER_ID].str[1:].astype(int)))
    d, u = np.nonzero(hidden.history.active)
    assert seen == set(zip(d.tolist(), u.tolist()))
    # Some users never do anything: only the coach writes to them.
    coach_only = set(ev[USER_ID]) - set(act[USER_ID])
    assert coach_only and (ev[ev[USER_ID].isin(coach_only)][SENDER] == SENDER_COACH).all()


def test_truth_covers_started_users_at_weekly_cutoffs(written):
    users, truth = written["users"], written["truth"]
    day0 = day_zero(CALIB.start_date)
    for k in range(1, CALIB.weeks):
        as_of = day0 + 7 * k * DAY
        expect = set(users.loc[users[PROGRAM_START] < as_of, USER_ID])
        assert set(truth.loc[truth[AS_OF] == as_of, USER_ID]) == expect
    assert set(truth[AS_OF]) == {day0 + 7 * k * DAY for k in range(1, CALIB.weeks)}
    assert all(t.weekday() == 0 for t in truth[AS_OF].unique())


def test_truth_is_calibrated_against_realised_labels(written):
    truth = written["truth"]
    y = realised_labels(written["events"], truth)
    p = truth[P_ENGAGED].to_numpy()
    bins = pd.qcut(p, 8, duplicates="drop")
    table = pd.DataFrame({"y": y, "p": p}).groupby(bins, observed=True).agg(["mean", "size"])
    assert (table[("y", "size")] >= 100).all()
    gap = (table[("y", "mean")] - table[("p", "mean")]).abs()
    assert gap.max() < 0.08, table
    assert abs(y.mean() - p.mean()) < 0.03


def test_truth_has_spread_and_oracle_auc_below_one(written):
    truth = written["truth"]
    y = realised_labels(written["events"], truth)
    assert truth[P_ENGAGED].std() > 0.15
    assert 0.75 < roc_auc_score(y, truth[P_ENGAGED]) < 0.99
    assert 0.4 < y.mean() < 0.75
    by_week = pd.Series(y).groupby(truth[AS_OF].to_numpy()).mean()
    assert by_week.iloc[:2].mean() > by_week.iloc[-2:].mean() + 0.05  # program fatigue


def test_messages_are_varied_and_in_volume(written):
    ev, users = written["events"], written["users"]
    msg = ev[ev[EVENT_TYPE] == MESSAGE]
    mine = msg.loc[msg[SENDER] == SENDER_USER, TEXT]
    assert mine.nunique() / len(mine) > 0.5
    user_weeks = (
        (day_zero(CALIB.start_date) + 7 * CALIB.weeks * DAY - users[PROGRAM_START]) / (7 * DAY)
    ).sum()
    assert 0.5 < len(mine) / user_weeks < 5.0
    assert (msg[SENDER] == SENDER_COACH).sum() > len(mine) / 2  # check-ins, replies, nudges


def test_announced_trips_precede_silence(written, hidden):
    """The text-only signal: a trip is announced days ahead and then activity stops."""
    ev, lives, active = written["events"], hidden.life_events, hidden.history.active
    day0 = day_zero(CALIB.start_date)
    trips = lives[(lives["kind"] == "travel") & lives["announced_at"].notna()]
    assert len(trips) >= 30
    assert trips["announced_at"].lt(trips["start"]).all()
    share = len(trips) / (lives["kind"] == "travel").sum()
    assert 0.5 < share < 0.95

    user_msgs = ev[(ev[EVENT_TYPE] == MESSAGE) & (ev[SENDER] == SENDER_USER)]
    said = user_msgs.assign(day=(user_msgs[TS] - day0) // DAY)
    said = said[said[TEXT].str.contains("|".join(CITIES), case=False, regex=True)]
    announced_day = (trips["announced_at"] - day0) // DAY
    hits = pd.MultiIndex.from_arrays([trips[USER_ID], announced_day]).isin(
        pd.MultiIndex.from_arrays([said[USER_ID], said["day"]])
    )
    assert hits.mean() > 0.9  # the announcement names the destination

    on_trip = []
    for row in trips.itertuples():
        u = int(row.user_id[1:])
        days = range((row.start - day0) // DAY, min((row.end - day0) // DAY, active.shape[0]))
        on_trip += [active[d, u] for d in days]
    started = (
        np.arange(active.shape[0])[:, None]
        >= ((written["users"][PROGRAM_START] - day0) // DAY).to_numpy()
    )
    assert np.mean(on_trip) < 0.15 < 0.4 < active[started].mean()


def test_food_logs_have_meal_structure(written):
    ev, foods = written["events"], written["foods"]
    food = ev[ev[EVENT_TYPE] == FOOD_LOG].explode(FOOD_IDS)
    top = {m: set(food.loc[food[MEAL] == m, FOOD_IDS].value_counts().index[:15]) for m in MEALS}
    assert len(top["breakfast"] & top["dinner"]) <= 3  # breakfast foods differ from dinner
    per_user = food.groupby(USER_ID)[FOOD_IDS].agg(
        lambda s: s.value_counts(normalize=True).iloc[:10].sum()
    )
    assert per_user[food.groupby(USER_ID).size() >= 50].median() > 0.5  # concentrated tastes
    assert food[FOOD_IDS].nunique() > 0.8 * len(foods)


def test_dirty_rows_are_only_rejectable_rows():
    base = SimConfig(users=80, weeks=4, seed=3, truth_samples=16)
    clean = simulate(base)
    dirty = simulate(SimConfig(**{**vars(base), "dirty_fraction": 0.02}))
    pd.testing.assert_frame_equal(dirty["truth"], clean["truth"])
    n = len(clean["events"])
    pd.testing.assert_frame_equal(dirty["events"].iloc[:n], clean["events"])
    extra = dirty["events"].iloc[n:]
    assert len(extra) == round(0.02 * n)
    duplicate = _row_keys(extra).isin(set(_row_keys(clean["events"])))
    et, sender = extra[EVENT_TYPE], extra[SENDER]
    rejectable = (
        extra[USER_ID].isna()
        | extra[TS].isna()
        | ((et == WEIGH_IN) & ~extra[VALUE].between(20, 400))
        | ((et == FOOD_LOG) & (extra[FOOD_IDS].list.len().fillna(0) == 0))
        | ((et == MESSAGE) & extra[TEXT].isna())
        | ((et == MESSAGE) & ~sender.isin(SENDERS))
        | duplicate
    )
    assert rejectable.all()
    assert duplicate.any() and extra[USER_ID].isna().any() and (sender == "bot").any()


def test_chunked_files_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch):
    """Users seeded in blocks (of 30 here): chunks of one and of two blocks write the same
    tables, in the in-memory path's schema; each block's dirt follows its clean rows."""
    monkeypatch.setattr(run, "SEED_BLOCK", 30)
    sim = SimConfig(users=100, weeks=3, seed=5, truth_samples=8, dirty_fraction=0.02)
    with pytest.raises(UserError, match="multiple of 30"):
        simulate_to_dir(sim, tmp_path / "bad", chunk_users=45)
    one, two, whole = (
        simulate_to_dir(sim, tmp_path / name, chunk_users=chunk)
        for name, chunk in (("one", 30), ("two", 60), ("whole", None))
    )
    clean = simulate_to_dir(
        SimConfig(**{**vars(sim), "dirty_fraction": 0.0}), tmp_path / "clean", chunk_users=60
    )
    for name in TABLES:
        a, b = (pq.read_table(d / f"{name}.parquet") for d in (one, two))
        assert a.equals(b)
        assert a.schema.equals(pq.read_schema(whole / f"{name}.parquet"), check_metadata=True)
    groups = [pq.ParquetFile(d / "events.parquet").num_row_groups for d in (one, two)]
    assert groups == [4, 2]  # one row group per chunk: 30+30+30+10 users, then 60+40

    users, truth = (pd.read_parquet(two / f"{name}.parquet") for name in ("users", "truth"))
    assert users[USER_ID].tolist() == [f"u{i:05d}" for i in range(100)]
    assert truth.equals(truth.sort_values([USER_ID, AS_OF], ignore_index=True))
    for as_of, cut in truth.groupby(AS_OF):  # every started user at every cutoff
        assert set(cut[USER_ID]) == set(users.loc[users[PROGRAM_START] < as_of, USER_ID])

    # Dirt never shifts the clean events: each block's clean rows equal the dirt-free run's,
    # sorted by (user_id, ts), followed by that block's own dirty rows.
    clean_events = pq.read_table(clean / "events.parquet")
    keys = list(zip(clean_events[USER_ID].to_pylist(), clean_events[TS].to_pylist()))
    assert keys == sorted(keys)
    block = np.array([int(u[1:]) // 30 for u in clean_events[USER_ID].to_pylist()])
    dirty = pq.ParquetFile(one / "events.parquet")
    for g in range(dirty.num_row_groups):
        rows, mine = dirty.read_row_group(g), clean_events.filter(block == g)
        assert rows.slice(0, mine.num_rows).equals(mine)
        assert rows.num_rows - mine.num_rows == round(0.02 * mine.num_rows) > 0


def _row_keys(df: pd.DataFrame) -> pd.Series:
    """Each row as one string, nulls included, to find exact duplicates."""
    rows = df.astype(object).itertuples(index=False, name=None)
    return pd.Series([repr(r) for r in rows], index=df.index)


def test_start_date_must_be_a_monday():
    with pytest.raises(UserError, match="Monday"):
        simulate(SimConfig(users=5, weeks=2, start_date="2026-01-06"))


def test_headroom_matches_the_store_to_its_simulation_and_reads_announcements(sim_store):
    import copy

    from pipeline.diagnostics import headroom

    path, cfg, _ = sim_store
    m = headroom.match(cfg, path)  # raises unless the hidden history gives the store's labels
    announced, booked = headroom.life_columns(m, True), headroom.life_columns(m, False)
    assert announced.shape == booked.shape == (len(m.user), 2 * len(headroom.KINDS))
    overlap = slice(0, None, 2)
    assert (announced[:, overlap] <= booked[:, overlap]).all()  # what was said is a part of what was booked
    assert booked[:, overlap].max() > 0 and (booked[:, overlap] <= m.horizon).all()
    other = copy.deepcopy(cfg)
    other.sim.seed += 1
    with pytest.raises(ValueError, match="not this simulation's"):
        headroom.match(other, path)


def test_validate_after_simulate_reads_what_simulate_wrote_and_does_not_simulate_again(tmp_path, capsys):
    # The chunked path gives other files than an all-at-once run of the same settings, so a
    # second simulation would silently replace them (it did, before simulate stamped raw/).
    from pipeline.cli import main

    args = ["--config", "configs/test.yaml", f"workdir={tmp_path}"]
    assert main(["simulate", *args, "--chunk-users", "500"]) == 0
    events = tmp_path / "raw" / "events.parquet"
    written, stamp = events.read_bytes(), events.stat().st_mtime_ns
    assert main(["validate", *args]) == 0
    assert events.stat().st_mtime_ns == stamp and events.read_bytes() == written
    report = json.loads((tmp_path / "validated" / "validation.json").read_text())
    assert report["rows_in"] == pq.read_metadata(events).num_rows


def test_a_simulator_config_reading_events_from_elsewhere_is_refused_before_simulating(tmp_path, capsys):
    from pipeline.cli import main

    mine = tmp_path / "mine.parquet"  # the user's own file, named while the source is still the simulator
    assert main(["validate", "--config", "configs/test.yaml", f"workdir={tmp_path}/w", f"data.events={mine}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.source=simulator writes") and "data.source=files" in err and "\n" not in err
    assert not (tmp_path / "w" / "raw").exists()  # nothing simulated
