"""`make bench-scale`: events/s and peak resident memory of validation + one feature shard at a
given log size, streamed (features/stream.py) beside the in-memory path where it fits:

    python -m benchmarks.scale --users 25000 --partitions 8 [--in-memory]

Steps, each in its own process so its peak resident set is its own (ru_maxrss):
1. simulate `--users` x 16 weeks in chunks of 2,000 users (not timed as part of the pipeline);
2. validate: streamed into `--partitions` user-shard partitions (and, with --in-memory, the
   whole table at once);
3. features: shard 0 of `--partitions`, reading only its partition, messages as zero vectors
   (encoding is measured by `make bench`); the other shards cost the same, one per process or
   task. Prints one JSON line per step and a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from features.stream import SUMMARY


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; its JSON output plus its wall time and peak RSS."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    result = json.loads(out.strip().splitlines()[-1])
    return result | {"wall_s": round(wall, 1)}


PEAK = "import resource, json; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--users", type=int, default=25_000)
    ap.add_argument("--weeks", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--in-memory", action="store_true", help="also validate the whole table at once")
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-scale-"))
    raw, out, n = root / "raw", root / "validated", args.partitions
    rows = []
    if not (raw / "events.parquet").exists():
        rows.append({"step": "simulate"} | _child(
            "from pipeline.simulator.config import SimConfig; from pipeline.simulator.run import simulate_to_dir\n"
            f"simulate_to_dir(SimConfig(users={args.users}, weeks={args.weeks}, truth_samples=1), {str(raw)!r}, "
            f"chunk_users=2000)\n{PEAK}\nprint(json.dumps({{'peak_mb': round(peak)}}))"))
    data = f"DataConfig(events={str(raw / 'events.parquet')!r})"
    rows.append({"step": f"validate, streamed into {n} partitions"} | _child(
        "from features.config import DataConfig; from features.stream import validate_to_partitions\n"
        f"r = validate_to_partitions({str(raw / 'events.parquet')!r}, {data}, {str(out)!r}, {n})\n"
        f"{PEAK}\nprint(json.dumps({{'events': r['rows_in'], 'accepted': r['accepted'], 'peak_mb': round(peak)}}))"))
    events = rows[-1]["events"]  # the streamed validation's
    if args.in_memory:
        rows.append({"step": "validate, whole table in memory"} | _child(
            "from features.config import DataConfig; from features.io import read_table\n"
            "from features.validate import validate_events\n"
            f"r = validate_events(read_table({str(raw / 'events.parquet')!r}, provenance=True), {data}).report\n"
            f"{PEAK}\nprint(json.dumps({{'events': r['rows_in'], 'peak_mb': round(peak)}}))"))
    rows.append({"step": f"features, shard 0 of {n} (its partition only)"} | _child(
        "import json as j, pyarrow.parquet as pq\nfrom features.build import build_features\n"
        "from features.stream import SUMMARY, partition_name\nfrom features.vocab import Vocab\n"
        "from pipeline.config import load_config\n"
        f"cfg = load_config('configs/demo.yaml', ['data.foods=null', 'data.until=null', 'features.shard=0', "
        f"'features.num_shards={n}'])\n"
        f"facts = j.loads(open({str(out / SUMMARY)!r}).read())\n"
        f"part = pq.read_table({str(out / 'events')!r} + '/' + partition_name(0, {n}))\n"
        "b = build_features(part, None, cfg, None, 0, 'none', Vocab(), facts=facts)\n"
        f"{PEAK}\nprint(json.dumps({{'events': part.num_rows, 'examples': b.summary['examples'], "
        "'peak_mb': round(peak)}))"))
    for r in rows:
        if r.get("events"):
            r["events_per_s"] = round(r["events"] / r["wall_s"])
        print(json.dumps(r))
    shard, streamed = rows[-1], next(r for r in rows if r["step"].startswith("validate, streamed"))
    print(f"{events:,} events: streamed validation {streamed['wall_s']} s, peak {streamed['peak_mb']} MB; "
          f"one feature shard ({shard['events']:,} events) {shard['wall_s']} s, peak {shard['peak_mb']} MB; "
          f"validate + {n} shards one after another on one core: about "
          f"{events / (streamed['wall_s'] + n * shard['wall_s']):,.0f} events/s")
    return rows

if __name__ == "__main__":
    main()
