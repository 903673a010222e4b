"""Peak memory of one feature build, run in its own process by `benchmarks.run` so that
nothing else the benchmark holds is counted:

    python -m benchmarks.build_memory EVENTS.parquet USERS.parquet   # prints one JSON line

EVENTS are validated events (sorted by user, ts). The build runs with `embed=None` (message
encoding is measured on its own). Reported: the resident set before the build (interpreter,
libraries, the events table), the peak during each step of the build's own timer above that
level (kernel high-water mark, `benchmarks.measure.PeakMemory`), and the sizes of the input
table and of the output arrays, to say what the peak is made of.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import pandas as pd
import pyarrow.parquet as pq

from benchmarks.measure import MB, PeakMemory, rss_bytes
from features import build
from features.vocab import Vocab
from pipeline.config import Config


def main(events_path: str, users_path: str) -> dict:
    events = pq.read_table(events_path)
    users = pd.read_parquet(users_path)
    steps: dict[str, float] = {}
    before = rss_bytes()

    class StepMemory(build.Timer):
        @contextmanager
        def step(self, name: str):
            with super().step(name), PeakMemory() as m:
                yield
            steps[name] = round((m.peak_bytes - before) / MB, 1)

    build.Timer = StepMemory  # this process only: the peak of each step of the build
    built = build.build_features(events, users, Config(), None, 0, "none", Vocab())
    out_bytes = sum(a.nbytes for g in built.arrays.values() for a in g.values())
    peak = max(steps.values())
    return {
        "events": events.num_rows,
        "rss_before_build_mb": round(before / MB, 1),
        "peak_rss_mb": round(before / MB + peak, 1),
        "build_peak_above_before_mb": peak,
        "held_after_build_mb": round((rss_bytes() - before) / MB, 1),
        "events_table_mb": round(events.nbytes / MB, 1),
        "output_arrays_mb": round(out_bytes / MB, 1),
        "step_peak_above_before_mb": steps,
        "step_seconds": built.summary["seconds"],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
