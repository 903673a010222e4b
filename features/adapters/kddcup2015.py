"""KDD Cup 2015 (XuetangX MOOC) daily activity -> the event contract.

This is also the worked example for mapping your own logs: produce one table with
user_id, ts, event_type (+ value, ...) and, when your label comes from elsewhere, a labels
table (user_id, as_of, label with 1 = engaged). Then point `data.events` / `data.labels`
at them and run `make features`.

Source rows: one per (enrollment, day) with a count per event type. We emit one event per
(enrollment, day, event type) with a count > 0, the count as `value`, at noon UTC (times of
day are lost in this data). The label: `truth_train.csv` says 1 = dropout (no activity in
the 10 days after the 30-day window); engaged = 1 - dropout, supplied at the end of each
enrollment's window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from common.errors import UserError
from features import contract as C
from features.io import require_columns, write_parquet_atomic

log = logging.getLogger(__name__)
COUNT_PREFIX = "event_"


def convert(src: str | Path, out: str | Path, courses: list[str] | None = None) -> dict[str, Path]:
    """Write events.parquet, users.parquet and labels.parquet for the courses in `src`."""
    src, out = Path(src), Path(out)
    files = sorted(src.glob("trainCourse*.csv"))
    if courses:
        files = [f for f in files if f.stem.removeprefix("trainCourse") in set(map(str, courses))]
    if not files:
        raise UserError(f"{src}: no trainCourse*.csv files; point data.adapter_input at the KDD Cup 2015 folder")
    truth_path = src / "truth_train.csv"
    if not truth_path.exists():
        raise UserError(f"{truth_path}: missing; the KDD adapter needs truth_train.csv for labels")

    daily = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    require_columns(daily, ["enrollment_id", "time"], files[0], "KDD daily activity")
    counts = [c for c in daily.columns if c.startswith(COUNT_PREFIX)]
    day = pd.to_datetime(daily["time"], utc=True)
    user = "e" + daily["enrollment_id"].astype(str)

    # Wide (one column per event type) -> long (one row per event type with a count > 0).
    long = pd.DataFrame({C.USER_ID: user, "day": day}).join(daily[counts]).melt(
        id_vars=[C.USER_ID, "day"], var_name=C.EVENT_TYPE, value_name=C.VALUE
    )
    long = long[long[C.VALUE] > 0]
    events = pd.DataFrame(
        {
            C.USER_ID: long[C.USER_ID].to_numpy(),
            C.TS: (long["day"] + pd.Timedelta(hours=12)).to_numpy(),
            C.EVENT_TYPE: long[C.EVENT_TYPE].str.removeprefix(COUNT_PREFIX).to_numpy(),
            C.VALUE: long[C.VALUE].astype(float).to_numpy(),
        }
    ).sort_values([C.USER_ID, C.TS], kind="stable")

    window = pd.DataFrame({C.USER_ID: user, "day": day}).groupby(C.USER_ID)["day"].agg(["min", "max"])
    users = pd.DataFrame({C.USER_ID: window.index, C.PROGRAM_START: window["min"].to_numpy()})

    truth = pd.read_csv(truth_path)
    truth[C.USER_ID] = "e" + truth["enrollment_id"].astype(str)
    truth = truth.merge(window, left_on=C.USER_ID, right_index=True)  # only converted courses
    labels = pd.DataFrame(
        {
            C.USER_ID: truth[C.USER_ID],
            C.AS_OF: truth["max"] + pd.Timedelta(days=1),  # the end of the 30-day window
            C.LABEL: 1 - truth["label"].astype(int),  # contract: 1 = engaged
        }
    )
    paths = {
        "events": write_parquet_atomic(events, out / "events.parquet"),
        "users": write_parquet_atomic(users, out / "users.parquet"),
        "labels": write_parquet_atomic(labels, out / "labels.parquet"),
    }
    log.info(
        "KDD Cup 2015: %d courses, %d enrollments, %d events, engaged rate %.3f -> %s",
        len(files), len(users), len(events), labels[C.LABEL].mean(), out,
    )
    return paths
