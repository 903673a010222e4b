"""When jobs are due, from the cron expressions in `JobsConfig` (croniter; UTC), and a small
foreground scheduler that runs due jobs as subprocesses of `python -m jobs run ...`.

A job's as-of is the day of its scheduled time at 00:00 UTC: the Monday 03:00 retrain
trains on events before Monday 00:00, the 02:00 nightly score scores at 00:00 that day.
A job is due when its latest scheduled time has passed and that as-of is not finished, so
the scheduler also retries an unfinished run (resuming it) the next time it wakes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from croniter import croniter, croniter_range

from common.errors import UserError
from jobs.definitions import JOBS, Job
from jobs.runner import load_state, now_utc, state_path
from pipeline.config import Config

log = logging.getLogger("jobs.schedule")


def check_cron(job: Job, cfg: Config) -> str:
    expr = job.cron(cfg)
    if not croniter.is_valid(expr):
        raise UserError(f"jobs.{job.cron_key}={expr!r} is not a cron expression (e.g. '0 3 * * 1' = Mondays 03:00)")
    return expr


def as_of_of(when: datetime) -> datetime:
    return datetime(when.year, when.month, when.day, tzinfo=timezone.utc)


def as_of_dates(job: Job, cfg: Config, first: datetime, last: datetime) -> list[datetime]:
    """One as-of per scheduled day in [first 00:00, last 24:00), in order (weekly: the
    Mondays; nightly: every day)."""
    times = croniter_range(first, last + timedelta(days=1) - timedelta(seconds=1), check_cron(job, cfg))
    return sorted({as_of_of(t) for t in times})


def latest(job: Job, cfg: Config, now: datetime) -> datetime:
    """The latest scheduled time at or before `now`."""
    return croniter(check_cron(job, cfg), now + timedelta(seconds=1)).get_prev(datetime)


def next_time(job: Job, cfg: Config, now: datetime) -> datetime:
    """The next scheduled time strictly after `now`."""
    return croniter(check_cron(job, cfg), now).get_next(datetime)


@dataclass
class Due:
    when: datetime  # the scheduled time
    job: str
    as_of: datetime


def due(cfg: Config, now: datetime) -> list[Due]:
    """Jobs whose latest scheduled run is not finished, in scheduled order."""
    out = []
    for job in JOBS.values():
        when = latest(job, cfg, now)
        state = load_state(state_path(cfg, job.name, as_of_of(when)))
        if not state or state["status"] != "finished":
            out.append(Due(when, job.name, as_of_of(when)))
    return sorted(out, key=lambda d: (d.when, d.job))


def run_command(d: Due, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs", "run", d.job, "--config", config, "--as-of", f"{d.as_of:%Y-%m-%d}",
            *overrides]


def launch(cmd: list[str]) -> int:
    """A separate process: a crash or an out-of-memory kill of a job cannot kill the scheduler."""
    return subprocess.run(cmd).returncode


def run_due(cfg: Config, config: str, overrides: list[str], now: datetime,
            launcher: Callable[[list[str]], int] = launch) -> list[tuple[Due, int]]:
    ran = []
    todo = due(cfg, now)
    if not todo:
        log.info("nothing due at %s", f"{now:%Y-%m-%d %H:%M} UTC")
    for d in todo:
        cmd = run_command(d, config, overrides)
        log.info("due: %s for %s (scheduled %s): %s", d.job, f"{d.as_of:%Y-%m-%d}", f"{d.when:%Y-%m-%d %H:%M}",
                 " ".join(cmd))
        rc = launcher(cmd)
        outcome = {0: "finished", 3: "skipped: another run holds the lock"}.get(rc, "FAILED; it resumes next time")
        (log.info if rc in (0, 3) else log.error)("%s %s: exit code %d (%s)", d.job, f"{d.as_of:%Y-%m-%d}", rc, outcome)
        ran.append((d, rc))
    return ran


def serve(cfg: Config, config: str, overrides: list[str], once: bool = False, now: datetime | None = None,
          launcher: Callable[[list[str]], int] = launch, sleep: Callable[[float], None] = time.sleep) -> None:
    """Run what is due, then sleep until the next scheduled time; forever unless `once`.
    `now` pins the clock of the first round (tests, replaying a missed time)."""
    for job in JOBS.values():
        log.info("%-15s cron %-12r (UTC)  %s", job.name, check_cron(job, cfg), job.description)
    while True:
        run_due(cfg, config, overrides, now or now_utc(), launcher)
        if once:
            return
        now = None
        wake = min(next_time(job, cfg, now_utc()) for job in JOBS.values())
        log.info("sleeping until %s", f"{wake:%Y-%m-%d %H:%M} UTC")
        while (left := (wake - now_utc()).total_seconds()) > 0:
            sleep(min(left, 300))  # short naps: a suspended laptop or clock change is noticed
