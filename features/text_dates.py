"""The days a user's message mentions ("flying out on Friday", "back in 6 days", "next week"):
the start (UTC midnight) of the earliest and the latest mentioned day, in days after the message
was written, as the store's conversation/mention_first and mention_last (docs/design.md §4).
A length of time is a length, not a day: in "off to Rome on Friday for 5 days" the five days
count from Friday, so the span is Friday to Wednesday (`DURATION`), where reading "5 days" as a
date, as dateparser does, put the latest day before the trip had begun.

Why: a message that announces an absence says *when* it starts, and the mean-pooled sentence
vectors barely keep that: a linear probe on the MiniLM vectors of the simulator's trip
announcements recovers the days until the trip with R^2 0.09 (docs/results.md). dateparser
(`search_dates`, resolved against the day the message was written) reads the expressions
instead; gradient boosting with message scores turns them into columns relative to each
example's cutoff (pipeline/evaluation/message_scores.py).

Only the user's own messages are read (their plans, not the coach's). Parsing costs about 1 ms a
message on one core; with a cache folder, a (text, day) parsed by an earlier build is read back
instead (the message-vector cache's store, `VectorCache`, under its own name), so a nightly
rebuild parses only new messages.
"""

from __future__ import annotations

import calendar
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from features.text_vectors import Texts, VectorCache, as_text_array, distinct, text_digests

log = logging.getLogger(__name__)
_DAY = 86400
CACHE_VERSION = 6  # bump when what is cached changes meaning (2: lengths of time count from the start;
# 3: each clause searched on its own, "N days of" a length; 4: "Jan. 5" read as "Jan 5", "Friday, March 6" one
# clause; 5: "we", "may", "sat"... as words, a day of the month alone read here; 6: a weekday told in the
# past, "1/2 cup" an amount)
# What dateparser matched, when it is a count of days, nights, weeks or months and nothing else
# ("5 days", "for two weeks", "about a week"; not "in 5 days", "next week", "5 days ago"): a
# length of time, which dateparser resolves as that long after the message; it is added to the
# earliest day the message mentions instead (the day it was written if none). English only:
# matches in other languages of `features.date_languages` stay days.
DURATION = re.compile(
    r"(?:(?:for|about|around|roughly|approximately|nearly|almost|over|another)\s+)?"
    r"(?:\d+|a|an|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
    r"fifteen|twenty|thirty)\s+(?:days?|nights?|weeks?|months?)(?:\s+(?:of|in))?",  # "7 days of holiday", "5 days in Rome"
    re.IGNORECASE)
# A number that is a date or a time ("10 December", "13th", "5pm", "2027"), not a length ("5 days").
_DATE_NUMBER = (r"\d+(?:st|nd|rd|th|am|pm)?\b"
                r"(?!\s*(?:days?|nights?|weeks?|months?|years?|hours?|hrs?|minutes?|mins?)\b)")
_WEEKDAYS = r"mon(?:day)?|tue(?:s(?:day)?)?|wed(?:nesday)?|thu(?:r(?:s(?:day)?)?)?|fri(?:day)?|sat(?:urday)?|sun(?:day)?"
_MONTH_OR_WEEKDAY = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
                     rf"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?|{_WEEKDAYS})\b")
# dateparser's search joins expressions next to each other across a comma into one date ("in 2
# days, ten days" became a single day 12 days on, "next week, eight days" lost its "next"), so
# each clause is searched on its own. Not split: a full stop inside a number or an abbreviation
# ("5.5", "Fri.5"), nor a comma inside a number ("1,000") or before what goes on with the same
# date: a month, a weekday, a date's number or "at" ("Friday, March 6", "Thursday, 10 December",
# "March 6, 2027", "tomorrow, at 5pm", "Friday, the 13th"; "Saturday, 5 days" splits).
CLAUSE = re.compile(rf"[;!?]+|,(?!\d)(?!\s*(?:(?:the\s+)?{_DATE_NUMBER}|{_MONTH_OR_WEEKDAY}|at\b))|\.(?=\s|$)",
                    re.IGNORECASE)
# dateparser's search also ends a date at the full stop of a month's or weekday's short name:
# "Jan. 5" was January 4th (a "Jan" resolved on the message's day of the month), "Sept. 12th" two
# days; that full stop, before a date's number, is dropped before searching ("Jan 5"; "Sun. Then"
# and "in the sun. 3 days off" stay).
SHORT_NAME = re.compile(
    rf"\b(jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tue|tues|wed|thu|thurs?|fri|sat|sun)\.(?=\s+{_DATE_NUMBER})",
    re.IGNORECASE)


# English words that dateparser also reads as a month's or a weekday's name, so that everyday chat
# gains dates it never meant: "we" (Wednesday, in every "can we talk"), "I may skip the gym",
# "I sat down", "march on", "in the sun", "Jan said". Such a word alone (give or take filler) is a
# date only after a word that leads to one ("in may", "until may", "on sat", "this sun", "end of
# march") or with a number ("may 5th"); "we" never is.
NAME_WORDS = {"we", "may", "march", "mar", "sat", "sun", "wed", "jan"}
LEADS_TO_DATE = {"on", "in", "by", "until", "till", "til", "from", "since", "before", "after", "next", "this",
                 "coming", "early", "mid", "late", "end", "of", "back", "last", "every", "each", "around", "through", "thru"}
_FILLER = {"on", "in", "the", "at", "of", "a", "an", "to", "and"}
# Two small numbers with a slash or a dash are as often an amount as a day ("1/2 cup", "2/3 of the
# plate", "3-4 sets": dateparser read them as 2 January, 3 February, 4 March), so they are a date,
# as `NAME_WORDS` are, only after a word that leads to one ("back on 3/4", "from 12/3").
_FRACTION = re.compile(r"\d\s*[/-]\s*\d")
# A day of the month alone ("on the 12th", "the 3rd"): dateparser's own reading lands in the wrong
# month when the day is before the message's day of the month (written on March 18th, "the 12th" was
# December 18th and "the 3rd" March 18th a year on), so it is read here: the next such day, this
# month or the next.
_DAY_OF_MONTH = re.compile(r"(\d{1,2})(?:st|nd|rd|th)")


# dateparser puts a weekday on the coming one whatever the tense: "I skipped the gym on Monday" was
# next Monday, a plan where the user told of the past. A bare weekday ("on Monday", "saturday
# night") in a clause told in the past (a past form of a verb, "ago", "yesterday") and with no word
# of the future is the last such day instead. English only, as `DURATION`.
_WEEKDAY = re.compile(_WEEKDAYS)
_TIME_OF_DAY = {"night", "morning", "afternoon", "evening"}
_PAST = re.compile(r"\b(?:was|were|did|didn't|had|hadn't|went|ate|got|felt|made|took|spent|came|slept|ran|ago|yesterday)\b"
                   r"|\b(?:i|we|he|she|they)\s+(?:\w+\s+)?\w*[^e\W]ed\b")  # "I skipped", "we really walked"; not "I need"
_FUTURE = re.compile(r"\b(?:will|won't|wont|gonna|going|plan|planning|next|tomorrow|this|coming|upcoming|until|till|"
                     r"shall|hope|want|need|soon)\b|'ll\b")


def told_in_the_past(clause: str) -> bool:
    """Whether `clause` tells of the past and says nothing of the future (`_PAST`, `_FUTURE`)."""
    text = clause.lower().replace("\u2019", "'")
    return bool(_PAST.search(text)) and not _FUTURE.search(text)


def reading(match: str, days: float, clause: str, base: datetime) -> float | None:
    """Days after `base` (the start of the message's day) that dateparser's `match` in `clause`
    means, where it found `days`: None where the match is no date (`NAME_WORDS`), the last such
    weekday where the clause tells of the past (`told_in_the_past`), the next such day of the month
    for a day of the month alone (`_DAY_OF_MONTH`), else `days`."""
    words = re.findall(r"[a-z0-9]+", match.lower())
    led = bool(words) and words[0] in LEADS_TO_DATE
    while words and (words[0] in LEADS_TO_DATE or words[0] == "the"):
        words.pop(0)
    while len(words) > 1 and words[-1] in _FILLER:
        words.pop()
    name = len(words) == 1 and words[0] in NAME_WORDS
    if name or (len(words) == 2 and all(w.isdigit() and len(w) <= 2 for w in words) and _FRACTION.search(match)):
        before = re.findall(r"[a-z]+", clause[: max(clause.find(match), 0)].lower())[-1:]
        if words[0] == "we" or not (led or (before and before[0] in LEADS_TO_DATE)):
            return None
    if (0 < days and 1 <= len(words) <= 2 and _WEEKDAY.fullmatch(words[0]) and set(words[1:]) <= _TIME_OF_DAY
            and told_in_the_past(clause)):
        return days - 7  # the last such day (today, for today's weekday)
    if len(words) == 1 and (day := _DAY_OF_MONTH.fullmatch(words[0])):
        n, year, month = int(day.group(1)), base.year, base.month
        for _ in range(3):  # this month, or the next that has the day ("the 30th" in February: March)
            if n <= calendar.monthrange(year, month)[1] and (n >= base.day or (year, month) != (base.year, base.month)):
                return float((datetime(year, month, n) - base).days)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return None  # no month has it ("the 45th")
    return days


def mentioned_days(texts: Texts, ts: np.ndarray, languages: list[str], read: np.ndarray | None = None,
                   cache_root: str | Path | None = None, key: str = "", progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per message, the start of the earliest and of the latest day it mentions, in days after
    the message's time (UTC seconds `ts`): float32 (N,) each; NaN for a message that mentions
    none, is None, is not in the bool mask `read` (default: every one), or for every message when
    `languages` is empty. `cache_root`: reuse and extend the cache there (digests keyed by `key`)."""
    first = np.full(len(texts), np.nan, np.float32)
    last = np.full(len(texts), np.nan, np.float32)
    if not languages:
        return first, last
    arr = as_text_array(texts)
    has_text = pc.fill_null(pc.greater(pc.binary_length(arr), 0), False).to_numpy(zero_copy_only=False)
    todo = np.flatnonzero(has_text & (np.asarray(read, dtype=bool) if read is not None else True))
    if not len(todo):
        return first, last
    day = np.asarray(ts, dtype=np.int64)[todo] // _DAY
    text_once, code = distinct(arr.take(pa.array(todo)))
    # one parse per distinct (day, text): a weekday resolves per day
    _, message_of, pair = np.unique(day * len(text_once) + code, return_index=True, return_inverse=True)
    digests = text_digests([f"{d}\x00{text_once[c]}" for d, c in zip(day[message_of].tolist(), code[message_of].tolist())], key)
    unique, first_of, inverse = np.unique(digests, return_index=True, return_inverse=True)
    inverse = inverse[pair]

    def parse(positions: np.ndarray) -> np.ndarray:  # of distinct (day, text) keys
        j = message_of[first_of[positions]]
        return _parse([text_once[c] for c in code[j].tolist()], day[j], languages, progress)

    if cache_root:
        cache = VectorCache(cache_root, f"date-mentions-v{CACHE_VERSION}-{'-'.join(languages)}")
        from_day = cache.fetch(unique, 2, parse)[0].astype(np.float32)
    else:
        from_day = parse(np.arange(len(unique)))
    from_day = from_day[inverse]  # (len(todo), 2): days after the start of the message's day
    since_midnight = (np.asarray(ts, dtype=np.int64)[todo] - day * _DAY) / _DAY
    first[todo], last[todo] = from_day[:, 0] - since_midnight, from_day[:, 1] - since_midnight
    return first, last


def _parse(texts: list[str], day: np.ndarray, languages: list[str], progress: bool) -> np.ndarray:
    """(N, 2) float32: the earliest and latest mentioned day of each text, in days after the start
    of its `day` (days since the epoch, UTC), NaN without one."""
    out = np.full((len(texts), 2), np.nan, np.float32)
    if not len(texts):
        return out
    from dateparser.search import search_dates  # imported here: a second or so, paid only when used

    settings, languages = {"PREFER_DATES_FROM": "future", "RETURN_AS_TIMEZONE_AWARE": False}, list(languages)
    for j, text in enumerate(tqdm(texts, desc="date mentions", unit="msg", disable=not progress, leave=False)):
        base = datetime.fromtimestamp(int(day[j]) * _DAY, timezone.utc).replace(tzinfo=None)
        on_day = {**settings, "RELATIVE_BASE": base}
        found = []
        for clause in CLAUSE.split(SHORT_NAME.sub(r"\1", text)):
            if not clause.strip():
                continue
            try:
                matches = search_dates(clause, languages=languages, settings=on_day) or []
            except (ValueError, OverflowError) as e:  # a date past datetime's range ("in 99999 years")
                log.debug("date mentions: a clause not parsed (%s)", e)
                continue
            for match, when in matches:
                d = reading(match, (when.replace(tzinfo=None) - base).total_seconds() / _DAY, clause, base)
                if d is not None:
                    found.append((match, d))
        if found:
            out[j] = span(found)
    return out


def span(found: list[tuple[str, float]]) -> tuple[float, float]:
    """(first, last) mentioned day of one message from dateparser's (matched text, days after the
    start of the message's day): lengths of time (`DURATION`) count from the earliest other day
    mentioned, or from the message's day. The day a date falls on: "tomorrow" keeps the base's
    time (midnight), "at 5pm" adds hours."""
    lengths, days = [], []
    for match, d in found:
        if DURATION.fullmatch(match.strip()):
            lengths.append(abs(d))  # a length, whichever way it resolved
        else:
            days.append(d)
    first = min(days) if days else 0.0
    last = max(days + [first + d for d in lengths])
    return np.floor(first), np.floor(last)
