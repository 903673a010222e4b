"""One command line: `python -m pipeline <stage> [--config C] [key.sub=value ...]`.

Each stage is an importable function (the tests call the same functions); this module
only parses arguments, resolves the config, and turns `UserError` into one line + exit 2.
`diagnose` exits 1 when any of its checks fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.errors import UserError
from pipeline.config import Config, load_config, to_yaml
from pipeline.paths import Paths

STAGES = {
    "simulate": "write simulated app events (events/users/foods parquet) and truth.parquet",
    "validate": "check raw events against the contract; write accepted rows and a quarantine",
    "features": "build the HDF5 feature store (runs validation first when given raw events)",
    "pretrain": "pretrain the encoders on unlabelled sequences",
    "train": "train the engagement model",
    "evaluate": "evaluate the latest model and the baselines; register and gate the champion",
    "compare": "print MLflow runs side by side",
    "diagnose": "checks that explain why a model learns nothing; exits 1 if any check fails",
    "serve": "serve the champion over HTTP on 127.0.0.1 (`mlflow models serve`, /invocations)",
    "demo": "simulate -> validate -> features -> pretrain -> train -> evaluate -> compare",
    "experiments": "pretrained vs scratch at 5/20/100% labels, ablations, pooling (configs/experiments.yaml)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_ in STAGES.items():
        p = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)  # help is %-formatted
        p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
        p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("-v", "--verbose", action="store_true")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name == "simulate":
            p.add_argument("--users", type=int)
            p.add_argument("--weeks", type=int)
            p.add_argument("--seed", type=int)
            p.add_argument("--out", help="output folder (default: <workdir>/raw)")
            p.add_argument("--chunk-users", type=int, help="simulate and write this many users at a time (a multiple "
                           "of 500): memory follows it; the files differ from an in-memory run's")
        if name in ("validate", "features"):
            p.add_argument("--events", help="events file or folder (overrides data.events)")
            p.add_argument("--users", help="users side table (overrides data.users)")
        if name == "validate":
            p.add_argument("--out", help="output folder (default: <workdir>/validated)")
        if name == "features":
            p.add_argument("--shard", type=int, help="build only this shard of users")
            p.add_argument("--num-shards", type=int,
                           help="number of user shards (features without --shard: every shard, one after another)")
            p.add_argument("--scheduler", help="a Dask scheduler address: build every shard there as a task")
        if name == "compare":
            p.add_argument("--format", default="table", choices=["table", "csv", "json", "markdown"])
            p.add_argument("--all-builds", action="store_true", help="also runs on older feature builds")
        if name == "experiments":
            p.add_argument("--only", help="comma-separated experiment names")
        if name == "serve":
            p.add_argument("--port", type=int, default=5001)
            p.add_argument("--host", default="127.0.0.1", help="loopback by default: put a gateway in front")
    return parser


def resolve(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    flag_keys = {
        "users": "sim.users" if args.stage == "simulate" else "data.users",
        "weeks": "sim.weeks",
        "seed": "sim.seed",
        "events": "data.events",
        "shard": "features.shard",
        "num_shards": "features.num_shards",
        "scheduler": "features.scheduler",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "events", None):  # the user's own file: no simulator, no side tables
        overrides[:0] = ["data.source=files", "data.foods=null", "data.labels=null", "data.truth=null"]
        if not args.users:
            overrides.insert(0, "data.users=null")
    config = args.config or "configs/demo.yaml"
    return load_config(config, overrides)


def run_stage(stage: str, cfg: Config, args: argparse.Namespace) -> int | None:
    """Run one stage; an int is the exit status (diagnose: 1 when a check fails)."""
    # Imports are local so `--help` and `--show-config` stay fast.
    if stage == "simulate":
        from pipeline.data.sources import simulate_raw

        simulate_raw(cfg, Path(args.out) if args.out else Paths.of(cfg).raw, getattr(args, "chunk_users", None))
    elif stage == "validate":
        from pipeline.data.sources import ensure_raw
        from pipeline.data.validate import validate_stage

        ensure_raw(cfg)
        validate_stage(cfg, Path(args.out) if args.out else None)
    elif stage == "features":
        from pipeline.data.fanout import build_shards

        build_shards(cfg)
    elif stage == "pretrain":
        from pipeline.pretraining.pretrain import pretrain

        pretrain(cfg)
    elif stage == "train":
        from pipeline.training.train import train

        train(cfg)
    elif stage == "evaluate":
        from pipeline.evaluation.evaluate import evaluate

        evaluate(cfg)
    elif stage == "compare":
        from pipeline.evaluation.compare import compare

        compare(cfg, fmt=args.format, all_builds=args.all_builds)
    elif stage == "diagnose":
        from pipeline.diagnostics.diagnose import diagnose, exit_code

        return exit_code(diagnose(cfg))
    elif stage == "experiments":
        from pipeline.experiments import experiments

        experiments(args.config or "configs/demo.yaml", args.overrides, args.only.split(",") if args.only else None)
    elif stage == "serve":
        from pipeline.serving import serve

        return serve(cfg, args.host, args.port)
    elif stage == "demo":
        from pipeline.demo import demo

        demo(cfg)
    else:  # argparse guards this
        raise UserError(f"unknown stage {stage!r}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options: collect every leftover key=value.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + rest
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = resolve(args)
        if args.show_config:
            print(to_yaml(cfg), end="")
            return 0
        status = run_stage(args.stage, cfg, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0
