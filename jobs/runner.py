"""Run a job for one or more as-of dates: a lock per job so two runs never overlap, and a
small JSON state file per (job, as-of) that records finished steps, so that

- a finished (job, as-of) is skipped with a message unless forced (idempotent);
- a run killed or failed after some steps resumes at its first unfinished step;
- a second run while one holds the lock exits at once (`JobLocked`, exit code 3) having
  changed nothing.

State file: <workdir>/jobs/<job>/<YYYY-MM-DD>/state.json, written atomically:
    {"job", "as_of", "status": running|failed|finished, "attempts", "pid", "pid_started", "host", "started_at",
     "finished_at", "error", "steps": {name: {"status", "starts", "seconds", "result", ...}}}
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from common.errors import UserError
from features.config import DEMO_PSEUDONYM_KEY
from jobs.definitions import Context, Job
from pipeline.config import Config
from pipeline.paths import Paths

STATE = "state.json"
LOCKED_EXIT = 3


class JobLocked(UserError):
    """Another process is running this job; nothing was changed."""


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def _stamp() -> str:
    return now_utc().isoformat(timespec="seconds")


def parse_day(value: str, flag: str = "--as-of") -> datetime:
    """'YYYY-MM-DD' -> that day at 00:00 UTC (as-of dates are whole days, like cutoffs)."""
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r} is not a date; use YYYY-MM-DD (as-of is that day at 00:00 UTC)") from None
    return day.replace(tzinfo=timezone.utc)


def job_folder(cfg: Config, job: str, as_of: datetime) -> Path:
    return Paths.of(cfg).jobs / job / as_of.strftime("%Y-%m-%d")


def state_path(cfg: Config, job: str, as_of: datetime) -> Path:
    return job_folder(cfg, job, as_of) / STATE


def load_state(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save_state(path: Path, state: dict) -> None:
    from common.files import write_text_atomic

    state["updated_at"] = _stamp()
    write_text_atomic(json.dumps(state, indent=1, default=str), path)


def history(cfg: Config, job: str) -> list[dict]:
    """Every recorded run of `job`, newest as-of first."""
    root = Paths.of(cfg).jobs / job
    states = [load_state(p) for p in root.glob(f"*/{STATE}")] if root.exists() else []
    return sorted((s for s in states if s), key=lambda s: s["as_of"], reverse=True)


def process_started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat's 22nd field):
    with the pid, it names one process, where a pid alone is reused once its process is gone.
    None where /proc does not say (no such process, or not Linux)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after the command's name, from the 3rd
    except (OSError, ValueError, IndexError):
        return None


def shown_status(state: dict) -> str:
    """The status `jobs list` shows: the file's, except "killed" for a "running" run whose
    process is gone from this host (it died without a word; the next run resumes it), or whose
    pid now belongs to a process that started later (the pid was reused)."""
    if state["status"] != "running" or state.get("host") != socket.gethostname() or not state.get("pid"):
        return state["status"]
    try:
        os.kill(int(state["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return "killed"
    except (PermissionError, OverflowError, ValueError):  # another user's process: alive
        pass
    started = process_started(state["pid"])
    if state.get("pid_started") is not None and started is not None and started != state["pid_started"]:
        return "killed"
    return "running"


def _holder(path: Path) -> str:
    """' by pid P on HOST since T' from the lock holder's note, or '' when the note is
    missing or unreadable: the lock decides who runs, the note only names the holder."""
    try:
        h = json.loads(path.read_text())
        return f" by pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return ""


def check_pseudonym_key(cfg: Config) -> str | None:
    """The jobs are the production path: pseudonyms made with the public demo key can be
    reversed by anyone with a list of user ids. Refused when `jobs.require_pseudonym_key` is
    set (configs/production.yaml); elsewhere returns the warning to print (the simulator demo
    and the tests use the demo key on purpose), None when the key is not the demo one."""
    if cfg.features.pseudonym_key != DEMO_PSEUDONYM_KEY:
        return None
    fix = ("export ENGAGEMENT_PSEUDONYM_KEY=<a secret>, the same value on every run "
           "(a new key changes every pseudonym)")
    if cfg.jobs.require_pseudonym_key:
        raise UserError(f"config {cfg.name!r} uses the public demo pseudonym key because ENGAGEMENT_PSEUDONYM_KEY "
                        f"is not set; {fix}")
    return (f"warning: ENGAGEMENT_PSEUDONYM_KEY is not set: user ids are pseudonymised with the public demo key "
            f"{DEMO_PSEUDONYM_KEY!r}; fine for simulated data, never for real users: {fix}")


@contextmanager
def job_lock(cfg: Config, job: str) -> Iterator[None]:
    """Hold `<workdir>/jobs/<job>.lock` (zero timeout: a second run fails at once). The OS
    releases it when the holder dies, so a killed run never blocks the next one."""
    root = Paths.of(cfg).jobs
    path, holder = root / f"{job}.lock", root / f"{job}.lock.json"
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise JobLocked(f"{job} is already running (lock {path} held{_holder(holder)}); this run changed nothing. "
                        "Wait for it to finish, see `python -m jobs list`") from None
    try:
        from common.files import write_text_atomic

        write_text_atomic(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _stamp()}), holder)
        yield
    finally:
        lock.release()


def run_job(cfg: Config, job: Job, as_of: datetime, force: bool = False) -> dict:
    """Run (or resume) `job` for one as-of; the caller holds the job's lock. Returns the
    final state; raises what a step raised after recording it as the failure."""
    day = as_of.strftime("%Y-%m-%d")
    folder = job_folder(cfg, job.name, as_of)
    path = folder / STATE
    state = load_state(path)
    if state and state["status"] == "finished" and not force:
        print(f"{job.name} {day}: already finished at {state['finished_at']}; nothing to do "
              "(--force runs it again)", flush=True)
        return state | {"skipped": True}
    steps = [s.name for s in job.steps]
    if state is None or force or list(state.get("steps", {})) != steps:
        attempts = state["attempts"] if state else 0
        # A run done again (--force) keeps what each earlier finished run gave (which version it
        # promoted, which file it scored into): `jobs list` still says which week did what.
        earlier = list(state.get("earlier", [])) if state else []
        if state and state["status"] == "finished":
            earlier.append({"finished_at": state["finished_at"],
                            "results": {s: r["result"] for s, r in state["steps"].items() if "result" in r}})
        state = {"job": job.name, "as_of": as_of.isoformat(), "status": "pending", "attempts": attempts,
                 "started_at": None, "finished_at": None, "error": None, "earlier": earlier,
                 "steps": {s: {"status": "pending", "starts": 0} for s in steps}}
        print(f"{job.name} {day}: {'running again (--force)' if force and attempts else 'starting'}: "
              f"{' -> '.join(steps)}", flush=True)
    else:
        first = next((s for s in steps if state["steps"][s]["status"] != "finished"), "(none: all finished)")
        # "running" in the file while we hold the lock: that attempt died without a word (killed)
        last = "killed or lost" if state["status"] == "running" else f"{state['status']}: {state.get('error')}"
        print(f"{job.name} {day}: resuming at step {first!r} (the last attempt was {last})", flush=True)
    state.update(status="running", error=None, attempts=state["attempts"] + 1, pid=os.getpid(), host=socket.gethostname(),
                 pid_started=process_started(os.getpid()), started_at=state["started_at"] or _stamp())
    save_state(path, state)

    ctx = Context(cfg, job.name, as_of, folder)
    for i, step in enumerate(job.steps, 1):
        rec = state["steps"][step.name]
        if rec["status"] == "finished":
            ctx.results[step.name] = rec.get("result", {})
            continue
        print(f"\n=== {job.name} {day}: step {i}/{len(job.steps)} {step.name} " + "=" * 20, flush=True)
        rec.update(status="running", starts=rec["starts"] + 1, started_at=_stamp(), error=None)
        save_state(path, state)
        t0 = now_utc()
        try:
            result = step.run(ctx) or {}
        except BaseException as e:  # KeyboardInterrupt included: the state must say so
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rec.update(status="failed", error=message)
            state.update(status="failed", error=f"step {step.name}: {message}")
            save_state(path, state)
            raise
        rec.update(status="finished", finished_at=_stamp(), seconds=round((now_utc() - t0).total_seconds(), 1),
                   result=result)
        ctx.results[step.name] = result
        save_state(path, state)
    state.update(status="finished", finished_at=_stamp())
    save_state(path, state)
    took = ", ".join(f"{s} {r['seconds']}s" for s, r in state["steps"].items() if "seconds" in r)
    print(f"{job.name} {day}: finished ({took})", flush=True)
    return state


def run(cfg: Config, job: Job, dates: list[datetime], force: bool = False) -> list[dict]:
    """Run `job` for each as-of in order under one lock (a backfill is one run); stops at
    the first failure so later dates never run on top of a broken one."""
    if not dates:
        raise UserError(f"{job.name}: no scheduled date in that range (cron {job.cron(cfg)!r})")
    if (late := [d for d in dates if d > now_utc()]):  # its events are not all there yet
        if len(late) == len(dates):
            raise UserError(f"{job.name}: as-of {late[0]:%Y-%m-%d} is in the future (now {now_utc():%Y-%m-%d %H:%M} "
                            "UTC); run it once that day has begun, or the day would be marked finished on part of "
                            "its events")
        print(f"{job.name}: leaving out {len(late)} as-of date(s) from {late[0]:%Y-%m-%d} on: still in the future",
              flush=True)
        dates = [d for d in dates if d not in late]
    warning = check_pseudonym_key(cfg)  # refused before the lock: then no folder or lock is left behind
    with job_lock(cfg, job.name):  # a second run says "already running" and nothing else
        if warning:
            print(warning, file=sys.stderr)
        if len(dates) > 1:
            print(f"{job.name}: backfill of {len(dates)} as-of dates, {dates[0]:%Y-%m-%d} .. {dates[-1]:%Y-%m-%d}",
                  flush=True)
        return [run_job(cfg, job, d, force) for d in dates]
