"""Turn active days into logged events: food logs, weigh-ins, content views, water logs.

Vectorised over all active (day, user) cells at once. Every user-initiated event of an
active day is placed inside that UTC day (and after program_start on the first day); an
active day without any drawn event gets one fallback food log, so "active" and "has a
user-initiated event that day" are the same thing, which the label relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.contract import CONTENT_VIEW, FOOD_LOG, MEALS, WEIGH_IN
from pipeline.simulator.catalog import CONTENT_TOPICS, N_CONTENT, Catalog, content_ids
from pipeline.simulator.dynamics import sigmoid
from pipeline.simulator.persona import N_FAV, N_FAV_JUNK, History, Persona

WATER_LOG = "water_log"  # a generic event type: shows the open vocabulary
US_PER_DAY = 86_400_000_000
WATER_ML = np.array([200.0, 250.0, 300.0, 330.0, 500.0, 750.0])
# Typical hour of each meal slot (mean, sd); snacks are spread over the day.
MEAL_HOURS = ((7.6, 0.8), (12.8, 0.7), (19.2, 0.9))


def to_us(seconds: np.ndarray) -> np.ndarray:
    """Seconds -> integer µs at millisecond resolution, as app clients log time. (Finer
    than seconds also keeps two real events from ever being exact duplicates.)"""
    return np.floor(np.asarray(seconds) * 1000.0).astype(np.int64) * 1000


@dataclass
class Block:
    """Events of one kind as column arrays; `user` indexes users, `ts` is epoch µs."""

    event_type: str
    user: np.ndarray
    ts: np.ndarray
    sender: np.ndarray | None = None
    text: np.ndarray | None = None
    meal: np.ndarray | None = None  # object array of meal names
    value: np.ndarray | None = None
    content: np.ndarray | None = None
    food_lens: np.ndarray | None = None  # foods per row
    food_values: np.ndarray | None = None  # flat food ids, rows back to back


@dataclass(frozen=True)
class Clock:
    """Places events: day index + seconds after midnight -> epoch µs."""

    day0_us: int
    start_day: np.ndarray  # (n_users,)
    start_off: np.ndarray  # (n_users,) seconds after midnight of the start day

    def user_ts(self, day: np.ndarray, user: np.ndarray, tod_s: np.ndarray) -> np.ndarray:
        """A user-initiated event: clipped into the day; on the program's first day,
        squeezed into [program_start, midnight) so nothing precedes program_start."""
        tod = np.clip(tod_s, 0.0, 86_399.999)
        lo = self.start_off[user]
        tod = np.where(day == self.start_day[user], lo + tod * (86_400.0 - lo) / 86_400.0, tod)
        return self.day0_us + day * US_PER_DAY + to_us(tod)

    def program_start_us(self) -> np.ndarray:
        return self.day0_us + self.start_day * US_PER_DAY + to_us(self.start_off)


def logged_events(
    hist: History, per: Persona, cat: Catalog, clock: Clock, msg_counts: np.ndarray,
    rng: np.random.Generator,
) -> list[Block]:  # fmt: skip
    """Events of every active cell. `msg_counts` (n_days, n_users) holds the user messages
    already planned, so only cells with nothing at all get the fallback log."""
    day, user = np.nonzero(hist.active)  # active cells, (C,) each
    c = len(day)
    motiv = sigmoid(hist.motivation[day, user])  # (C,) 0..1
    damp = np.where(hist.travel[day, user] | hist.ill[day, user] | hist.busy[day, user], 0.6, 1.0)

    # Counts per cell: disengaging users log fewer meals, weigh less, read less.
    p_meal = per.thorough[user] * (0.45 + 0.55 * motiv) * damp
    has_meal = rng.random((c, 3)) < p_meal[:, None]  # (C, 3) breakfast, lunch, dinner
    n_snack = np.minimum(rng.poisson(0.2 + 0.8 * per.junk[user] * (1.0 - motiv)), 3)
    n_weigh = (rng.random(c) < per.weigh[user] * (0.4 + 0.6 * motiv)).astype(np.int64)
    n_content = np.minimum(rng.poisson(per.content_rate[user] * (0.3 + motiv) * damp), 6)
    n_water = np.minimum(rng.poisson(per.water_rate[user] * (0.5 + 0.5 * motiv)), 8)
    total = has_meal.sum(1) + n_snack + n_weigh + n_content + n_water + msg_counts[day, user]
    empty = total == 0  # active but nothing drawn: log one snack or main meal
    fallback_slot = rng.choice(4, size=c, p=[0.2, 0.3, 0.2, 0.3])
    for s in range(3):
        has_meal[:, s] |= empty & (fallback_slot == s)
    n_snack = n_snack + (empty & (fallback_slot == 3))

    # One row per meal: main meals, then snacks.
    cells = [np.flatnonzero(has_meal[:, s]) for s in range(3)] + [np.repeat(np.arange(c), n_snack)]
    meal_cell = np.concatenate(cells)
    meal_slot = np.concatenate([np.full(len(x), s) for s, x in enumerate(cells)])
    blocks = [
        _food_block(day, user, motiv, meal_cell, meal_slot, per, cat, clock, rng),
        _weigh_block(hist, day, user, n_weigh, per, clock, rng),
    ]

    k = np.repeat(np.arange(c), n_content)  # content views
    fav = rng.random(len(k)) < 0.6
    topic = np.where(fav, per.topic[user[k]], rng.integers(0, len(CONTENT_TOPICS), len(k)))
    # Items of a topic are every 5th id; low ranks (featured items) are read most.
    item = np.floor((N_CONTENT // len(CONTENT_TOPICS)) * rng.random(len(k)) ** 2) * 5 + topic
    minutes = np.maximum(np.round(rng.lognormal(np.log(4.0), 0.7, len(k)), 1), 0.3)
    ts = clock.user_ts(day[k], user[k], rng.uniform(7 * 3600, 23.5 * 3600, len(k)))
    blocks.append(
        Block(
            CONTENT_VIEW, user[k], ts, value=minutes, content=content_ids()[item.astype(np.int64)]
        )
    )

    k = np.repeat(np.arange(c), n_water)  # water logs
    ts = clock.user_ts(day[k], user[k], rng.uniform(8 * 3600, 21.5 * 3600, len(k)))
    blocks.append(Block(WATER_LOG, user[k], ts, value=rng.choice(WATER_ML, len(k))))
    return blocks


def _food_block(
    day, user, motiv, meal_cell, meal_slot, per: Persona, cat: Catalog, clock: Clock, rng
) -> Block:
    """Meals of 1-6 foods from the user's slot-specific favourites; low motivation means
    shorter meals and more junk."""
    u, m = user[meal_cell], motiv[meal_cell]  # (n_meals,)
    main = meal_slot < 3
    p_more = per.meal_size[u] * (0.35 + 0.65 * m)
    size = 1 + np.where(main, rng.binomial(5, p_more), rng.binomial(1, 0.25, len(u)))
    meal_of = np.repeat(np.arange(len(u)), size)  # (n_items,)
    iu, islot, im = u[meal_of], meal_slot[meal_of], m[meal_of]
    p_junk = np.clip(np.where(islot == 3, 0.35, 0.05) + 0.4 * per.junk[iu] * (1.0 - im), 0.0, 0.9)
    r = rng.random(len(meal_of))
    zipf12 = 1.0 / np.arange(1, N_FAV + 1) ** 1.1
    zipf6 = 1.0 / np.arange(1, N_FAV_JUNK + 1) ** 1.1
    rows = per.fav[iu, islot, rng.choice(N_FAV, len(iu), p=zipf12 / zipf12.sum())]
    junk_rows = per.fav_junk[iu, islot, rng.choice(N_FAV_JUNK, len(iu), p=zipf6 / zipf6.sum())]
    rows = np.where(r < p_junk, junk_rows, rows)
    explore = (r >= p_junk) & (r < p_junk + 0.08)  # something new from the whole catalog
    for s in range(4):
        pick = np.flatnonzero(explore & (islot == s))
        pool = cat.pool(s, False)
        rows[pick] = rng.choice(
            pool, len(pick), p=cat.popularity[pool] / cat.popularity[pool].sum()
        )
    # The same food twice in one meal is one entry: keep first occurrences, in drawn order.
    _, first = np.unique(meal_of * len(cat.names) + rows, return_index=True)
    keep = np.sort(first)
    lens = np.bincount(meal_of[keep], minlength=len(u))

    hours = np.array([h for h, _ in MEAL_HOURS] + [0.0])[meal_slot]
    sds = np.array([s for _, s in MEAL_HOURS] + [1.0])[meal_slot]
    hour = np.where(main, rng.normal(hours, sds), rng.uniform(10.0, 22.5, len(u)))
    tod = (hour + per.shift[u]) * 3600
    ts = clock.user_ts(day[meal_cell], u, tod)
    meal = np.array(MEALS, dtype=object)[meal_slot]
    return Block(FOOD_LOG, u, ts, meal=meal, food_lens=lens, food_values=cat.food_ids[rows[keep]])


def _weigh_block(hist: History, day, user, n_weigh, per: Persona, clock: Clock, rng) -> Block:
    """Morning weigh-ins: true weight plus scale noise, 1 decimal."""
    k = np.flatnonzero(n_weigh)
    d, u = day[k], user[k]
    kg = np.round(hist.weight[d, u] + rng.normal(0.0, per.scale_noise[u]), 1)
    ts = clock.user_ts(d, u, (rng.normal(7.0, 0.6, len(k)) + per.shift[u]) * 3600)
    return Block(WEIGH_IN, u, ts, value=kg)
