"""Run the simulator: days -> hidden history -> events, side tables and ground truth.

`simulate(sim)` returns the tables as DataFrames; `simulate_to_dir` writes them as Parquet
(events, users, foods, truth) and logs a one-paragraph summary. Hidden traits and life
events never reach the files: `users.parquet` holds only user_id and program_start.

`simulate_to_dir(..., chunk_users=N)` writes a log larger than memory: users are simulated
in blocks of `SEED_BLOCK`, each seeded from (seed, block) alone, and appended N users at a
time, so peak memory follows N and the files do not. Users never interact (the food catalog
is fixed, coaches have no capacity), so a block needs nothing from the others. The chunked
tables differ from the in-memory ones for the same seed, whose random streams span all users.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_path
from features.contract import AS_OF, PROGRAM_START, USER_ID
from pipeline.simulator.catalog import food_catalog
from pipeline.simulator.config import SimConfig
from pipeline.simulator.conversation import plan_and_write
from pipeline.simulator.dynamics import Traits, day_step, draw_traits, initial_state
from pipeline.simulator.events import US_PER_DAY, Clock, logged_events
from pipeline.simulator.persona import History, draw_persona
from pipeline.simulator.report import life_events, summarize
from pipeline.simulator.tables import append_dirty_rows, assemble_events
from pipeline.simulator.truth import p_engaged

log = logging.getLogger(__name__)
P_ENGAGED = "p_engaged"
TABLES = ("events", "users", "foods", "truth")
SEED_BLOCK = 500  # users per independently seeded block of the chunked path (~1 s each)


@dataclass
class Simulation:
    """Everything one run produced. Only `tables` is written; the rest is for reports and
    tests (hidden ground truth that no model input may see)."""

    tables: dict[str, pa.Table]  # events, users, foods, truth
    life_events: pd.DataFrame  # user_id, kind, booked, start, end, announced_at
    history: History  # (n_days, n_users) hidden days: active, motivation, travel...
    traits: Traits  # the users' hidden fixed parameters (base rate, responsiveness...)
    stats: dict[str, object]


def day_zero(start_date: str) -> pd.Timestamp:
    """Day 0 as a UTC timestamp; it must be a Monday at 00:00 so cutoffs fall on Mondays."""
    try:
        t = pd.Timestamp(start_date)
    except ValueError:
        raise UserError(
            f"sim.start_date={start_date!r} is not a date; use e.g. 2026-01-05"
        ) from None
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    if t.weekday() != 0 or t != t.normalize():
        raise UserError(
            f"sim.start_date={start_date!r} must be a Monday at 00:00 UTC (weekly cutoffs are "
            f"Mondays); e.g. {(t.normalize() - pd.Timedelta(days=t.weekday())).date()}"
        )
    return t


def check_sim(sim: SimConfig) -> None:
    """Refuse a `sim` section that cannot be simulated, naming the key."""
    if sim.users < 1 or sim.weeks < 2 or sim.truth_samples < 1:
        raise UserError(f"sim needs users >= 1, weeks >= 2 and truth_samples >= 1; got {sim}")
    if not 0.0 <= sim.dirty_fraction < 0.5:
        raise UserError(f"sim.dirty_fraction={sim.dirty_fraction} must lie in [0, 0.5)")
    day_zero(sim.start_date)


def run_simulation(sim: SimConfig) -> Simulation:
    """Simulate `sim.users` users for `sim.weeks` weeks; deterministic for `sim.seed`."""
    check_sim(sim)
    return simulate_users(sim, np.arange(sim.users), np.random.SeedSequence(sim.seed))


def simulate_users(sim: SimConfig, users: np.ndarray, seq: np.random.SeedSequence) -> Simulation:
    """Simulate the users numbered `users` (consecutive, out of `sim.users`) from `seq`."""
    t0 = time.perf_counter()
    day0 = day_zero(sim.start_date)
    n, n_days = len(users), 7 * sim.weeks
    # Independent streams: the truth's replicas or the dirty rows never shift the events.
    rng_dyn, rng_truth, rng_evt, rng_dirty = (np.random.default_rng(s) for s in seq.spawn(4))
    rnd = random.Random(int(seq.generate_state(1)[0]))  # text composition

    cat = food_catalog()
    tr = draw_traits(n, n_days, rng_dyn)
    per = draw_persona(n, cat, rng_evt)
    st = initial_state(tr)
    hist = History.empty(n_days, n)
    truth: list[tuple[int, np.ndarray, np.ndarray]] = []
    for d in tqdm(range(n_days), desc="simulate", unit="day", disable=None, leave=False):
        if d >= 7 and d % 7 == 0:  # a cutoff: as_of = day d at 00:00, horizon inside the period
            rows = np.flatnonzero(tr.start_day < d)  # program_start (day + hours) < as_of
            p = p_engaged(
                tr.take(rows), st.take(rows), d, day0.weekday(), sim.truth_samples, rng_truth
            )
            truth.append((d, rows, p))
        hist.record(d, day_step(tr, st, d, (day0.weekday() + d) % 7, rng_dyn))

    day0_us = day0.value // 1000  # ns -> µs
    clock = Clock(day0_us, tr.start_day, per.start_off)
    width = max(5, len(str(sim.users - 1)))
    user_ids = np.array([f"u{i:0{width}d}" for i in users], dtype=object)
    msgs = plan_and_write(hist, tr, per, cat, clock, day0.weekday(), rng_evt, rnd)
    blocks = logged_events(hist, per, cat, clock, msgs.user_counts, rng_evt) + [msgs.block]
    clean = assemble_events(blocks, user_ids)
    events = append_dirty_rows(clean, sim.dirty_fraction, rng_dirty)

    ts_type = pa.timestamp("us", tz="UTC")
    tables = {
        "events": events,
        "users": pa.table(
            {
                USER_ID: pa.array(user_ids, pa.string()),
                PROGRAM_START: pa.array(clock.program_start_us(), ts_type),
            }
        ),
        "foods": pa.Table.from_pandas(cat.foods, preserve_index=False),
        "truth": pa.table(
            {
                USER_ID: pa.array(np.concatenate([user_ids[r] for _, r, _ in truth]), pa.string()),
                AS_OF: pa.array(
                    np.concatenate(
                        [np.full(len(r), day0_us + d * US_PER_DAY) for d, r, _ in truth]
                    ),
                    ts_type,
                ),
                P_ENGAGED: pa.array(np.concatenate([p for _, _, p in truth]), pa.float64()),
            }
        ).sort_by([(USER_ID, "ascending"), (AS_OF, "ascending")]),
    }
    lives = life_events(hist, msgs.announced, user_ids, day0)
    stats = summarize(hist, tr, truth, lives, clean, events.num_rows - clean.num_rows, day0)
    stats["seconds"] = time.perf_counter() - t0
    return Simulation(tables=tables, life_events=lives, history=hist, traits=tr, stats=stats)


def simulate(sim: SimConfig) -> dict[str, pd.DataFrame]:
    """events / users / foods / truth as DataFrames (food_ids as an Arrow list column)."""
    res = run_simulation(sim)
    return {name: _to_pandas(t) for name, t in res.tables.items()}


def simulate_to_dir(sim: SimConfig, out_dir: str | Path, chunk_users: int | None = None) -> Path:
    """Write events/users/foods/truth.parquet into `out_dir`: all users at once, or with
    `chunk_users` (a multiple of `SEED_BLOCK`) that many at a time (the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if chunk_users:
        return _write_chunked(sim, out, chunk_users)
    res = run_simulation(sim)
    for name, table in res.tables.items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    log.info("%s; wrote %s", _paragraph(sim, res.stats), out)
    return out


def _write_chunked(sim: SimConfig, out: Path, chunk_users: int) -> Path:
    """Append each chunk's events, users and truth to the files (one row group or more per
    chunk). Users are numbered in chunk order, so users and truth stay sorted and so do the
    events, except that each block's dirty rows follow its clean rows."""
    check_sim(sim)
    if chunk_users < 1 or chunk_users % SEED_BLOCK:
        raise UserError(
            f"chunk_users={chunk_users} must be a multiple of {SEED_BLOCK} (users are seeded in "
            f"blocks of {SEED_BLOCK}, so the files do not depend on the chunk size); e.g. "
            f"{max(1, round(chunk_users / SEED_BLOCK)) * SEED_BLOCK}"
        )
    t0, events, dirty = time.perf_counter(), 0, 0
    with ExitStack() as stack:
        writers: dict[str, pq.ParquetWriter] = {}
        for lo in tqdm(range(0, sim.users, chunk_users), desc="chunks", disable=None, leave=False):
            hi = min(lo + chunk_users, sim.users)
            blocks = [
                simulate_users(
                    sim, np.arange(b, min(b + SEED_BLOCK, hi)),
                    np.random.SeedSequence(sim.seed, spawn_key=(b // SEED_BLOCK,)),
                )
                for b in range(lo, hi, SEED_BLOCK)
            ]  # fmt: skip
            for name in ("events", "users", "truth"):
                table = pa.concat_tables([res.tables[name] for res in blocks])
                if name not in writers:  # writers close before atomic_path renames
                    tmp = stack.enter_context(atomic_path(out / f"{name}.parquet"))
                    writers[name] = stack.enter_context(pq.ParquetWriter(tmp, table.schema))
                writers[name].write_table(table)
            events += sum(res.stats["events"] for res in blocks)
            dirty += sum(res.stats["dirty_rows"] for res in blocks)
        with atomic_path(out / "foods.parquet") as tmp:
            pq.write_table(blocks[0].tables["foods"], tmp)
    seconds = time.perf_counter() - t0
    log.info(
        "simulated %s users x %s weeks (seed %s) in chunks of %s users in %.1f s: %s events "
        "(%s/s), %s dirty rows appended; wrote %s",
        f"{sim.users:,}", sim.weeks, sim.seed, f"{chunk_users:,}", seconds, f"{events:,}",
        f"{events / seconds:,.0f}", f"{dirty:,}", out,
    )  # fmt: skip
    return out


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


def _paragraph(sim: SimConfig, s: dict) -> str:
    per_type = ", ".join(f"{k} {v:,}" for k, v in s["events_by_type"].items())
    weekly = " ".join(f"{r:.2f}" for r in s["label_rate_by_week"])
    return (
        f"simulated {sim.users:,} users x {sim.weeks} weeks (seed {sim.seed}) in {s['seconds']:.1f} s: "
        f"{s['events']:,} events ({per_type}); {s['user_messages']:,} user and {s['coach_messages']:,} "
        f"coach messages ({s['user_messages_per_user_week']:.2f} user messages per user-week); "
        f"label rate {s['label_rate']:.2f} overall, by cutoff {weekly}; oracle AUC {s['oracle_auc']:.3f}; "
        f"{s['life_event_week_share']:.1%} of labelled user-weeks touched by travel/busy/illness "
        f"(travel {s['travel_week_share']:.1%}), {s['trips_announced_share']:.0%} of trips announced; "
        f"{s['churned_share']:.0%} of users churned by the end, {s['coach_only_users']} with only coach "
        f"messages; {s['dirty_rows']:,} dirty rows appended"
    )
