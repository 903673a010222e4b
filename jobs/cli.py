"""Scheduled jobs: `python -m jobs {run,list,schedule,rollback,promote} [--config C] [key.sub=value ...]`.

Thin: the jobs, the runner and the scheduler are importable (jobs/definitions.py,
jobs/runner.py, jobs/schedule.py); this module parses arguments and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from datetime import datetime, timezone

from common.errors import UserError
from pipeline.config import Config, load_config

EPILOG = """exit codes: 0 done (or already finished: skipped), 1 a step failed (the state file records
it; rerun to resume), 2 a usage or input error, 3 the job is already running (lock held;
nothing was changed)."""


def build_parser() -> argparse.ArgumentParser:
    from jobs.definitions import JOBS

    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        p.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
        return p

    jobs = ", ".join(f"{n} ({j.description})" for n, j in JOBS.items())
    p = add("run", "run one job for an as-of date, or backfill every scheduled date of a range")
    p.add_argument("job", choices=list(JOBS), help=jobs)
    p.add_argument("--as-of", help="YYYY-MM-DD: use events before this day at 00:00 UTC")
    p.add_argument("--from", dest="first", help="backfill: first day (YYYY-MM-DD), inclusive")
    p.add_argument("--to", dest="last", help="backfill: last day (YYYY-MM-DD), inclusive")
    p.add_argument("--force", action="store_true", help="run again even if finished for that as-of")
    p = add("list", "the jobs, their cron schedules, next due time, last runs and their status")
    p.add_argument("--limit", type=int, default=5, help="last runs shown per job")
    p = add("schedule", "foreground scheduler: run due jobs (as subprocesses), sleep, repeat")
    p.add_argument("--once", action="store_true", help="run what is due now, then exit")
    p.add_argument("--now", help="ISO time to treat as now for the first round (replays, tests); default: the clock")
    p = add("rollback", "point the `champion` alias back at an earlier model version")
    p.add_argument("--version", required=True, help="registered model version to make champion")
    p = add("promote", "point the `champion` alias at a version by hand (when the gate could not compare it "
                       "with the champion, e.g. after a change of text encoder)")
    p.add_argument("--version", required=True, help="registered model version to make champion")
    for p in sub.choices.values():  # after `job`: positionals are matched in order
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def parse_now(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"--now {value!r} is not an ISO time, e.g. 2026-02-16T03:30") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def run_command(cfg: Config, args: argparse.Namespace) -> None:
    from jobs import runner, schedule
    from jobs.definitions import get_job

    job = get_job(args.job)
    if args.as_of and (args.first or args.last):
        raise UserError("give either --as-of DATE or --from DATE --to DATE, not both")
    if args.as_of:
        dates = [runner.parse_day(args.as_of)]
        if dates != schedule.as_of_dates(job, cfg, dates[0], dates[0]):  # it runs: a user may mean it
            print(f"warning: {args.as_of} is not a scheduled as-of of {job.name} (cron {job.cron(cfg)!r}); it runs, "
                  "as its own date, beside the scheduled ones", file=sys.stderr)
    elif args.first and args.last:
        first, last = runner.parse_day(args.first, "--from"), runner.parse_day(args.last, "--to")
        if last < first:
            raise UserError(f"--to {args.last} is before --from {args.first}")
        dates = schedule.as_of_dates(job, cfg, first, last)
    else:
        raise UserError(f"{job.name} needs --as-of YYYY-MM-DD, or --from and --to for a backfill")
    runner.run(cfg, job, dates, force=args.force)


def list_command(cfg: Config, limit: int) -> None:
    from jobs import runner, schedule
    from jobs.definitions import JOBS

    now = runner.now_utc()
    for job in JOBS.values():
        expr = schedule.check_cron(job, cfg)
        print(f"{job.name}  cron '{expr}' (UTC)  next due {schedule.next_time(job, cfg, now):%Y-%m-%d %H:%M} UTC"
              f"  - {job.description}")
        runs = runner.history(cfg, job.name)[:limit]
        if not runs:
            print("  no runs yet")
        for s in runs:
            done = sum(r["status"] == "finished" for r in s["steps"].values())
            when = s.get("finished_at") or s.get("updated_at") or "-"
            status = runner.shown_status(s)
            line = f"  {s['as_of'][:10]}  {status:<9} steps {done}/{len(s['steps'])}  attempts {s['attempts']}  {when}"
            if s["status"] == "finished":
                results = {k: r.get("result", {}) for k, r in s["steps"].items()}
                line += "  " + _summary(results)
            elif s.get("error"):
                line += f"  {s['error']}"
            elif status == "killed":
                line += "  the process died mid-run; the next run of this as-of resumes it"
            print(line)
            for e in s.get("earlier", []):  # runs of the same as-of before a --force
                print(f"      earlier run, finished {e['finished_at']}:  {_summary(e['results'])}")


def _summary(results: dict) -> str:
    if "evaluate" in results:
        r = results["evaluate"]
        # `is True`: state files written before the fix hold the string "False"
        promoted = r.get("promoted") is True or r.get("promoted") == "True"
        if promoted:
            return f"promoted version {r.get('version')} ({r.get('reason')})"
        if r.get("version") is None:
            return f"champion not moved ({r.get('reason')})"
        return (f"kept champion, version {r.get('champion_before')}; candidate version {r.get('version')} "
                f"not promoted ({r.get('reason')})")
    if "score" in results:
        r = results["score"]
        return f"{r.get('users')} users, model version {r.get('model_version')} -> {r.get('scores')}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + rest
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    from jobs.runner import LOCKED_EXIT, JobLocked

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            run_command(cfg, args)
        elif args.command == "list":
            list_command(cfg, args.limit)
        elif args.command == "schedule":
            from jobs.schedule import serve

            serve(cfg, args.config, args.overrides, once=args.once, now=parse_now(args.now))
        elif args.command in ("rollback", "promote"):
            from jobs.definitions import move_champion

            before, after = move_champion(cfg, args.version)
            print(f"champion of {cfg.tracking.model_name}: version {before} -> {after}")
    except JobLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return LOCKED_EXIT
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}; the state file records the failed step, rerun to resume",
              file=sys.stderr)
        return 1
    return 0
