"""The chat between users and coaches: who writes what, when.

Planning is vectorised over users inside a loop over days (announcements and mentions
need "said it already?" memory); only the final text composition loops over messages.

What the text carries beyond counts, by construction:
- trips are announced days before they start, and a trip all but stops activity; work
  crunches and decisions to quit are often announced too;
- check-ins go unanswered more often as motivation falls, and replies sound like it;
- frustration (weight plateaus) and fading motivation show up as words before they show
  up as missing days.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.contract import MEALS, MESSAGE, SENDER_COACH, SENDER_USER
from pipeline.simulator.catalog import CITIES, Catalog
from pipeline.simulator.dynamics import Traits, sigmoid
from pipeline.simulator.events import US_PER_DAY, Block, Clock, to_us
from pipeline.simulator.persona import N_FAV, N_FAV_JUNK, History, Persona
from pipeline.simulator.text import MessageContext, coach_message, user_message

# Spontaneous message kinds; their weights depend on the hidden state (see `_spontaneous`).
SPONTANEOUS = ("plateau", "progress", "low", "high", "food_question", "neutral", "short")
HOUR = 3600.0


@dataclass
class Messages:
    block: Block  # every message, user and coach
    user_counts: np.ndarray  # (n_days, n_users): user messages per day
    announced: pd.DataFrame  # kind (travel/busy/quit), u, start (day), announced (day)


class _Planned:
    """Accumulates planned messages as arrays of (day, user, seconds after midnight, kind)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, day: int, user: np.ndarray, tod: np.ndarray, kind) -> None:
        kind = np.broadcast_to(np.asarray(kind, dtype=object), user.shape)
        self.parts.append((np.full(len(user), day), user, np.asarray(tod, dtype=float), kind))

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(cols) for cols in zip(*self.parts))


def plan_and_write(
    hist: History, tr: Traits, per: Persona, cat: Catalog, clock: Clock, weekday0: int,
    rng: np.random.Generator, rnd: random.Random,
) -> Messages:  # fmt: skip
    n_days, n = hist.active.shape
    user_rows, coach_rows = _Planned(), _Planned()
    announced_for = np.full(n, -1)  # trip_start of the trip already announced
    back_for = np.full(n, -1)
    busy_said = np.zeros(n, dtype=bool)
    ill_said = np.zeros(n, dtype=bool)
    quit_said = np.full(n, -1)  # quit_day of the decision already announced
    announced: list[pd.DataFrame] = []
    for d in range(n_days):
        act, m = hist.active[d], hist.motivation[d]
        u = np.flatnonzero(tr.start_day == d)
        coach_rows.add(d, u, per.start_off[u] + rng.uniform(60, 1800, len(u)), "welcome")

        # Scheduled check-in in the morning; the user answers only if active and willing.
        u = np.flatnonzero(hist.checkin[d])
        tod = rng.uniform(8 * HOUR, 10.5 * HOUR, len(u))
        coach_rows.add(d, u, tod, "checkin")
        p = sigmoid(-0.4 + 1.2 * m[u] + 1.2 * (tr.respond[u] - 0.75))
        r = act[u] & (rng.random(len(u)) < p)
        user_rows.add(
            d, u[r], tod[r] + rng.lognormal(np.log(1.5 * HOUR), 0.9, r.sum()), "checkin_reply"
        )

        u = np.flatnonzero(hist.nudge[d])  # re-engagement nudge after silence
        tod = rng.uniform(9 * HOUR, 11 * HOUR, len(u))
        coach_rows.add(d, u, tod, "nudge")
        r = act[u] & (rng.random(len(u)) < 0.35 + 0.3 * tr.respond[u])
        user_rows.add(d, u[r], tod[r] + rng.lognormal(np.log(HOUR), 1.0, r.sum()), "nudge_reply")

        # Life events, each mentioned at most once.
        start = hist.trip_start[d]
        say = act & (start > d) & (announced_for != start) & (rng.random(n) < per.announce)
        announced_for = np.where(say, start, announced_for)
        back = act & (start >= 0) & (hist.trip_end[d] <= d) & (d - hist.trip_end[d] < 3)
        back &= (back_for != start) & (rng.random(n) < 0.45)
        back_for = np.where(back, start, back_for)
        busy_said &= ~hist.new_busy[d]  # a crunch is mentioned once, ahead or during
        ahead = hist.busy_start[d] > d
        busy = act & (ahead | hist.busy[d]) & ~busy_said & (rng.random(n) < per.mention)
        busy_said |= busy
        ill_said &= ~hist.new_ill[d]
        ill = act & hist.ill[d] & ~ill_said & (rng.random(n) < per.mention)
        ill_said |= ill
        quit_day = hist.quit_day[d]  # between deciding to quit and going silent
        quit = act & (quit_day > d) & (quit_said != quit_day) & (rng.random(n) < per.mention)
        quit_said = np.where(quit, quit_day, quit_said)
        for mask, kind in (
            (say, "announce_trip"), (back, "back"), (busy & ahead, "busy_ahead"),
            (busy & ~ahead, "busy"), (ill, "sick"), (quit, "quit_notice"),
        ):  # fmt: skip
            u = np.flatnonzero(mask)
            user_rows.add(d, u, (rng.uniform(7.5, 22.5, len(u)) + per.shift[u]) * HOUR, kind)
        for mask, kind, when in (
            (say, "travel", start),
            (busy, "busy", hist.busy_start[d]),
            (quit, "quit", quit_day),
        ):
            u = np.flatnonzero(mask)
            announced.append(pd.DataFrame({"kind": kind, "u": u, "start": when[u], "announced": d}))

        u = np.repeat(np.flatnonzero(act), rng.poisson(per.chattiness[act]))
        kinds = _spontaneous(hist, tr, d, u, rng)
        user_rows.add(d, u, (rng.uniform(7.0, 23.0, len(u)) + per.shift[u]) * HOUR, kinds)

    # Timestamps: user messages stay inside their day; coach replies follow user messages.
    ud, uu, utod, ukind = user_rows.arrays()
    uts = clock.user_ts(ud, uu, utod)
    cd, cu, ctod, ckind = coach_rows.arrays()
    cts = clock.day0_us + cd * US_PER_DAY + to_us(ctod)
    short = ukind == "short"
    reply = rng.random(len(uu)) < np.where(short, 0.3, 0.85)
    delay = np.clip(rng.lognormal(np.log(0.75 * HOUR), 1.0, len(uu)), 20.0, 10 * HOUR)
    rkind = np.array(["reply:" + k for k in ukind[reply]], dtype=object)
    day = np.concatenate([ud, cd, ud[reply]])
    user = np.concatenate([uu, cu, uu[reply]])
    ts = np.concatenate([uts, cts, uts[reply] + to_us(delay[reply])])
    kind = np.concatenate([ukind, ckind, rkind])
    coach = np.arange(len(day)) >= len(ud)
    keep = ts < clock.day0_us + n_days * US_PER_DAY  # replies past the end are not observed
    day, user, ts, kind, coach = day[keep], user[keep], ts[keep], kind[keep], coach[keep]

    hour = (ts - clock.day0_us) % US_PER_DAY / 3.6e9
    text = _write(hist, tr, per, cat, day, user, hour, kind, coach, weekday0, rng, rnd)
    sender = np.where(coach, SENDER_COACH, SENDER_USER).astype(object)
    counts = np.zeros((n_days, n), dtype=np.int64)
    np.add.at(counts, (ud, uu), 1)
    return Messages(
        block=Block(MESSAGE, user, ts, sender=sender, text=text),
        user_counts=counts,
        announced=pd.concat(announced, ignore_index=True),
    )


def _spontaneous(hist: History, tr: Traits, d: int, u: np.ndarray, rng) -> np.ndarray:
    """What an unprompted message is about, drawn from weights set by the hidden state."""
    m = hist.motivation[d, u]
    lost = tr.weight0[u] - hist.weight[d, u]
    w = np.stack(
        [
            3.0 * hist.plateau[d, u],
            2.0 * ((lost >= 1.5) & (m > 0.0)),
            3.0 * sigmoid(-2.5 * (m + 0.5)),
            2.0 * sigmoid(2.5 * (m - 0.6)),
            np.full(len(u), 0.8),
            np.full(len(u), 0.8),
            np.full(len(u), 0.8),
        ],
        axis=1,
    )  # (n_msgs, kinds)
    cum = np.cumsum(w, axis=1)
    pick = (rng.random(len(u)) * cum[:, -1])[:, None] < cum
    return np.array(SPONTANEOUS, dtype=object)[pick.argmax(axis=1)]


def _city(user: int, trip_start: int) -> str:
    """The destination of a trip: the same for its announcement, the coach's reply and
    the "back from" message, without storing it."""
    return CITIES[(user * 2_654_435_761 + trip_start * 40_503) % 4_294_967_291 % len(CITIES)]


def _recent(flag: np.ndarray, d: np.ndarray, user: np.ndarray, days: int = 4) -> np.ndarray:
    """Whether `flag` was set on any of the last `days` days up to and including d."""
    return np.stack([flag[np.maximum(d - k, 0), user] for k in range(days)], 1).any(1)


def _write(hist, tr, per, cat, day, user, hour, kind, coach, weekday0, rng, rnd) -> np.ndarray:
    """Compose each message's text from its context (the only per-message Python loop)."""
    d = np.minimum(day, hist.active.shape[0] - 1)
    start, end = hist.trip_start[d, user], hist.trip_end[d, user]
    # What "{when}" refers to: the trip, the coming work crunch, or the last day in the app.
    ahead = np.select(
        [
            np.isin(kind, ("busy_ahead", "reply:busy_ahead")),
            np.isin(kind, ("quit_notice", "reply:quit_notice")),
        ],
        [hist.busy_start[d, user], hist.quit_day[d, user]],
        start,
    )
    slot = rng.integers(0, 4, len(user))
    food = cat.names[per.fav[user, slot, rng.integers(0, N_FAV, len(user))]]
    junk = cat.names[per.fav_junk[user, slot, rng.integers(0, N_FAV_JUNK, len(user))]]
    lost = np.round(2 * (tr.weight0[user] - hist.weight[d, user])) / 2
    week = np.stack([hist.active[np.maximum(d - k, 0), user] for k in range(1, 8)], 1).sum(1)
    reason = np.select(
        [_recent(hist.travel, d, user), _recent(hist.ill, d, user), _recent(hist.busy, d, user)],
        ["travel", "ill", "busy"],
        "",
    )  # why a user was quiet, for replies to nudges
    plateau_days = np.zeros(len(user), dtype=np.int64)
    on = hist.plateau[d, user].copy()
    for k in range(0, 42):  # length of the current plateau, in days
        on &= hist.plateau[np.maximum(d - k, 0), user]
        plateau_days += on
    cols = zip(
        user.tolist(), kind.tolist(), coach.tolist(), d.tolist(), start.tolist(), end.tolist(), ahead.tolist(),
        hist.motivation[d, user].tolist(), food.tolist(), junk.tolist(), slot.tolist(),
        lost.tolist(), hist.weight[d, user].tolist(), hist.streak[d, user].tolist(),
        week.tolist(), reason.tolist(), plateau_days.tolist(), hour.tolist(),
    )  # fmt: skip
    out = []
    for u, k, is_coach, dd, s, e, ah, m, f, j, sl, kg, w, streak, ad, why, pdays, hr in cols:
        healthy_first = rnd.random() < 0.5 or k == "high"
        ctx = MessageContext(
            name=per.name[u], coach=per.coach[u], motivation=m, city=_city(u, s),
            ahead_weekday=(weekday0 + ah) % 7, ahead_days=ah - dd, trip_days=e - s, kg_lost=kg,
            weight=w + rnd.gauss(0.0, 0.3), streak=streak, plateau_weeks=max(1, round(pdays / 7)),
            foods=(f, j) if healthy_first else (j, f), healthy=f, hour=hr, meal=MEALS[sl],
            reason=why, active_days=ad,
        )  # fmt: skip
        out.append(coach_message(k, ctx, rnd) if is_coach else user_message(k, ctx, rnd))
    return np.array(out, dtype=object)
