"""Assemble event blocks into one contract table, and append deliberately dirty rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from features.contract import (
    ALL_COLUMNS,
    CONTENT_ID,
    EVENT_TYPE,
    FOOD_IDS,
    FOOD_LOG,
    MEAL,
    MEALS,
    MESSAGE,
    NORMALISED_SCHEMA,
    SENDER,
    SENDER_COACH,
    SENDER_USER,
    TEXT,
    TS,
    USER_ID,
    VALUE,
    WEIGH_IN,
)
from pipeline.simulator.events import Block


def assemble_events(blocks: list[Block], user_ids: np.ndarray) -> pa.Table:
    """One table in `NORMALISED_SCHEMA`, sorted by (user_id, ts). `user_ids` maps the
    blocks' user indices to ids; ids are zero-padded, so index order is id order."""
    user = np.concatenate([b.user for b in blocks])
    ts = np.concatenate([b.ts for b in blocks])
    order = np.lexsort((ts, user))  # stable: ties keep their generation order

    def column(attr: str, fill) -> np.ndarray:
        parts = []
        for b in blocks:
            v = getattr(b, attr)
            parts.append(
                np.full(len(b.user), fill, dtype=object if fill is None else float)
                if v is None
                else v
            )
        return np.concatenate(parts)[order]

    # Food lists: reorder the flat ids segment by segment to follow the sorted rows.
    has_foods = np.concatenate([np.full(len(b.user), b.food_lens is not None) for b in blocks])
    lens = np.concatenate(
        [
            b.food_lens if b.food_lens is not None else np.zeros(len(b.user), np.int64)
            for b in blocks
        ]
    )
    flat = np.concatenate(
        [b.food_values for b in blocks if b.food_values is not None] or [np.zeros(0, np.int64)]
    )
    starts = (np.cumsum(lens) - lens)[order]
    lens = lens[order]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    gather = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])  # (n_foods,)
    foods = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(flat[gather], pa.int64()),
        mask=pa.array(~has_foods[order]),
    )
    event_type = np.concatenate([np.full(len(b.user), b.event_type, dtype=object) for b in blocks])
    arrays = {
        USER_ID: pa.array(user_ids[user[order]], pa.string()),
        TS: pa.array(ts[order], pa.timestamp("us", tz="UTC")),
        EVENT_TYPE: pa.array(event_type[order], pa.string()),
        SENDER: pa.array(column("sender", None), pa.string()),
        TEXT: pa.array(column("text", None), pa.string()),
        FOOD_IDS: foods,
        MEAL: pa.array(column("meal", None), pa.string()),
        VALUE: pa.array(column("value", np.nan), pa.float64(), from_pandas=True),
        CONTENT_ID: pa.array(column("content", None), pa.string()),
    }
    return pa.Table.from_arrays([arrays[c] for c in ALL_COLUMNS], schema=NORMALISED_SCHEMA)


DIRTY_KINDS = (
    "missing_user_id", "null_ts", "absurd_weight", "empty_meal",
    "message_without_text", "unknown_sender", "exact_duplicate",
)  # fmt: skip


def append_dirty_rows(events: pa.Table, fraction: float, rng: np.random.Generator) -> pa.Table:
    """Append about `fraction` x rows of bad rows, built from copies of real rows. Each is
    one a validator must quarantine (or drop as an exact duplicate), so the clean data and
    the ground truth are untouched. Rows are appended unsorted, as real dirt arrives."""
    k = int(round(fraction * events.num_rows))
    if k == 0 or events.num_rows == 0:
        return events
    rows = events.take(pa.array(rng.integers(0, events.num_rows, k))).to_pylist()
    kinds = rng.integers(0, len(DIRTY_KINDS), k)
    blank = {SENDER: None, TEXT: None, FOOD_IDS: None, MEAL: None, VALUE: None, CONTENT_ID: None}
    for row, kind in zip(rows, kinds):
        name = DIRTY_KINDS[kind]
        if name == "missing_user_id":
            row[USER_ID] = None
        elif name == "null_ts":
            row[TS] = None
        elif name == "absurd_weight":  # a scale in pounds x 10, or nobody standing on it
            row.update(blank, **{EVENT_TYPE: WEIGH_IN, VALUE: float(rng.choice([0.0, 900.0]))})
        elif name == "empty_meal":
            row.update(blank, **{EVENT_TYPE: FOOD_LOG, FOOD_IDS: [], MEAL: str(rng.choice(MEALS))})
        elif name == "message_without_text":
            sender = SENDER_USER if rng.random() < 0.5 else SENDER_COACH
            row.update(blank, **{EVENT_TYPE: MESSAGE, SENDER: sender})
        elif name == "unknown_sender":
            row.update(
                blank, **{EVENT_TYPE: MESSAGE, SENDER: "bot", TEXT: "Reminder: log your lunch!"}
            )
    dirty = pa.Table.from_pylist(rows, schema=NORMALISED_SCHEMA)
    return pa.concat_tables([events, dirty])
