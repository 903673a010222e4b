"""`make bench`: speed and memory of the pipeline's heavy steps, each beside a naive version
measured in the same run on the same data (docs/design.md §11).

    python -m benchmarks.run [--quick] [--out bench-results/bench.json]

1. feature build, message encoding excluded: events/s of `build_features` vs a per-user
   Python loop that produces the same arrays (`benchmarks.naive`; equality asserted first)
2. message encoding with the real MiniLM: messages/s of deduplicated, length-sorted batches
   (`embed_messages`, fresh cache) vs original order padded to each batch's longest
3. data loading: batches/s of FeatureDataset + collate (arrays read once) vs an HDF5 open
   and reads per item, and the loader's share of a demo-sized training step (target < 10%)
4. training: examples/s and peak memory at sequence lengths 64..1024 (synthetic batches)
5. the feature build's peak memory at 1x, 4x and 12x the data (12x the demo: ~5M events), each build in its own process
6. the training recipe before issue 13 and now, on the demo's own store (`benchmarks.recipes`):
   training examples/s, pretraining windows/s, and validation ROC-AUC after the same epochs
   (skipped, with a line saying so, until `make demo` has built data/demo)

Data: the simulator (`pipeline.simulator`), validated by `features.validate`. A ratio is
real / naive for speed (> 1: the real code is faster). The machine, its core count and its
load average at the start are written beside the figures: a run on a busy machine is not
a final figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import recipes, sections
from benchmarks.measure import machine
from common.devices import resolve_device
from features import contract as C
from features.config import DataConfig
from features.dataset import model_config_for
from features.store import read_meta
from features.validate import normalise_users, validate_events
from models.config import ModelConfig
from pipeline.simulator.config import SimConfig
from pipeline.simulator.run import simulate


@dataclass(frozen=True)
class Sizes:
    users: int  # simulated users (weeks below) for the build, loading and memory sections
    weeks: int
    build_repeat: int  # the real build is timed best-of-n; the naive loop once
    messages: int  # a sample of simulator messages for the encoder
    loader_batches: int
    naive_loader_batches: int
    train_steps: int  # demo-sized training steps timed for the loader's share
    lengths: tuple[int, ...]
    length_batch: int
    length_steps: int
    memory_scales: tuple[int, ...] = (1, 4, 12)  # 12x the demo: about 5 million events
    recipe_epochs: int = 3  # section 6: epochs of training (pretraining: 1) per recipe


# FULL: the demo's data size, 2-3 minutes on 2 cores (137 s on 2026-12-02; the budget is 10 minutes).
# QUICK: about 2 minutes there.
FULL = Sizes(users=2000, weeks=16, build_repeat=3, messages=6000, loader_batches=300, naive_loader_batches=10,
             train_steps=30, lengths=(64, 128, 256, 512, 1024), length_batch=8, length_steps=5)
QUICK = Sizes(users=300, weeks=8, build_repeat=2, messages=500, loader_batches=30, naive_loader_batches=2,
              train_steps=5, lengths=(64, 128, 256, 512, 1024), length_batch=4, length_steps=1, recipe_epochs=1)


def run(sizes: Sizes, workdir: Path, device: torch.device, demo: Path) -> dict:
    results = run_sections(sizes, workdir, device)
    logging.getLogger("bench").info("6/6 training recipes on the demo store %s (%d epochs each)", demo,
                                    sizes.recipe_epochs)
    t0 = time.perf_counter()
    results["training_recipes"] = recipes.training_recipes(demo, workdir / "recipes", sizes.recipe_epochs, 1)
    results["total_seconds"] += time.perf_counter() - t0
    return results


def run_sections(sizes: Sizes, workdir: Path, device: torch.device) -> dict:
    t0 = time.perf_counter()
    tables = simulate(SimConfig(users=sizes.users, weeks=sizes.weeks, truth_samples=1))
    users = normalise_users(tables["users"], "users")
    events = validate_events(tables["events"], DataConfig(), users).events
    texts = [t for t, e in zip(tables["events"][C.TEXT], tables["events"][C.EVENT_TYPE]) if e == C.MESSAGE and isinstance(t, str)]
    keep = np.sort(np.random.default_rng(0).choice(len(texts), min(sizes.messages, len(texts)), replace=False))
    del tables
    results: dict = {}
    log = logging.getLogger("bench")
    log.info("1/6 feature build (%d events)", events.num_rows)
    results["feature_build"] = sections.feature_build(events, users, sizes.build_repeat)
    log.info("2/6 message encoding (%d messages)", len(keep))
    results["message_encoding"] = sections.message_encoding([texts[i] for i in keep], device.type)
    log.info("3/6 data loading")
    store = sections.write_bench_store(events, users, workdir / "features.h5")
    results["data_loading"] = sections.data_loading(store, device, sizes.loader_batches,
                                                    sizes.naive_loader_batches, sizes.train_steps)
    log.info("4/6 training at lengths %s", sizes.lengths)
    base = model_config_for(ModelConfig(), read_meta(store))
    results["training_lengths"] = sections.training_lengths(base, device, sizes.lengths, sizes.length_batch,
                                                            sizes.length_steps)
    log.info("5/6 feature build memory at %s the data", [f"{k}x" for k in sizes.memory_scales])
    results["build_memory"] = sections.build_memory(events, users, sizes.memory_scales, workdir)
    results["total_seconds"] = time.perf_counter() - t0
    return results


def table(report: dict) -> str:
    m, r = report["machine"], report["results"]
    fb, me, dl, tl, bm = (r[k] for k in ("feature_build", "message_encoding", "data_loading",
                                         "training_lengths", "build_memory"))
    rows = [
        ("measure", "real", "naive", "real/naive"),
        (f"1 feature build, events/s ({fb['events']:,} events, no encoding)", f"{fb['events_per_s']:,.0f}",
         f"{fb['naive_events_per_s']:,.0f}", f"{fb['ratio']:.1f}x"),
        (f"2 message encoding, msgs/s ({me['messages']:,}, {me['distinct']:,} distinct)",
         f"{me['messages_per_s']:,.0f}", f"{me['naive_messages_per_s']:,.0f}", f"{me['ratio']:.1f}x"),
        ("  length-sorted only, no dedupe", f"{me['sorted_only_messages_per_s']:,.0f}", "",
         f"{me['sorted_only_ratio']:.1f}x"),
        (f"3 data loading, batches/s (batch {dl['batch_size']})", f"{dl['batches_per_s']:,.1f}",
         f"{dl['naive_batches_per_s']:,.2f}", f"{dl['ratio']:.0f}x"),
        (f"  loader share of a training step ({dl['step_seconds'] * 1000:.0f} ms; target < 10%)",
         f"{dl['loader_share_of_step']:.1%}", f"{dl['naive_loader_share_of_step']:.1%}", ""),
    ]
    for L, x in tl["per_length"].items():
        rows.append((f"4 training, length {L} (batch {tl['batch_size']}): examples/s, peak MiB",
                     f"{x['examples_per_s']:,.1f}", f"{x['peak_mb']:,.0f} MiB",
                     f"{x['time_per_example_vs_shortest']:.1f}x time/ex"))
    for scale, x in bm.items():
        rows.append((f"5 build peak memory {scale} ({x['events']:,} events; arrow table {x['events_table_mb']:.0f} MiB)",
                     f"+{x['build_peak_above_before_mb']:,.0f} MiB", f"RSS {x['peak_rss_mb']:,.0f} MiB", ""))
    w = max(len(row[0]) for row in rows)
    lines = [f"machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), device {m['device']}, load average {m['load_average_1m_at_start']}"]
    lines += [f"{a:<{w}}  {b:>14}  {c:>16}  {d:>16}" for a, b, c, d in rows]
    if "training_recipes" in r:
        rows6 = recipes.rows(r["training_recipes"])
        lines += [f"{a:<{w}}  {b:>14}  {c:>16}  {d:>16}" for a, b, c, d in rows6]
    lines.append(f"total {r['total_seconds']:.0f}s; JSON has per-step seconds and per-step memory of the build")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: about 1-2 minutes")
    p.add_argument("--out", default="bench-results/bench.json", help="JSON of every figure")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--demo", default="data/demo", help="workdir of `make demo`, for section 6")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("features").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(device), "quick": args.quick, "sizes": asdict(sizes),
              "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *(argv or sys.argv[1:])])}
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        report["results"] = run(sizes, Path(work), device, Path(args.demo))
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
