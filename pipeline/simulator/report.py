"""Hidden-side diagnostics of a simulation: the life-event ledger and summary figures
(label rate, oracle AUC, how often trips were announced). For logs and tests only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score

from features.contract import EVENT_TYPE, SENDER, SENDER_COACH, SENDER_USER, USER_ID
from pipeline.simulator.dynamics import Traits
from pipeline.simulator.persona import History
from pipeline.simulator.truth import HORIZON_DAYS, MIN_ACTIVE_DAYS


def _run_length(flag: np.ndarray) -> np.ndarray:
    """(n_days, n): how many consecutive days, from each day on, `flag` stays set."""
    run = np.zeros(flag.shape, dtype=np.int64)
    for d in range(flag.shape[0] - 1, -1, -1):
        run[d] = np.where(flag[d], 1 + (run[d + 1] if d + 1 < flag.shape[0] else 0), 0)
    return run


def life_events(
    hist: History, announced: pd.DataFrame, user_ids: np.ndarray, day0: pd.Timestamp
) -> pd.DataFrame:
    """One row per trip, work crunch, illness or decision to quit: user_id, kind, booked
    (the day it became known), start, end (exclusive; for quit: None), announced_at (the
    day the user wrote about it, else NaT)."""
    n_days = hist.active.shape[0]
    frames = []
    d, u = np.nonzero(hist.new_trip)
    frames.append(
        pd.DataFrame(
            {
                "u": u,
                "kind": "travel",
                "booked": d,
                "start": hist.trip_start[d, u],
                "end": hist.trip_end[d, u],
            }
        )
    )
    d, u = np.nonzero(hist.new_busy)
    start = hist.busy_start[d, u]
    busy_len = _run_length(hist.busy)[np.minimum(start, n_days - 1), u]
    frames.append(
        pd.DataFrame({"u": u, "kind": "busy", "booked": d, "start": start, "end": start + busy_len})
    )
    d, u = np.nonzero(hist.new_ill)
    frames.append(
        pd.DataFrame(
            {
                "u": u,
                "kind": "illness",
                "booked": d,
                "start": d,
                "end": d + _run_length(hist.ill)[d, u],
            }
        )
    )
    # A decision to quit is taken at the end of a day and shows in the next day's state.
    q = hist.quit_day
    d, u = np.nonzero((q >= 0) & (q != np.vstack([np.full((1, q.shape[1]), -1), q[:-1]])))
    frames.append(
        pd.DataFrame({"u": u, "kind": "quit", "booked": d - 1, "start": q[d, u], "end": np.nan})
    )
    out = pd.concat(frames, ignore_index=True)
    said = announced.groupby(["kind", "u", "start"], as_index=False)["announced"].min()
    out = out.merge(said, on=["kind", "u", "start"], how="left")

    def day_ts(days: pd.Series) -> pd.Series:
        return day0 + pd.to_timedelta(days.astype(float), unit="D")

    return pd.DataFrame(
        {
            USER_ID: user_ids[out["u"].to_numpy()].astype(str),
            "kind": out["kind"].astype(str),
            "booked": day_ts(out["booked"]),
            "start": day_ts(out["start"]),
            "end": day_ts(out["end"]),
            "announced_at": day_ts(out["announced"]),
        }
    ).sort_values([USER_ID, "start"], ignore_index=True)


def summarize(
    hist: History, tr: Traits, truth: list[tuple[int, np.ndarray, np.ndarray]], lives: pd.DataFrame,
    events: pa.Table, dirty_rows: int, day0: pd.Timestamp,
) -> dict[str, object]:  # fmt: skip
    """Figures for the run's log line, computed from the hidden history."""
    n_days = hist.active.shape[0]
    types = pc.value_counts(events[EVENT_TYPE]).to_pylist()
    senders = {r["values"]: r["counts"] for r in pc.value_counts(events[SENDER]).to_pylist()}
    labels, probs, touched, travel, weekly = [], [], [], [], []
    life = hist.travel | hist.busy | hist.ill
    for d, rows, p in truth:
        horizon = slice(d, d + HORIZON_DAYS)
        y = hist.active[horizon, rows].sum(0) >= MIN_ACTIVE_DAYS
        labels.append(y)
        probs.append(p)
        weekly.append(float(y.mean()) if len(y) else float("nan"))
        touched.append(life[horizon, rows].any(0))
        travel.append(hist.travel[horizon, rows].any(0))
    y, p = np.concatenate(labels), np.concatenate(probs)
    trips = lives[(lives["kind"] == "travel") & (lives["start"] < day0 + pd.Timedelta(days=n_days))]
    user_weeks = np.clip(n_days - tr.start_day, 0, None).sum() / 7.0
    return {
        "events": events.num_rows + dirty_rows,
        "events_by_type": {
            r["values"]: r["counts"] for r in sorted(types, key=lambda r: -r["counts"])
        },
        "user_messages": senders.get(SENDER_USER, 0),
        "coach_messages": senders.get(SENDER_COACH, 0),
        "user_messages_per_user_week": senders.get(SENDER_USER, 0) / max(user_weeks, 1.0),
        "label_rate": float(y.mean()),
        "label_rate_by_week": weekly,
        "oracle_auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan"),
        "brier": float(np.mean((p - y) ** 2)),
        "life_event_week_share": float(np.concatenate(touched).mean()),
        "travel_week_share": float(np.concatenate(travel).mean()),
        "trips_announced_share": float(trips["announced_at"].notna().mean())
        if len(trips)
        else float("nan"),
        "churned_share": float(hist.churned[-1].mean()),
        "coach_only_users": int((~hist.active.any(0)).sum()),
        "dirty_rows": dirty_rows,
    }
