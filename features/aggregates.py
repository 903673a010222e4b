"""Aggregate features for the baselines (docs/design.md §7): one row of hand-made numbers per
example, computed from the store's CSR streams with only the items an example may see.

Every feature reads the example's [start, end) item range of a stream (end = first item
at/after as_of), so nothing at or after as_of can leak in. Windows of the last w days are
cut with `searchsorted` on (user, ts) keys, and counts, sums and "last item of a kind" come
from cumulative sums over the flat arrays: the cost is a few passes over the items plus a
few binary searches per example, with no Python loop per example or per item.

Own activity follows the label (features/labels.py): every event except coach messages,
restricted to `labels.activity_types` when the config names them.
"""

from __future__ import annotations

import re

import numpy as np

from features import contract as C
from features.labels import DAY, first_at_or_after, row_keys, window_items
from features.store import LAYOUT, StoreMeta, open_store, read_meta
from features.vocab import SENDER_IDS

WINDOWS_DAYS = (1, 7, 28)
RECENCY_CAP_DAYS = 365.0  # "days since" when there is no such item before as_of
ANSWER_WITHIN_S = 48 * 3600  # a coach message counts as answered by a user reply within 48 h
SENDER_USER, SENDER_COACH = SENDER_IDS[C.SENDER_USER], SENDER_IDS[C.SENDER_COACH]  # stored ids
_MAX_PAIRS = 1 << 24  # (example, item) pairs expanded at once when counting distinct days

# The datasets the features read: everything but message vectors, which can be gigabytes.
INPUTS = {
    "examples": tuple(LAYOUT["examples"]),
    "users": ("program_start", "attr_codes", "attr_values"),
    "events": ("user_offsets", "ts", "type_id", "value", "value_delta", "has_value"),
    "conversation": ("user_offsets", "ts", "sender"),
    "food": ("user_offsets", "ts", "meal_offsets"),
}


def load_aggregate_inputs(path) -> tuple[dict[str, dict[str, np.ndarray]], StoreMeta]:
    """Read only the datasets `aggregate_features` needs (one read per dataset)."""
    with open_store(path) as f:
        arrays = {g: {k: f[g][k][()] for k in keys} for g, keys in INPUTS.items()}
    return arrays, read_meta(path)


def aggregates_of(files, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """`aggregate_features` of every example of one or more feature files (shards), in file
    order. Columns are `names` (default: the first file's), matched by name in each file
    and 0 where a file lacks one, so a store whose event vocabulary has grown since a model
    was trained still gives that model the columns it was trained on."""
    parts = [aggregate_features(*load_aggregate_inputs(f)) for f in files]
    names = list(names or parts[0][1])
    cols = []
    for X, have in parts:
        pos = {n: j for j, n in enumerate(have)}
        take = np.array([pos.get(n, -1) for n in names], dtype=np.int64)  # -1: not in this file
        cols.append(np.where(take >= 0, X[:, np.maximum(take, 0)], 0.0).astype(np.float32))
    return np.concatenate(cols), names


def _token(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", name.lower())


class _Stream:
    """One stream's items plus, per example, the [start, end) range it may see."""

    def __init__(self, group: dict, ex: dict, name: str, rows: np.ndarray):
        self.ts = group["ts"].astype(np.int64)
        offsets = group["user_offsets"]
        user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # user row of each item
        self.keys = row_keys(user, self.ts)
        self.user = user
        self.ex_user = ex["user_row"][rows].astype(np.int64)
        self.as_of = ex["as_of"][rows].astype(np.int64)
        self.start = ex[f"{name}_start"][rows].astype(np.int64)
        self.end = ex[f"{name}_end"][rows].astype(np.int64)

    def since(self, seconds_before: int | np.ndarray) -> np.ndarray:
        """Index of the first visible item at/after as_of - seconds_before, per example."""
        lo = first_at_or_after(self.keys, self.ex_user, self.as_of - seconds_before)
        return np.clip(lo, self.start, self.end)

    def days(self, idx: np.ndarray) -> np.ndarray:
        """Days from item `idx` to as_of; the cap where idx < 0 (no such item)."""
        if not len(self.ts):
            return np.full(len(self.as_of), RECENCY_CAP_DAYS)
        d = (self.as_of - self.ts[np.maximum(idx, 0)]) / DAY
        return np.where(idx >= 0, np.minimum(d, RECENCY_CAP_DAYS), RECENCY_CAP_DAYS)


class _Kind:
    """The items of a stream selected by `mask`, for range queries by item index."""

    def __init__(self, mask: np.ndarray):
        self.cum = np.r_[0, np.cumsum(mask, dtype=np.int64)]  # (n_items + 1,)
        self.items = np.flatnonzero(mask)

    def count(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.cum[hi] - self.cum[lo]

    def last(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Index of the last selected item in [lo, hi), -1 where there is none."""
        k = self.cum[hi] - 1
        return np.where(k >= self.cum[lo], self.items[np.maximum(k, 0)] if len(self.items) else -1, -1)

    def first(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        k = self.cum[lo]
        return np.where(k < self.cum[hi], self.items[np.minimum(k, len(self.items) - 1)] if len(self.items) else -1, -1)


def _window_sum(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    cum = np.r_[0.0, np.cumsum(values, dtype=np.float64)]
    return cum[hi] - cum[lo]


def _distinct_days(parts: list[tuple[_Stream, _Kind, np.ndarray]], days: int) -> np.ndarray:
    """Distinct days d in 0..days-1 (d = whole days before as_of, 0 = the last 24 h) with at
    least one selected item, per example. parts: (stream, kind, lo): items in [lo, end).

    Expands (example, item) pairs like `labels.derived_labels`, in chunks of examples so
    memory stays bounded on millions of events."""
    n = len(parts[0][0].as_of)
    spans = [(s, k, k.cum[lo], k.cum[s.end]) for s, k, lo in parts]  # positions in k.items
    per_ex = sum((b - a for _, _, a, b in spans), np.zeros(n, dtype=np.int64))
    out = np.zeros(n, dtype=np.int64)
    if n == 0 or per_ex.sum() == 0:
        return out
    cum = np.cumsum(per_ex)
    cuts = np.searchsorted(cum, np.arange(1, cum[-1] // _MAX_PAIRS + 1) * _MAX_PAIRS, side="right")
    edges = np.unique(np.r_[0, cuts, n])
    for e0, e1 in zip(edges[:-1], edges[1:]):
        pairs = []
        for s, k, a, b in spans:
            cnt = (b - a)[e0:e1]
            ex = np.repeat(np.arange(e0, e1), cnt)  # example of every (example, item) pair
            pos = window_items(a[e0:e1], cnt)
            day = (s.as_of[ex] - 1 - s.ts[k.items[pos]]) // DAY
            pairs.append(ex * days + day)
        uniq = np.unique(np.concatenate(pairs))  # distinct (example, day)
        out += np.bincount(uniq // days, minlength=n)
    return out


def _own_activity(arrays: dict, meta: StoreMeta, ev: _Stream, conv: _Stream) -> list[tuple[_Stream, _Kind]]:
    """The user's own activity, as the label counts it (features/labels.py): every event
    type but coach messages, restricted to `labels.activity_types` when the config names
    them; user messages come from the conversation stream."""
    labels = meta.config.get("labels", {})
    activity = {t.lower() for t in labels["activity_types"]} if labels.get("activity_types") else None
    types = list(meta.vocab["event_types"])  # type_id = index + 2 (vocab.FIRST)
    own_ev = [i + 2 for i, t in enumerate(types) if t != C.MESSAGE and (activity is None or t in activity)]
    own = [(ev, _Kind(np.isin(arrays["events"]["type_id"], own_ev)))]
    if C.MESSAGE in types and (activity is None or C.MESSAGE in activity):
        own.append((conv, _Kind(arrays["conversation"]["sender"] == SENDER_USER)))
    return own


def future_activity(arrays: dict, meta: StoreMeta, days: int) -> np.ndarray:
    """(n_examples, days) float32: 1 where the user has own activity on day d of
    [as_of + d days, as_of + d + 1 days), d = 0..days-1, 0 where not, and -1 where that day
    ends after the data does (unknown: an example near the end of the log). These are the
    days the label counts, so they are **targets only** (the auxiliary head of
    models/engagement.py, the future objective of pretraining), never inputs; they are
    complete for labelled examples whenever days <= labels.horizon_days."""
    ex = arrays["examples"]
    rows = np.arange(len(ex["as_of"]))
    ev, conv = (_Stream(arrays[s], ex, s, rows) for s in ("events", "conversation"))
    out = np.zeros((len(rows), days), dtype=np.float32)
    for s, k in _own_activity(arrays, meta, ev, conv):
        keys = s.keys[k.items]  # this kind's items, sorted by (user, ts)
        edges = [first_at_or_after(keys, s.ex_user, s.as_of + d * DAY) for d in range(days + 1)]
        for d in range(days):
            out[:, d] = np.maximum(out[:, d], edges[d + 1] > edges[d])
    if (data_end := meta.extra.get("data_end")) is not None:
        ends = ex["as_of"].astype(np.int64)[:, None] + (np.arange(days) + 1) * DAY  # (n, days)
        out[ends > int(data_end)] = -1.0
    return out


def future_activity_of(files, days: int) -> np.ndarray:
    """`future_activity` of every example of one or more feature files, in file order."""
    return np.concatenate([future_activity(*load_aggregate_inputs(f), days) for f in files])


def aggregate_features(
    arrays: dict, meta: StoreMeta, example_rows: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """Features of each example from its items strictly before as_of.

    arrays: store groups as read by `load_arrays` or `load_aggregate_inputs` (examples,
        users, events, conversation, food).
    example_rows: example indices to compute (default all), in output order.
    Returns X float32 (n_examples, n_features) and the feature names. Units: counts, days
    (recency capped at RECENCY_CAP_DAYS), kg (weight), foods per meal, shares in [0, 1].
    """
    ex = arrays["examples"]
    rows = np.arange(len(ex["as_of"])) if example_rows is None else np.asarray(example_rows, dtype=np.int64)
    ev, conv, food = (_Stream(arrays[s], ex, s, rows) for s in ("events", "conversation", "food"))
    labels = meta.config.get("labels", {})
    activity = {t.lower() for t in labels["activity_types"]} if labels.get("activity_types") else None
    types = list(meta.vocab["event_types"])  # type_id = index + 2 (vocab.FIRST)
    e = arrays["events"]

    # Kinds of item: messages from the conversation stream split by sender, every other
    # type from the events stream. Each: (name, stream, selection, counts as own activity).
    sender = arrays["conversation"]["sender"]
    kinds: list[tuple[str, _Stream, _Kind, bool]] = []
    for i, t in enumerate(types):
        if t == C.MESSAGE:
            own = activity is None or C.MESSAGE in activity
            kinds.append(("message_from_user", conv, _Kind(sender == SENDER_USER), own))
            kinds.append(("message_from_coach", conv, _Kind(sender == SENDER_COACH), False))
        else:
            kinds.append((_token(t), ev, _Kind(e["type_id"] == i + 2), activity is None or t in activity))

    cols: dict[str, np.ndarray] = {}
    for name, s, k, _ in kinds:
        for w in WINDOWS_DAYS:
            cols[f"count_{name}_{w}d"] = k.count(s.since(w * DAY), s.end)
    for i, t in enumerate(types):  # generic events carry a count (minutes, pages) as value
        if t not in C.CORE_EVENT_TYPES:
            v = np.where((e["type_id"] == i + 2) & (e["has_value"] > 0), e["value"], 0.0)
            for w in (7, 28):
                cols[f"value_sum_{_token(t)}_{w}d"] = _window_sum(v, ev.since(w * DAY), ev.end)
    for name, s, k, _ in kinds:
        cols[f"days_since_{name}"] = s.days(k.last(s.start, s.end))

    own = _own_activity(arrays, meta, ev, conv)
    cols["own_events_total"] = sum(k.count(s.start, s.end) for s, k in own)  # all visible history
    cols["days_since_own_activity"] = np.min([s.days(k.last(s.start, s.end)) for s, k in own], axis=0)
    for w in (7, 28):
        cols[f"active_days_{w}d"] = _distinct_days([(s, k, s.since(w * DAY)) for s, k in own], w)
    cols["active_last_week"] = cols["active_days_7d"] >= labels.get("min_active_days", 3)

    # Tenure: program start (users table, else first event) and the first visible event.
    cols["tenure_days"] = np.maximum(ev.as_of - arrays["users"]["program_start"][ev.ex_user], 0) / DAY
    first = np.minimum(ev.start, max(len(ev.ts) - 1, 0))
    cols["days_since_first_event"] = np.where(ev.end > ev.start, (ev.as_of - ev.ts[first]) / DAY, 0.0) if len(ev.ts) else 0.0

    cols |= _weight_features(ev, e, types)
    # Food: foods per logged meal over the last 7 days (0 without meals).
    lo7 = food.since(7 * DAY)
    foods = _window_sum(np.diff(arrays["food"]["meal_offsets"]), lo7, food.end)
    cols["foods_per_meal_7d"] = foods / np.maximum(food.end - lo7, 1)
    cols |= _conversation_features(conv, sender)
    cols |= attribute_features(arrays["users"], meta, ev.ex_user)

    names = list(cols)
    X = np.empty((len(rows), len(names)), dtype=np.float32)
    for j, n in enumerate(names):
        X[:, j] = cols[n]  # scalars broadcast (an empty stream)
    return X, names


def attribute_features(users: dict, meta: StoreMeta, user_row: np.ndarray) -> dict[str, np.ndarray]:
    """The user attributes of each example's user (static columns, the same at every as_of):
    numeric ones as `user_<name>` (0 where missing) plus `user_<name>_missing`; categorical
    ones one-hot, `user_<name>=<value>` per known value (`user_<name>#<bucket>` for a hashed
    column) and `user_<name>=?` for a missing or unknown value."""
    attrs, cols = meta.attributes, {}
    for j, name in enumerate(attrs["numeric"]):
        v = users["attr_values"][user_row, j].astype(np.float64)
        cols[f"user_{_token(name)}"] = np.nan_to_num(v, nan=0.0)
        cols[f"user_{_token(name)}_missing"] = np.isnan(v)
    for j, name in enumerate(attrs["categorical"]):
        code = users["attr_codes"][user_row, j]
        known = meta.vocab["attributes"].get(name)
        labels = [f"={v}" for v in known] if known is not None else [f"#{b}" for b in range(attrs["n_ids"] - 2)]
        cols[f"user_{_token(name)}=?"] = code < 2
        for i, label in enumerate(labels):
            cols[f"user_{_token(name)}{label}"] = code == i + 2
    return cols


def _weight_features(ev: _Stream, e: dict, types: list[str]) -> dict[str, np.ndarray]:
    """Change from the first to the last weigh-in of the last 28 days (kg), the change at
    the last weigh-in ever (kg), and whether there was a weigh-in in the last 28 days."""
    ids = [i + 2 for i, t in enumerate(types) if t == C.WEIGH_IN]
    weigh = _Kind(np.isin(e["type_id"], ids) & (e["has_value"] > 0))
    lo = ev.since(28 * DAY)
    a, b = weigh.first(lo, ev.end), weigh.last(lo, ev.end)
    value = np.r_[e["value"].astype(np.float64), 0.0]  # index -1 (no weigh-in) reads 0
    delta = np.r_[e["value_delta"].astype(np.float64), 0.0]
    return {
        "weight_change_28d": np.where(b >= 0, value[b] - value[a], 0.0),
        "weight_last_delta": delta[weigh.last(ev.start, ev.end)],
        "has_weigh_in_28d": b >= 0,
    }


def _conversation_features(conv: _Stream, sender: np.ndarray) -> dict[str, np.ndarray]:
    """Answered share of coach messages and how long the coach has been left waiting."""
    n = len(conv.ts)
    if n == 0:
        zero = np.zeros(len(conv.as_of))
        return {"coach_msgs_answered_share_28d": zero, "unanswered_coach_msgs": zero,
                "days_since_unanswered_coach_msg": zero + RECENCY_CAP_DAYS}
    is_user = sender == SENDER_USER
    is_coach = sender == SENDER_COACH
    # The next user message after each item (stream order); n where there is none.
    nxt = np.minimum.accumulate(np.where(is_user, np.arange(n), n)[::-1])[::-1]
    nxt = np.r_[nxt[1:], n]
    j = np.minimum(nxt, n - 1)
    answered = is_coach & (nxt < n) & (conv.user[j] == conv.user) & (conv.ts[j] - conv.ts <= ANSWER_WITHIN_S)
    # Only coach messages sent 28 days to 48 h before as_of: their whole reply window lies
    # before as_of, so a reply at/after as_of can never count (no leakage, no censoring).
    lo, hi = conv.since(28 * DAY), conv.since(ANSWER_WITHIN_S)
    coach, ans = _Kind(is_coach), _Kind(answered)
    asked = coach.count(lo, hi)
    last_user = _Kind(is_user).last(conv.start, conv.end)
    after = np.maximum(last_user + 1, conv.start)  # coach messages after the last user message
    waiting = coach.count(after, conv.end)
    return {
        "coach_msgs_answered_share_28d": ans.count(lo, hi) / np.maximum(asked, 1),
        "unanswered_coach_msgs": waiting,
        "days_since_unanswered_coach_msg": np.where(
            waiting > 0, conv.days(coach.last(after, conv.end)), RECENCY_CAP_DAYS
        ),
    }
