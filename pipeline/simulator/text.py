"""Natural-language chat messages between users and their coach.

A message is opener + body + closer, each drawn from per-kind template lists whose slots
(cities, weekdays, numbers, foods, names, emojis) are filled from the hidden state the
caller passes in, then roughened (case, punctuation, emojis, typos). Hundreds of
templates times the fillers give tens of thousands of distinct strings, so a text model
has to generalise what a message *means* (a trip ahead, frustration, fading motivation)
rather than memorise strings.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.simulator.catalog import WEEKDAYS
from pipeline.simulator.phrases import (
    BAD_DETAILS,
    CLOSERS,
    COACH_BODIES,
    GOOD_DETAILS,
    ILLNESSES,
    MORNING_OPENERS,
    NUMBER_WORDS,
    OPENERS,
    PERIODS,
    QUIET_REASONS,
    TONE_EMOJI,
    TRIP_KINDS,
    USER_BODIES,
)


@dataclass
class MessageContext:
    """What the writer of one message knows. Built per message by the caller."""

    name: str  # the user's first name
    coach: str  # the coach's first name
    motivation: float = 0.0
    city: str = ""
    ahead_weekday: int = 0  # weekday of what lies ahead: a trip, a work crunch, quitting
    ahead_days: int = 0  # days from the message to it
    trip_days: int = 0
    kg_lost: float = 0.0
    weight: float = 0.0
    streak: int = 0  # silent days before the message day
    plateau_weeks: int = 1
    foods: tuple[str, str] = ("salad", "fries")  # two of the user's foods, any order
    healthy: str = "salad"  # one of the user's healthy favourites
    hour: float = 12.0  # hour of the day (UTC, the one clock of the simulated app)
    meal: str = "lunch"
    reason: str = ""  # why the user was quiet: travel / busy / ill / ""
    active_days: int = 0  # active days in the last week


def _when(rnd: random.Random, ctx: MessageContext) -> str:
    """How a user names a coming day (a trip's first day...) relative to the message day."""
    day = WEEKDAYS[ctx.ahead_weekday]
    if ctx.ahead_days <= 0:
        return rnd.choice(("today", "from today", "starting now"))
    if ctx.ahead_days == 1:
        return rnd.choice(("tomorrow", "tomorrow morning", f"tomorrow ({day})"))
    options = [f"on {day}", f"this {day}", f"in {ctx.ahead_days} days"]
    if ctx.ahead_days >= 6:
        options += [f"next {day}", "next week"]
    return rnd.choice(options)


def _slots(rnd: random.Random, ctx: MessageContext) -> dict[str, Callable[[], str]]:
    """How to fill each template slot; `_Lazy` calls only the ones a template uses."""
    n = max(ctx.trip_days, 1)
    return {
        "name": lambda: ctx.name,
        "coach": lambda: ctx.coach,
        "city": lambda: ctx.city,
        "when": lambda: _when(rnd, ctx),
        "n": lambda: str(n),
        "nw": lambda: NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n),
        "tripkind": lambda: rnd.choice(TRIP_KINDS),
        "period": lambda: rnd.choice(PERIODS),
        "illness": lambda: rnd.choice(ILLNESSES),
        "weekday": lambda: rnd.choice(WEEKDAYS),
        "pw": lambda: str(max(ctx.plateau_weeks, 1)),
        "w": lambda: f"{ctx.weight:.1f}",
        "kg": lambda: f"{max(ctx.kg_lost, 0.5):.1f}".replace(".0", ""),
        "food": lambda: ctx.foods[0],
        "food2": lambda: ctx.foods[-1],
        "meal": lambda: ctx.meal,
        "healthy": lambda: ctx.healthy,
        "detail": lambda: rnd.choice(GOOD_DETAILS),
        "lowbit": lambda: rnd.choice(BAD_DETAILS),
        "ad": lambda: str(max(ctx.active_days, 1)),
        "streak": lambda: str(max(ctx.streak, 2)),
        "reason": lambda: _reason(rnd, ctx.reason),
    }


def _reason(rnd: random.Random, reason: str) -> str:
    return rnd.choice(QUIET_REASONS.get(reason, QUIET_REASONS[""]))


class _Lazy(dict):
    """format_map mapping that builds only the slots a template uses."""

    def __init__(self, makers: dict[str, Callable[[], str]]):
        super().__init__()
        self.makers = makers

    def __missing__(self, key: str) -> str:
        value = self[key] = self.makers[key]()
        return value


def _typos(rnd: random.Random, s: str) -> str:
    """One or two character swaps, drops or doubles inside words (phone typing)."""
    chars = list(s)
    for _ in range(rnd.choice((1, 1, 2))):
        i = rnd.randrange(len(chars) - 1) if len(chars) > 2 else 0
        if not (chars[i].isalpha() and chars[i + 1 if i + 1 < len(chars) else i].isalpha()):
            continue
        op = rnd.random()
        if op < 0.4:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op < 0.75:
            del chars[i]
        else:
            chars.insert(i, chars[i])
    return "".join(chars)


def user_message(kind: str, ctx: MessageContext, rnd: random.Random) -> str:
    """A user's message of `kind`; check-in replies take their tone from motivation."""
    tone = "+" if ctx.motivation > 0.6 else "-" if ctx.motivation < -0.4 else "0"
    if kind == "checkin_reply":
        kind = f"checkin_reply{tone}"
    slots = _Lazy(_slots(rnd, ctx))
    body = rnd.choice(USER_BODIES[kind]).format_map(slots)
    if kind == "short":
        return body
    opener = rnd.choice(OPENERS + MORNING_OPENERS if ctx.hour < 11 else OPENERS).format_map(slots)
    text = f"{opener} {body}" if opener else body
    closer = rnd.choice(CLOSERS)
    text += closer if not (text[-1:] in "?!." and closer[:1] in "!.") else ""
    if rnd.random() < 0.25:
        text += rnd.choice(TONE_EMOJI[tone])
    if rnd.random() < 0.5:  # phone keyboards: people rarely capitalise
        text = text.lower()
    elif text[:1].islower():
        text = text[0].upper() + text[1:]
    if rnd.random() < 0.12:
        text = _typos(rnd, text)
    return text


def coach_message(kind: str, ctx: MessageContext, rnd: random.Random) -> str:
    """A coach's message; coaches write cleanly and address the user by first name."""
    return rnd.choice(COACH_BODIES[kind]).format_map(_Lazy(_slots(rnd, ctx)))
