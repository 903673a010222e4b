"""How each simulated user behaves *given* that a day is active: what and how much they log,
when, how they write. These traits shape the events but never decide activity (that is
`dynamics.day_step`), so the Monte-Carlo ground truth does not need them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.simulator.catalog import FIRST_NAMES, Catalog
from pipeline.simulator.dynamics import Day
from pipeline.simulator.phrases import COACH_NAMES

N_FAV, N_FAV_JUNK = 12, 6  # favourite foods per meal slot: healthy and junk


@dataclass
class Persona:
    """Per-user event-level traits (arrays of length n_users; `fav*` are (n, 4, k))."""

    name: np.ndarray  # first name, used by the coach
    coach: np.ndarray  # the assigned coach's first name
    start_off: np.ndarray  # seconds after midnight of the program start day
    shift: np.ndarray  # hours: early birds log breakfast at 6, night owls at 9
    chattiness: np.ndarray  # spontaneous messages per active day
    announce: np.ndarray  # chance per active day to announce a booked trip
    mention: np.ndarray  # chance per active day to mention being busy, ill or quitting
    thorough: np.ndarray  # chance to log a main meal on an active day
    meal_size: np.ndarray  # how completely a meal is itemised
    junk: np.ndarray  # pull towards junk food, stronger when motivation is low
    weigh: np.ndarray  # chance to weigh in on an active day
    scale_noise: np.ndarray  # kg, day-to-day weigh-in noise (water, clothes, scale)
    water_rate: np.ndarray  # water logs per active day (0 for most users)
    content_rate: np.ndarray  # content views per active day
    topic: np.ndarray  # favourite content topic, 0..4
    fav: np.ndarray  # (n, 4, N_FAV) catalog rows per meal slot
    fav_junk: np.ndarray  # (n, 4, N_FAV_JUNK)


def draw_persona(n: int, catalog: Catalog, rng: np.random.Generator) -> Persona:
    """Sample event-level traits. Favourites are drawn by global popularity, so users share
    staples but each has a concentrated, slot-specific menu."""
    fav = np.empty((n, 4, N_FAV), dtype=np.int64)
    fav_junk = np.empty((n, 4, N_FAV_JUNK), dtype=np.int64)
    for slot in range(4):
        for junk, out, k in ((False, fav, N_FAV), (True, fav_junk, N_FAV_JUNK)):
            pool = catalog.pool(slot, junk)
            p = catalog.popularity[pool] / catalog.popularity[pool].sum()
            out[:, slot, :] = rng.choice(pool, size=(n, k), p=p)
    return Persona(
        name=rng.choice(np.array(FIRST_NAMES, dtype=object), n),
        coach=rng.choice(np.array(COACH_NAMES, dtype=object), n),
        start_off=rng.uniform(6 * 3600, 21 * 3600, n),
        shift=np.clip(rng.normal(0.0, 0.8, n), -2.0, 2.5),
        chattiness=np.clip(rng.lognormal(np.log(0.3), 0.7, n), 0.03, 2.0),
        announce=rng.beta(6.0, 2.0, n),
        mention=rng.beta(3.0, 3.0, n),
        thorough=rng.uniform(0.35, 0.95, n),
        meal_size=rng.uniform(0.15, 0.7, n),
        junk=rng.uniform(0.2, 1.4, n),
        weigh=rng.beta(1.3, 2.2, n),
        scale_noise=rng.uniform(0.3, 0.6, n),
        water_rate=np.where(rng.random(n) < 0.35, rng.uniform(1.0, 4.0, n), 0.0),
        content_rate=rng.gamma(1.5, 0.4, n),
        topic=rng.integers(0, 5, n),
        fav=fav,
        fav_junk=fav_junk,
    )


@dataclass
class History:
    """The simulated days, (n_days, n_users) per field of `dynamics.Day`."""

    active: np.ndarray
    checkin: np.ndarray
    nudge: np.ndarray
    travel: np.ndarray
    busy: np.ndarray
    ill: np.ndarray
    plateau: np.ndarray
    new_trip: np.ndarray
    new_busy: np.ndarray
    new_ill: np.ndarray
    trip_start: np.ndarray
    trip_end: np.ndarray
    busy_start: np.ndarray
    quit_day: np.ndarray
    motivation: np.ndarray
    weight: np.ndarray
    streak: np.ndarray
    churned: np.ndarray

    @classmethod
    def empty(cls, n_days: int, n: int) -> History:
        kinds = {
            f: bool
            for f in (
                "active",
                "checkin",
                "nudge",
                "travel",
                "busy",
                "ill",
                "plateau",
                "new_trip",
                "new_busy",
                "new_ill",
                "churned",
            )
        }
        kinds |= {"trip_start": np.int64, "trip_end": np.int64, "busy_start": np.int64,
                  "quit_day": np.int64, "streak": np.int64, "motivation": float, "weight": float}  # fmt: skip
        return cls(**{f: np.zeros((n_days, n), dtype=t) for f, t in kinds.items()})

    def record(self, day: int, out: Day) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name)[day] = getattr(out, name)
