"""Small, deterministic event tables in the raw contract, for feature-build tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

START = pd.Timestamp("2026-01-05", tz="UTC")  # a Monday
TYPES = ["message", "food_log", "weigh_in", "content_view", "water_log"]
NO_MEALS = [t for t in TYPES if t != "food_log"]


def make_events(n_users: int = 12, weeks: int = 6, seed: int = 0, per_user=(5, 60)) -> pd.DataFrame:
    """Random events of every type over `weeks` weeks; user u0 gets only coach messages,
    user u1 a single event (in the first week, so it has examples), user u2 no meals."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = 1 if u == 1 else int(rng.integers(*per_user))
        for _ in range(n):
            seconds = int(rng.integers(0, weeks * 7 * 86400))
            ts = START + pd.Timedelta(seconds=seconds % (5 * 86400) if u == 1 else seconds)
            et = "message" if u == 0 else str(rng.choice(NO_MEALS if u == 2 else TYPES))
            r = {"user_id": f"u{u}", "ts": ts, "event_type": et}
            if et == "message":
                r |= {"sender": "coach" if u == 0 else str(rng.choice(["user", "coach"])),
                      "text": f"message {int(rng.integers(0, 40))} for you"}
            elif et == "food_log":
                r |= {"food_ids": [int(x) for x in rng.integers(100, 130, size=rng.integers(1, 6))],
                      "meal": str(rng.choice(["breakfast", "lunch", "dinner", "snack"]))}
            elif et == "weigh_in":
                r |= {"value": round(float(80 + rng.normal(0, 2)), 1)}
            elif et == "content_view":
                r |= {"content_id": f"c{int(rng.integers(0, 20))}", "value": float(rng.integers(1, 10))}
            else:
                r |= {"value": float(rng.integers(100, 500))}
            rows.append(r)
    df = pd.DataFrame(rows).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    return df


def build_store(tmp_path, events: pd.DataFrame, encoder, name: str = "w", *overrides):
    """The feature store of `events`, built by the real `features` stage into
    tmp_path/name with configs/test.yaml; returns (feature file, config)."""
    from pipeline.config import load_config
    from pipeline.data.features import features_stage

    src = tmp_path / f"{name}-events.parquet"
    events.to_parquet(src)
    cfg = load_config("configs/test.yaml", [
        f"workdir={tmp_path / name}", f"data.events={src}", "data.source=files", "data.users=null",
        "data.foods=null", "data.truth=null", *([f"features.text_encoder={encoder.name}"] if encoder else []), *overrides,
    ])
    return features_stage(cfg, encoder=encoder), cfg
