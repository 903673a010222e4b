"""`make bench-scale`: events/s and peak resident memory of validation + one feature shard at a
given log size, streamed (features/stream.py) beside the in-memory path where it fits:

    python -m benchmarks.scale --users 25000 --partitions 8 [--in-memory]

Steps, each in its own process so its peak resident set is its own (ru_maxrss):
1. simulate `--users` x 16 weeks in chunks of 2,000 users (not timed as part of the pipeline);
2. validate: streamed into `--partitions` user-shard partitions (and, with --in-memory, the
   whole table at once);
3. features: shard 0 of `--partitions`, reading only its partition, messages as zero vectors
   (encoding is measured by `make bench`), its HDF5 store written; the other shards cost the
   same, one per process or task. Prints one JSON line per step and a summary.
4. with `--dask W`: the pipeline's own `features` command with `features.scheduler` on a Dask
   LocalCluster of W one-thread worker processes (127.0.0.1): the validation's units and
   partitions as tasks, then one `features` stage per shard as a task (its store written), a
   tiny random text encoder (16-d) for the message vectors. Timed once with every message encoded
   (empty cache), then `--repeat` times (default 3) each: on restarted workers with the vectors
   cached (what a rebuild pays: the issue's "encoding cached") and again on the same, warm
   workers (imports done, memory pools grown, as on a long-lived cluster); the medians, each run
   beside them, and peak memory of the parent and of the largest worker; and what the machine's W
   cores are worth against one, on a task that computes in cache and on one that reads memory at
   random (`cores_at_work`).
5. with `--job`: the weekly retrain's `features` step (streamed validation, then the week's store
   cut at `--job-as-of`, message vectors included from a tiny random text encoder, store writes
   included), once with one unsharded store and once with a shard per partition, each in its own
   process: wall time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; its JSON output plus its wall time and peak RSS."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    result = json.loads(out.strip().splitlines()[-1])
    return result | {"wall_s": round(wall, 1)}


PEAK = "import resource, json; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
# One shard of a streamed validation's partitions, messages as zero vectors, its HDF5 store
# written beside the partitions: (events, examples).
SHARD = """
def shard(out, i, n):
    import json, pyarrow.parquet as pq
    from features.build import build_features
    from features.store import write_store
    from features.stream import SUMMARY, partition_name
    from features.vocab import Vocab
    from pipeline.config import load_config
    cfg = load_config('configs/demo.yaml', ['data.foods=null', 'data.until=null', f'features.shard={i}',
                                            f'features.num_shards={n}'])
    facts = json.loads(open(f'{out}/{SUMMARY}').read())
    part = pq.read_table(f'{out}/events/' + partition_name(i, n))
    built = build_features(part, None, cfg, None, 0, 'none', Vocab(), facts=facts)
    write_store(f'{out}/features-{i:03d}-of-{n:03d}.h5', built.arrays, built.meta)
    return part.num_rows, built.summary['examples']
"""


# The pipeline's config for the raw log in `workdir`: a tiny random text encoder (16-d), date parsing
# off (text work, vectors and dates, is `make bench`'s and the demo's), `extra` overrides.
RAW_CONFIG = """
def raw_config(raw, workdir, partitions, shards, *extra):
    from pathlib import Path
    from models.synthetic import save_tiny_text_encoder
    from pipeline.config import load_config
    enc = Path(workdir) / 'tiny-encoder'
    if not enc.exists():
        save_tiny_text_encoder(enc)
    return load_config('configs/demo.yaml', [f'workdir={workdir}', 'data.source=files', f'data.events={raw}/events.parquet',
                       f'data.users={raw}/users.parquet', 'data.foods=null', 'data.truth=null', f'features.text_encoder={enc}',
                       f'data.stream_partitions={partitions}', f'features.num_shards={shards}', 'features.date_languages=[]',
                       *extra])
"""

# The weekly retrain's features step on the raw log, in `workdir`, with `shards` shards.
JOB = RAW_CONFIG + """
def job_step(raw, workdir, partitions, shards, as_of):
    from pathlib import Path
    from jobs.definitions import Context, features_step
    from jobs.runner import parse_day
    cfg = raw_config(raw, workdir, partitions, shards)
    return len(features_step(Context(cfg, 'weekly-retrain', parse_day(as_of), Path(workdir)))['feature_files'])
"""

# The pipeline's own `features` command with a Dask scheduler (pipeline/data/fanout.py): streamed
# validation (units, then partitions, as tasks), then one `features` stage per shard as a task,
# each writing its store. The first run encodes every message (empty cache); then, `repeat` times,
# the workers are restarted and it runs on cold workers with the vectors cached, then on warm ones.
FANOUT = RAW_CONFIG + """
def fan_out(raw, workdir, partitions, workers, repeat):
    import json, shutil, time
    from pathlib import Path
    from dask.distributed import Client, LocalCluster
    from features.validate import REPORT
    from pipeline.data.fanout import build_shards
    work, seconds = Path(workdir), []
    shutil.rmtree(work / 'features', ignore_errors=True)  # the text cache too: the first run encodes
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host='127.0.0.1',
                      dashboard_address=None) as cluster, Client(cluster) as client:
        cfg = raw_config(raw, workdir, partitions, partitions, f'features.scheduler={cluster.scheduler_address}')
        for run in range(1 + 2 * repeat):
            shutil.rmtree(work / 'validated', ignore_errors=True)
            for f in (work / 'features').glob('features-*'):
                f.unlink()
            if run % 2 == 1:
                client.restart()
            t = time.perf_counter()
            files = build_shards(cfg)
            seconds.append(time.perf_counter() - t)
    events = json.loads((work / 'validated' / REPORT).read_text())['rows_in']
    return events, sum(json.loads(f.with_suffix('.json').read_text())['examples'] for f in files), seconds
"""


# Two fixed tasks, each printing its seconds: "compute" sorts an array that fits in cache; "memory"
# gathers a 160 MB array at random rows, as a shard's takes and fancy indexing do at scale.
MACHINE_TASKS = {
    "compute": "x = np.random.default_rng(0).random(200_000)\nwork = lambda: [np.sort(x) for _ in range(150)]",
    "memory": "rng = np.random.default_rng(0)\nx = rng.random(20_000_000)\n"
              "i = rng.integers(0, len(x), 5_000_000)\nwork = lambda: [x[i].sum() for _ in range(12)]",
}
TIMED = "import json, time, numpy as np\n{setup}\nt = time.perf_counter()\nwork()\n" \
        "print(json.dumps({{'seconds': time.perf_counter() - t}}))"


def cores_at_work(workers: int) -> dict:
    """What `workers` cores of this machine are worth against one: each of MACHINE_TASKS alone in one
    process, then in `workers` processes at once; its `speedup` = workers x alone / the mean
    side-by-side time (workers on cores that share nothing). The throughput target is per "2
    cores": on the 2-core machines here both scaled by 1.7-2.3 in the runs of docs/benchmarks.md,
    by less while the host was busy."""
    out = {}
    for name, setup in MACHINE_TASKS.items():
        code = TIMED.format(setup=setup)
        alone = _child(code)["seconds"]
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
        side = [json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"] for p in procs]
        out[name] = {"alone_s": round(alone, 3), "side_by_side_s": [round(t, 3) for t in side],
                     "speedup": round(workers * alone / float(np.mean(side)), 2)}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--users", type=int, default=25_000)
    ap.add_argument("--weeks", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--in-memory", action="store_true", help="also validate the whole table at once")
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--dask", type=int, default=0, metavar="W",
                    help="also run validate + all shards end to end on a LocalCluster of W workers")
    ap.add_argument("--repeat", type=int, default=3, metavar="K",
                    help="with --dask: time the cached runs K times each, on restarted and on warm workers, "
                         "and report the medians (this machine's speed moves by 10-20%% between runs)")
    ap.add_argument("--job", action="store_true",
                    help="also the weekly retrain's features step, one store against a shard per partition")
    ap.add_argument("--job-as-of", default="2026-04-13", help="the weekly retrain's as-of (a Monday in the log)")
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
        f"{SHARD}\nevents, examples = shard({str(out)!r}, 0, {n})\n"
        f"{PEAK}\nprint(json.dumps({{'events': events, 'examples': examples, 'peak_mb': round(peak)}}))"))
    if args.dask:
        rows.append({"step": f"features command, {n} shards on a Dask LocalCluster of {args.dask} workers"} | _child(
            f"{FANOUT}\nimport resource\n"
            f"events, examples, s = fan_out({str(raw)!r}, {str(root / 'fan-out')!r}, {n}, {args.dask}, {args.repeat})\n"
            "worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            f"{PEAK}\nprint(json.dumps({{'events': events, 'examples': examples, 'first_run_s': round(s[0], 1), "
            "'runs_s': [round(x, 1) for x in s[1::2]], 'warm_runs_s': [round(x, 1) for x in s[2::2]], "
            "'peak_mb': round(peak), 'worker_peak_mb': round(worker)}))"))
        run = rows[-1]
        run["cores"] = cores_at_work(args.dask)
        for median, runs, rate in (("run_s", "runs_s", "events_per_s_run"),
                                   ("warm_run_s", "warm_runs_s", "events_per_s_warm_run")):
            run[median] = float(np.median(run[runs]))  # the median of the repeats
            run[rate] = round(run["events"] / run[median])
    if args.job:
        for shards in (1, n):
            rows.append({"step": f"weekly retrain's features step, {shards} shard(s)"} | _child(
                f"{JOB}\nfiles = job_step({str(raw)!r}, {str(root / f'job-{shards}')!r}, {n}, {shards}, "
                f"{args.job_as_of!r})\n{PEAK}\nprint(json.dumps({{'events': {events}, 'files': files, "
                "'peak_mb': round(peak)}))"))
    for r in rows:
        if r.get("events"):
            r["events_per_s"] = round(r["events"] / r["wall_s"])
        print(json.dumps(r))
    shard = next(r for r in rows if r["step"].startswith("features"))
    streamed = next(r for r in rows if r["step"].startswith("validate, streamed"))
    print(f"{events:,} events: streamed validation {streamed['wall_s']} s, peak {streamed['peak_mb']} MB; "
          f"one feature shard ({shard['events']:,} events) {shard['wall_s']} s, peak {shard['peak_mb']} MB; "
          f"validate + {n} shards one after another on one core: about "
          f"{events / (streamed['wall_s'] + n * shard['wall_s']):,.0f} events/s")
    if args.dask:
        run = next(r for r in rows if r["step"].startswith("features command"))
        print(f"the features command (validate + {n} shards, stores written) on {args.dask} Dask workers: "
              f"{run['first_run_s']} s with every message encoded by a 16-d encoder; with the vectors cached "
              f"(median of {len(run['runs_s'])}), on restarted workers {run['run_s']} s "
              f"({', '.join(map(str, run['runs_s']))}), {run['events_per_s_run']:,} events/s; on warm workers "
              f"{run['warm_run_s']} s ({', '.join(map(str, run['warm_runs_s']))}), "
              f"{run['events_per_s_warm_run']:,} events/s; parent peak {run['peak_mb']} MB, "
              f"largest worker {run['worker_peak_mb']} MB")
        print(f"this machine's {args.dask} cores against one: " + "; ".join(
            f"{name} {c['speedup']}x ({c['alone_s']} s alone, {', '.join(map(str, c['side_by_side_s']))} s side by side)"
            for name, c in run["cores"].items()))
    if args.job:
        one, many = rows[-2], rows[-1]
        print(f"weekly retrain's features step: one store {one['wall_s']} s, peak {one['peak_mb']} MB; "
              f"{n} shards {many['wall_s']} s, peak {many['peak_mb']} MB")
    return rows

if __name__ == "__main__":
    main()
