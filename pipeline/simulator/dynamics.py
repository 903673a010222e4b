"""Hidden traits, daily state and the one day-step transition of the simulated app.

`day_step` is the only place where activity is decided. The main simulation calls it on
one row per user; the Monte-Carlo ground truth (`truth.py`) calls it on K replicated rows
per user. Sharing the function is what makes `truth.parquet` calibrated: any change to the
dynamics changes both at once.

Everything here is vectorised over rows; nothing loops over users. Arrays are replaced,
never modified in place, so a `Day` can keep references to them as snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

# Weekday effect on the activity logit, Monday first: weekends are quieter.
WEEKDAY_EFFECT = np.array([0.15, 0.1, 0.05, 0.0, -0.1, -0.4, -0.3])
CHECKIN_WEEKDAYS = (1, 4)  # the coach checks in on Tuesdays and Fridays
NUDGE_AFTER_INACTIVE_DAYS = 3  # a re-engagement nudge after this many silent days...
NUDGE_EVERY_DAYS = 7  # ...at most once a week

# Activity logit weights. Travel is the strongest suppressor on purpose: a trip announced
# in a message before the cutoff is the signal only a text-reading model can see.
W_MOTIVATION, W_HABIT = 1.3, 2.2
W_TRAVEL, W_BUSY, W_ILL = -3.8, -1.1, -2.6
W_PACKING, W_JETLAG = -1.2, -1.0  # the day before a trip; the first two days back
W_ONBOARDING = 1.0  # first week of the program: everything is new
W_CHECKIN, W_NUDGE = 0.35, 1.3  # times the user's responsiveness to coach contact
# Motivation is an AR(1) around a slowly falling level; its daily shocks are what recent
# counts see only with delay and message tone shows at once.
MOTIVATION_REVERSION, MOTIVATION_NOISE = 0.1, 0.28


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _Rows:
    """Per-row arrays that can be gathered (`take`) for Monte-Carlo replication."""

    def take(self, idx: np.ndarray):
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))


@dataclass
class Traits(_Rows):
    """Hidden, fixed per-user parameters that drive activity. Never written to disk."""

    start_day: np.ndarray  # int: day index of program start
    base: np.ndarray  # baseline activity logit
    mu0: np.ndarray  # long-run motivation level at program start
    fatigue: np.ndarray  # drop of that level per week of tenure (program fatigue)
    habit_gain: np.ndarray  # habit gained per active day (share of the gap to 1)
    habit_decay: np.ndarray  # habit lost per inactive day (share of the habit)
    respond: np.ndarray  # responsiveness to coach contact, 0..1.5
    frustration: np.ndarray  # motivation lost per plateau day
    trip_rate: np.ndarray  # daily chance of booking a trip
    busy_rate: np.ndarray  # daily chance that a work crunch starts
    ill_rate: np.ndarray  # daily chance of falling ill
    loss_rate: np.ndarray  # kg per week lost while motivated
    weight0: np.ndarray  # starting weight, kg
    noshow: np.ndarray  # bool: signs up and never uses the app


@dataclass
class State(_Rows):
    """Daily evolving hidden state at the start of a day."""

    motivation: np.ndarray  # mean-reverting random walk, around 0
    habit: np.ndarray  # 0..1, rises on active days, decays on inactive ones
    weight: np.ndarray  # true weight, kg (weigh-ins add measurement noise)
    streak: np.ndarray  # int: days since the last active day
    since_nudge: np.ndarray  # int: days since the coach last nudged
    ill_left: np.ndarray  # int: remaining days of illness
    busy_start: np.ndarray  # int: first day of the next or current work crunch (-1: none)
    busy_end: np.ndarray  # int: first day after it
    plateau_left: np.ndarray  # int: remaining days of a weight plateau
    trip_start: np.ndarray  # int: day index of the next or current trip (-1: none)
    trip_end: np.ndarray  # int: first day back home
    quit_day: np.ndarray  # int: the day a decision to quit takes effect (-1: none)
    churned: np.ndarray  # bool: has quit the app


@dataclass
class Day:
    """What happened on one day, per row; arrays are snapshots, safe to keep."""

    active: np.ndarray  # bool: >= 1 user-initiated event on this UTC day
    checkin: np.ndarray  # bool: scheduled coach check-in
    nudge: np.ndarray  # bool: coach re-engagement nudge
    travel: np.ndarray
    busy: np.ndarray
    ill: np.ndarray
    plateau: np.ndarray
    new_trip: np.ndarray  # bool: a trip was booked today (it starts on trip_start)
    new_busy: np.ndarray  # bool: a work crunch became known today (it starts on busy_start)
    new_ill: np.ndarray
    trip_start: np.ndarray
    trip_end: np.ndarray
    busy_start: np.ndarray
    quit_day: np.ndarray
    motivation: np.ndarray  # the motivation that drove today's activity
    weight: np.ndarray
    streak: np.ndarray  # silent days before today
    churned: np.ndarray


def draw_traits(n: int, n_days: int, rng: np.random.Generator) -> Traits:
    """Sample the hidden traits of `n` users; programs start over the first half."""
    return Traits(
        start_day=rng.integers(0, max(1, n_days // 2), n),
        base=rng.normal(-0.4, 0.8, n),
        mu0=rng.normal(0.2, 0.6, n),
        fatigue=rng.uniform(0.0, 0.12, n),
        habit_gain=rng.uniform(0.04, 0.2, n),
        habit_decay=rng.uniform(0.04, 0.2, n),
        respond=1.5 * rng.beta(2.0, 2.0, n),
        frustration=rng.uniform(0.0, 0.1, n),
        trip_rate=0.009 * rng.gamma(2.0, 0.5, n),
        busy_rate=0.0012 * rng.gamma(2.0, 0.5, n),
        ill_rate=0.003 * rng.gamma(2.0, 0.5, n),
        loss_rate=rng.uniform(0.2, 0.9, n),
        weight0=np.clip(rng.normal(88.0, 14.0, n), 55.0, 160.0),
        noshow=rng.random(n) < 0.04,
    )


def initial_state(tr: Traits) -> State:
    n = len(tr)
    zeros = np.zeros(n, dtype=np.int64)
    return State(
        motivation=tr.mu0 + 0.8,  # the honeymoon of a new program
        habit=np.full(n, 0.3),
        weight=tr.weight0.copy(),
        streak=zeros,
        since_nudge=np.full(n, 99, dtype=np.int64),
        ill_left=zeros,
        busy_start=zeros - 1,
        busy_end=zeros - 1,
        plateau_left=zeros,
        trip_start=zeros - 1,
        trip_end=zeros - 1,
        quit_day=zeros - 1,
        churned=tr.noshow.copy(),
    )


def day_step(tr: Traits, st: State, day: int, weekday: int, rng: np.random.Generator) -> Day:
    """Advance every row by one day: life events, coach contact, activity, state update.

    Mutates `st` by replacing its arrays. The random draws are taken in one block in a
    fixed order, so a run is deterministic for a seed.
    """
    n = len(st)
    u = rng.random((14, n))
    noise = rng.standard_normal(n)
    started = tr.start_day <= day
    tenure = day - tr.start_day

    # Life events known ahead (and so announceable): a trip is booked 3-12 days ahead and
    # lasts 4-10 days; a work crunch is known 0-5 days ahead and lasts 10-28 days.
    new_trip = started & (st.trip_end <= day) & (u[0] < tr.trip_rate)
    st.trip_start = np.where(new_trip, day + 3 + (u[1] * 10).astype(np.int64), st.trip_start)
    st.trip_end = np.where(new_trip, st.trip_start + 4 + (u[2] * 7).astype(np.int64), st.trip_end)
    travel = started & (st.trip_start <= day) & (day < st.trip_end)
    packing = started & (st.trip_start == day + 1)
    jetlag = started & (st.trip_end <= day) & (day < st.trip_end + 2)
    new_busy = started & (st.busy_end <= day) & (u[3] < tr.busy_rate)
    st.busy_start = np.where(new_busy, day + (u[4] * 6).astype(np.int64), st.busy_start)
    st.busy_end = np.where(new_busy, st.busy_start + 10 + (u[5] * 19).astype(np.int64), st.busy_end)
    busy = started & (st.busy_start <= day) & (day < st.busy_end)
    # Surprises: illness (2-6 days) and weight plateaus (10-30 days).
    new_ill = started & (st.ill_left == 0) & (u[6] < tr.ill_rate)
    st.ill_left = np.where(new_ill, 2 + (u[7] * 5).astype(np.int64), st.ill_left)
    ill = st.ill_left > 0
    new_plateau = started & (tenure > 14) & (st.plateau_left == 0) & (u[8] < 1 / 35)
    st.plateau_left = np.where(new_plateau, 10 + (u[9] * 21).astype(np.int64), st.plateau_left)
    plateau = st.plateau_left > 0

    # Coach contact: a nudge after silence replaces that day's check-in; after three
    # silent weeks the coach checks in only on Tuesdays.
    after_first_day = started & (tenure > 0)
    nudge = (
        after_first_day
        & (st.streak >= NUDGE_AFTER_INACTIVE_DAYS)
        & (st.since_nudge >= NUDGE_EVERY_DAYS)
    )
    checkin_day = (weekday in CHECKIN_WEEKDAYS) & (
        (st.streak < 21) | (weekday == CHECKIN_WEEKDAYS[0])
    )
    checkin = after_first_day & checkin_day & ~nudge
    quitting = started & (st.quit_day >= 0)
    churned = st.churned | (quitting & (st.quit_day <= day))
    winback = churned & nudge & (u[10] < 0.08 * tr.respond)  # a nudge can bring one back
    churned &= ~winback
    st.quit_day = np.where(winback, -1, st.quit_day)

    m = st.motivation
    logit = (
        tr.base
        + W_MOTIVATION * m
        + W_HABIT * (st.habit - 0.5)
        + WEEKDAY_EFFECT[weekday]
        + tr.respond * (W_CHECKIN * checkin + W_NUDGE * nudge)
        + W_ONBOARDING * (tenure < 7)
        + W_TRAVEL * travel
        + W_PACKING * packing
        + W_JETLAG * jetlag
        + W_BUSY * busy
        + W_ILL * ill
    )
    active = started & ~churned & (u[11] < sigmoid(logit))
    day_out = Day(
        active=active, checkin=checkin, nudge=nudge, travel=travel, busy=busy, ill=ill,
        plateau=plateau, new_trip=new_trip, new_busy=new_busy, new_ill=new_ill,
        trip_start=st.trip_start, trip_end=st.trip_end, busy_start=st.busy_start,
        quit_day=st.quit_day, motivation=m, weight=st.weight, streak=st.streak, churned=churned,
    )  # fmt: skip

    # State update, only for rows whose program has started.
    level = tr.mu0 - tr.fatigue * tenure / 7.0  # program fatigue: the mean drifts down
    m_next = (
        m
        + MOTIVATION_REVERSION * (level - m)
        + MOTIVATION_NOISE * noise
        + tr.respond * (0.25 * nudge + 0.06 * checkin)
        + 0.03 * active  # small wins feed motivation
        - tr.frustration * plateau
        - 0.05 * ill
    )
    h_next = np.where(
        active, st.habit + tr.habit_gain * (1 - st.habit), st.habit * (1 - tr.habit_decay)
    )
    # Weight falls while motivated and off plateau, creeps back up when motivation is low.
    drive = sigmoid(2.0 * m)
    dw = np.where(plateau, 0.0, -tr.loss_rate / 7.0 * drive) + 0.04 * (1.0 - drive)
    # Deciding to quit: likelier with low motivation, long silence and weak habit. Half
    # just go silent tomorrow; half take 3-7 days, time in which some of them say so.
    hazard = sigmoid(-6.3 - 1.2 * m + 0.1 * np.minimum(st.streak, 30) - 2.0 * st.habit)
    decides = started & ~churned & (st.quit_day < 0) & (u[12] < hazard)
    lead = np.where(u[13] < 0.5, 1, 3 + ((u[13] - 0.5) * 10).astype(np.int64))

    st.motivation = np.where(started, m_next, m)
    st.habit = np.where(started, h_next, st.habit)
    st.weight = np.where(started, st.weight + dw, st.weight)
    st.streak = np.where(started & ~active, st.streak + 1, 0)
    st.since_nudge = np.where(nudge, 0, st.since_nudge + 1)
    st.ill_left = np.maximum(st.ill_left - 1, 0)
    st.plateau_left = np.maximum(st.plateau_left - 1, 0)
    st.quit_day = np.where(decides, day + lead, st.quit_day)
    st.churned = churned
    return day_out
