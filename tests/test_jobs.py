"""The scheduled jobs (docs/design.md §9) on the tiny simulator (configs/test.yaml): crash and
resume of a real process, skip and --force, the lock between two real processes, the
champion under a failed evaluation and a failed gate, scores, backfill, `list`, `schedule --once`,
rollback and promote, file modes, the pseudonym key, and what reaches MLflow.

One weekly retrain is built once for the module (`trained`) and shared; tests that would
change it use other as-of dates or their own workdir."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import UserError
from jobs import definitions, runner
from jobs.cli import main
from jobs.definitions import Job, Step, retrain_config, stale_reason
from jobs.runner import load_state, parse_day, state_path
from jobs.schedule import serve
from pipeline.config import load_config
from pipeline.evaluation import registry

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/test.yaml"
WEEK = "2026-02-09"  # the module's weekly retrain: a Monday with 5 simulated weeks before it
LATER = "2026-02-16"  # another weekly retrain, after WEEK (its encoders are still fresh)
KEY = "s3cret-jobs-pseudonym-key"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("jobs")
    overrides = [f"workdir={root}/w", f"tracking.uri=sqlite:///{root}/mlflow.db",
                 f"features.text_encoder={tiny_encoder_dir}", "tracking.experiment=jobs", "train.epochs=1",
                 f"features.pseudonym_key={KEY}"]  # as if from $ENGAGEMENT_PSEUDONYM_KEY
    return SimpleNamespace(root=root, overrides=overrides, cfg=load_config(CONFIG, overrides))


def jobs(env, *args) -> int:
    """`python -m jobs ...` in this process (the CLI's own main)."""
    return main([*args, "--config", CONFIG, *env.overrides])


def jobs_cmd(overrides, *args) -> list[str]:
    return [sys.executable, "-m", "jobs", *args, "--config", CONFIG, *overrides]


def state_of(env, job: str, day: str) -> dict:
    return load_state(state_path(env.cfg, job, parse_day(day)))


@pytest.fixture(scope="module")
def trained(env):
    """A real `python -m jobs run weekly-retrain` process, SIGKILLed as soon as its state
    file shows the first step finished, then the same command again (in this process)."""
    path = state_path(env.cfg, "weekly-retrain", parse_day(WEEK))
    log = env.root / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(jobs_cmd(env.overrides, "run", "weekly-retrain", "--as-of", WEEK), cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        state = load_state(path)  # written atomically: never half a file
        if state and state["steps"]["features"]["status"] == "finished":
            break
        assert proc.poll() is None, f"the job ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the features step did not finish in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    feature_file = Path(env.cfg.workdir) / "jobs" / "weekly-retrain" / WEEK / "features" / "features.h5"
    at_kill, mtime = load_state(path), feature_file.stat().st_mtime_ns
    out = io.StringIO()
    with redirect_stdout(out):
        rc = jobs(env, "run", "weekly-retrain", "--as-of", WEEK)
    return SimpleNamespace(killed_rc=proc.returncode, at_kill=at_kill, feature_file=feature_file, mtime=mtime,
                           rc=rc, output=out.getvalue(), state=load_state(path))


def test_killed_run_resumes_at_its_first_unfinished_step(trained, env):
    assert trained.killed_rc == -signal.SIGKILL
    at_kill = trained.at_kill
    assert at_kill["status"] == "running" and at_kill["attempts"] == 1  # killed: nobody recorded an end
    assert runner.shown_status(at_kill) == "killed"  # what `jobs list` shows: its process is gone
    assert runner.shown_status(at_kill | {"pid": os.getpid(), "pid_started": None}) == "running"  # a live one (state before pid_started)
    assert runner.shown_status(at_kill | {"host": "another-host"}) == "running"  # can't tell from here
    assert at_kill["pid_started"] is not None  # (Linux: /proc says when the process started)
    ours = at_kill | {"pid": os.getpid(), "pid_started": runner.process_started(os.getpid())}
    assert runner.shown_status(ours) == "running"
    assert runner.shown_status(ours | {"pid_started": ours["pid_started"] - 1}) == "killed"  # its pid, reused
    done_before = [s for s, r in at_kill["steps"].items() if r["status"] == "finished"]
    first_unfinished = next(s for s, r in at_kill["steps"].items() if r["status"] != "finished")
    assert done_before[0] == "features"

    assert trained.rc == 0, trained.output
    assert f"resuming at step '{first_unfinished}'" in trained.output
    assert "step 1/4 features" not in trained.output  # not redone ...
    assert trained.feature_file.stat().st_mtime_ns == trained.mtime  # ... and its output untouched
    s = trained.state
    assert s["status"] == "finished" and s["attempts"] == 2
    assert all(s["steps"][name]["starts"] == 1 for name in done_before)
    assert all(r["status"] == "finished" for r in s["steps"].values())
    assert s["steps"]["evaluate"]["result"]["promoted"]  # the first model becomes champion
    assert str(registry.champion_version(env.cfg).version) == s["steps"]["evaluate"]["result"]["version"]


def test_finished_job_is_skipped_and_changes_nothing(trained, env, capsys):
    path = state_path(env.cfg, "weekly-retrain", parse_day(WEEK))
    before = path.read_bytes()
    assert jobs(env, "run", "weekly-retrain", "--as-of", WEEK) == 0
    assert f"weekly-retrain {WEEK}: already finished" in capsys.readouterr().out
    assert path.read_bytes() == before
    assert trained.feature_file.stat().st_mtime_ns == trained.mtime


def test_an_as_of_off_the_schedule_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(definitions.JOBS, "weekly-retrain", recording_job("weekly-retrain", []))
    other = SimpleNamespace(overrides=[f"workdir={tmp_path}/w"])
    assert jobs(other, "run", "weekly-retrain", "--as-of", "2026-02-10") == 0  # a Tuesday
    assert "2026-02-10 is not a scheduled as-of of weekly-retrain (cron '0 3 * * 1')" in capsys.readouterr().err
    assert jobs(other, "run", "weekly-retrain", "--as-of", "2026-02-09", "--force") == 0  # a Monday
    assert "not a scheduled as-of" not in capsys.readouterr().err


def test_an_as_of_in_the_future_is_refused_before_anything_runs(env, capsys):
    # A typo of a year would otherwise score on part of the events and mark that day finished,
    # so the real run of that day would find nothing to do.
    assert jobs(env, "run", "nightly-score", "--as-of", "2099-03-04") == 2
    assert "as-of 2099-03-04 is in the future" in capsys.readouterr().err
    assert state_of(env, "nightly-score", "2099-03-04") is None


def test_a_job_after_the_feed_stopped_fails_saying_so_and_moves_nothing(trained, env, capsys):
    newest = pd.Timestamp(json.loads((Path(env.cfg.workdir) / "validated" / "validation.json").read_text())["ts_max"])
    late = (newest + pd.Timedelta(days=30)).strftime("%Y-%m-%d")  # the log has no event in its last 30 days
    champion = registry.champion_version(env.cfg)
    for job in ("nightly-score", "weekly-retrain"):
        assert jobs(env, "run", job, "--as-of", late) == 2
        assert "has the event feed stopped?" in capsys.readouterr().err
        state = state_of(env, job, late)
        assert state["status"] == "failed" and "jobs.max_event_lag_days=7" in state["error"]
    assert registry.champion_version(env.cfg) == champion
    assert not (Path(env.cfg.workdir) / "scores" / f"scores-{late}.parquet").exists()


def eligible_users(cfg, as_of: pd.Timestamp) -> set[str]:
    """Independently of the pipeline: program started and >= 1 event before as_of."""
    users = pd.read_parquet(cfg.data.users)
    events = pd.read_parquet(cfg.data.events, columns=["user_id", "ts"])
    started = set(users.loc[users.program_start <= as_of, "user_id"])
    return started & set(events.loc[events.ts < as_of, "user_id"])


def test_nightly_scores_eligible_users_ranked_with_the_champion_and_force_reruns(trained, env, capsys):
    day = "2026-01-20"  # programs start until 01-25: some users are not eligible yet
    as_of = pd.Timestamp(day, tz="UTC")
    assert jobs(env, "run", "nightly-score", "--as-of", day) == 0
    out = Path(env.cfg.workdir) / "scores" / f"scores-{day}.parquet"
    df = pd.read_parquet(out)
    expected = eligible_users(env.cfg, as_of)
    assert 0 < len(expected) < pd.read_parquet(env.cfg.data.users).shape[0]
    assert set(df.user_id) == expected and len(df) == len(expected)  # raw ids, one row each
    assert sorted(df["rank"]) == list(range(1, len(df) + 1))
    by_rank = df.sort_values("rank")
    assert by_rank.risk.is_monotonic_decreasing  # rank 1 = highest risk
    assert df.risk.between(0, 1).all()
    assert (df.as_of == as_of).all()
    plain = out.parent / "plain"  # coaches' tools run as other users: the mode a plain open gives
    plain.write_bytes(b"")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    champion = registry.champion_version(env.cfg)
    assert set(df.model_version) == {str(champion.version)} and set(df.run_id) == {champion.run_id}
    assert state_of(env, "nightly-score", day)["steps"]["score"]["result"]["users"] == len(df)

    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    assert jobs(env, "run", "nightly-score", "--as-of", day) == 0
    assert "already finished" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    assert jobs(env, "run", "nightly-score", "--as-of", day, "--force") == 0
    assert out.stat().st_mtime_ns != mtime
    s = state_of(env, "nightly-score", day)
    assert s["status"] == "finished" and s["attempts"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out), df)  # same inputs, same scores
    # What the run before --force gave stays in the state, and `jobs list` says it.
    assert [e["results"]["score"]["users"] for e in s["earlier"]] == [len(df)]
    capsys.readouterr()
    assert jobs(env, "list") == 0
    assert f"earlier run, finished {s['earlier'][0]['finished_at']}:  {len(df)} users, model version" in capsys.readouterr().out


def test_a_streamed_validation_is_scored_partition_by_partition_to_the_same_scores(trained, env, tmp_path):
    from pipeline.evaluation.score import score

    raw = Path(env.cfg.data.events).parent  # the module's simulated log, read as files
    inputs = [*env.overrides, "data.source=files", f"data.events={raw / 'events.parquet'}",
              f"data.users={raw / 'users.parquet'}", f"data.foods={raw / 'foods.parquet'}", "data.truth=null"]
    day = "2026-01-20"  # some users not eligible yet: parts with few or none
    whole = pd.read_parquet(score(load_config(CONFIG, [*inputs, f"workdir={tmp_path / 'a'}"]), day, tmp_path / "a.parquet"))
    parts = load_config(CONFIG, [*inputs, f"workdir={tmp_path / 'b'}", "data.stream_partitions=4"])
    split = pd.read_parquet(score(parts, day, tmp_path / "b.parquet"))
    assert sorted(p.name for p in (tmp_path / "b" / "scoring" / day).iterdir()) == [
        f"part-{p:03d}-of-004" for p in range(4)]  # one scoring build per partition
    assert len(whole) > 10 and set(split.user_id) == set(whole.user_id) and len(split) == len(whole)
    w, s = whole.set_index("user_id"), split.set_index("user_id").loc[whole.user_id]
    np.testing.assert_allclose(s.risk, w.risk, rtol=0, atol=1e-6)  # padding differs by batch: float rounding
    assert sorted(split["rank"]) == list(range(1, len(split) + 1)) and split.sort_values("rank").risk.is_monotonic_decreasing


def test_failed_score_write_leaves_no_partial_file(trained, env, monkeypatch):
    import pyarrow.parquet as pq

    real = pq.write_table

    def disk_full(table, where, *a, **k):
        if Path(where).name.startswith(".scores-"):
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("No space left on device")
        return real(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", disk_full)
    day = "2026-01-21"
    assert jobs(env, "run", "nightly-score", "--as-of", day) == 1
    scores = Path(env.cfg.workdir) / "scores"
    assert not (scores / f"scores-{day}.parquet").exists()
    assert not list(scores.glob(f".scores-{day}*"))  # no temporary left behind either
    s = state_of(env, "nightly-score", day)
    assert s["status"] == "failed" and s["steps"]["score"]["status"] == "failed"
    assert "No space left on device" in s["error"]


def test_failed_score_logging_leaves_no_score_file(trained, env, monkeypatch):
    import pipeline.evaluation.score as S

    def unavailable(*a, **k):
        raise RuntimeError("tracking server unavailable")

    monkeypatch.setattr(S, "_log", unavailable)
    day = "2026-01-22"
    assert jobs(env, "run", "nightly-score", "--as-of", day) == 1
    scores = Path(env.cfg.workdir) / "scores"
    assert not (scores / f"scores-{day}.parquet").exists()  # no file that no MLflow run accounts for
    assert not list(scores.glob(f".scores-{day}*"))
    assert "tracking server unavailable" in state_of(env, "nightly-score", day)["error"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_a_plain_open_would_give(tmp_path, mask):
    from common.files import write_text_atomic
    from features.io import write_parquet_atomic

    old = os.umask(mask)
    try:
        text, table, plain = tmp_path / "a.json", tmp_path / "a.parquet", tmp_path / "plain"
        write_text_atomic("{}", text)
        write_parquet_atomic(pd.DataFrame({"risk": [0.5]}), table)
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in (text, table, plain)} == {0o666 & ~mask}


def test_failed_evaluation_never_moves_the_champion_and_a_rerun_resumes(trained, env, monkeypatch, capsys):
    import mlflow

    import pipeline.evaluation.evaluate as E

    before = registry.champion_version(env.cfg)
    client = mlflow.MlflowClient(env.cfg.tracking.uri)
    versions = len(client.search_model_versions(f"name='{env.cfg.tracking.model_name}'"))

    def unavailable(*a, **k):  # metrics computed, then MLflow fails: just before the gate
        raise RuntimeError("tracking server unavailable")

    monkeypatch.setattr(E, "_log", unavailable)
    day = LATER
    assert jobs(env, "run", "weekly-retrain", "--as-of", day) == 1
    after = registry.champion_version(env.cfg)
    assert (str(after.version), after.run_id) == (str(before.version), before.run_id)
    assert len(client.search_model_versions(f"name='{env.cfg.tracking.model_name}'")) == versions
    s = state_of(env, "weekly-retrain", day)
    assert s["status"] == "failed" and "tracking server unavailable" in s["error"]
    assert [r["status"] for r in s["steps"].values()] == ["finished", "finished", "finished", "failed"]

    monkeypatch.undo()  # the server is back: the rerun only evaluates
    capsys.readouterr()
    assert jobs(env, "run", "weekly-retrain", "--as-of", day) == 0
    assert "resuming at step 'evaluate'" in capsys.readouterr().out
    s = state_of(env, "weekly-retrain", day)
    assert s["status"] == "finished" and [r["starts"] for r in s["steps"].values()] == [1, 1, 1, 2]
    gate = s["steps"]["evaluate"]["result"]
    assert gate["champion_before"] == str(before.version)
    now = str(registry.champion_version(env.cfg).version)
    assert now == (gate["version"] if gate["promoted"] else str(before.version))


def week_version(env, trained) -> str:
    """Make WEEK's model the champion again (other tests may have promoted another)."""
    version = trained.state["steps"]["evaluate"]["result"]["version"]
    assert jobs(env, "rollback", "--version", version) == 0
    return version


def test_kept_champion_is_recorded_as_a_real_bool_and_listed_as_kept(trained, env, monkeypatch, capsys):
    from features.dataset import load_examples

    champion = week_version(env, trained)

    def perfect(model, files, rows):  # the champion ranks every val example right
        return load_examples(files)[0]["label"][rows].astype(float)

    monkeypatch.setattr(registry, "score_on", perfect)
    assert jobs(env, "run", "weekly-retrain", "--as-of", LATER, "--force") == 0
    path = state_path(env.cfg, "weekly-retrain", parse_day(LATER))
    gate = json.loads(path.read_text())["steps"]["evaluate"]["result"]
    assert gate["promoted"] is False and gate["reason"] == "champion is as good or better"
    assert gate["champion"] == 1.0 and gate["champion_before"] == champion
    assert str(registry.champion_version(env.cfg).version) == champion
    capsys.readouterr()
    assert jobs(env, "list") == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"  {LATER}  finished"))
    assert f"kept champion, version {champion}; candidate version " in line and "promoted version" not in line


def test_a_failure_in_the_gate_fails_the_step_and_keeps_the_champion(trained, env, monkeypatch):
    champion = week_version(env, trained)

    def out_of_memory(*a, **k):  # re-scoring the champion fails for a reason unrelated to the model
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(registry, "score_on", out_of_memory)
    assert jobs(env, "run", "weekly-retrain", "--as-of", LATER, "--force") == 1
    current = registry.champion_version(env.cfg)
    assert str(current.version) == champion and current.run_id == trained.state["steps"]["train"]["result"]["run_id"]
    s = state_of(env, "weekly-retrain", LATER)
    assert s["status"] == "failed" and s["steps"]["evaluate"]["status"] == "failed"
    assert "CUDA out of memory" in s["error"]


def test_pretrain_runs_again_only_when_the_encoders_are_stale(trained, env, tmp_path, monkeypatch):
    import json

    from features.dataset import model_config_for
    from features.store import read_meta
    from models.checkpoint import save_encoder
    from models.encoders import ENCODERS

    as_of = parse_day(WEEK)
    rcfg = retrain_config(env.cfg, as_of)
    pdir = tmp_path / "pretrain"  # encoders that fit this week's store, apart from the shared ones
    rcfg.pretrain.dir = str(pdir)
    mcfg = model_config_for(rcfg.model, read_meta(trained.feature_file))
    for stream in ("conversation", "food", "events"):
        save_encoder(ENCODERS[stream](mcfg), mcfg, pdir / f"{stream}.pt")
    stamp = pdir / definitions.PRETRAIN_STAMP
    stamp.write_text(json.dumps({"as_of": as_of.isoformat()}))
    assert stale_reason(rcfg, as_of) is None
    assert stale_reason(rcfg, as_of + timedelta(days=28)) is None
    assert "29 days old" in stale_reason(rcfg, as_of + timedelta(days=29))
    assert "after this as-of" in stale_reason(rcfg, as_of - timedelta(days=7))  # a backfill must not see the future
    # A log without messages: pretraining writes no conversation encoder, and none is missing.
    import features.dataset

    real = features.dataset.load_examples

    def without_messages(files):
        examples, *rest = real(files)
        return (examples | {"conversation_end": examples["conversation_end"] * 0}, *rest)

    (pdir / "conversation.pt").rename(tmp_path / "conversation.pt")
    assert stale_reason(rcfg, as_of).startswith("no pretrained conversation encoder")
    with monkeypatch.context() as m:
        m.setattr(features.dataset, "load_examples", without_messages)
        assert stale_reason(rcfg, as_of) is None
    (tmp_path / "conversation.pt").rename(pdir / "conversation.pt")

    food = torch.load(pdir / "food.pt", weights_only=True)
    food["config"]["n_foods"] -= 1  # as if the vocabulary had grown since pretraining
    torch.save(food, pdir / "food.pt")
    assert "food encoder no longer fits" in stale_reason(rcfg, as_of)
    stamp.unlink()
    assert "unknown which data" in stale_reason(rcfg, as_of)
    (pdir / "events.pt").unlink()
    assert stale_reason(rcfg, as_of).startswith("no pretrained events encoder")


def recording_job(name: str, calls: list, fail_on: str | None = None) -> Job:
    def step(label):
        def run(ctx):
            if ctx.day == fail_on:
                raise RuntimeError(f"disk on fire at {ctx.day}")
            calls.append((label, ctx.day))
            return {"ok": True}
        return run
    cron = "weekly_retrain_cron" if name == "weekly-retrain" else "nightly_score_cron"
    return Job(name, "records its calls", cron, (Step("first", step("first")), Step("second", step("second"))))


def test_backfill_runs_one_as_of_per_scheduled_date_in_order(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(definitions.JOBS, "weekly-retrain", recording_job("weekly-retrain", calls))
    monkeypatch.setitem(definitions.JOBS, "nightly-score", recording_job("nightly-score", calls))
    env = SimpleNamespace(overrides=[f"workdir={tmp_path}/w"])
    mondays = ["2026-01-05", "2026-01-12", "2026-01-19", "2026-01-26"]
    assert jobs(env, "run", "weekly-retrain", "--from", "2026-01-01", "--to", "2026-01-31") == 0
    assert calls == [(step, d) for d in mondays for step in ("first", "second")]
    calls.clear()
    assert jobs(env, "run", "weekly-retrain", "--from", "2026-01-05", "--to", "2026-01-26") == 0  # idempotent
    assert calls == [] and capsys.readouterr().out.count("already finished") == 4

    assert jobs(env, "run", "nightly-score", "--from", "2026-01-30", "--to", "2026-02-02") == 0
    assert [d for s, d in calls if s == "first"] == ["2026-01-30", "2026-01-31", "2026-02-01", "2026-02-02"]

    calls.clear()  # the cron expression comes from the config: Wednesdays here
    wed = SimpleNamespace(overrides=[f"workdir={tmp_path}/wed", "jobs.weekly_retrain_cron=0 3 * * 3"])
    assert jobs(wed, "run", "weekly-retrain", "--from", "2026-01-01", "--to", "2026-01-15") == 0
    assert [d for s, d in calls if s == "first"] == ["2026-01-07", "2026-01-14"]

    calls.clear()  # a failure stops the backfill: later dates never run on top of it
    monkeypatch.setitem(definitions.JOBS, "weekly-retrain", recording_job("weekly-retrain", calls, "2026-02-09"))
    assert jobs(env, "run", "weekly-retrain", "--from", "2026-02-01", "--to", "2026-02-28") == 1
    assert [d for s, d in calls if s == "first"] == ["2026-02-02"]
    cfg = load_config(CONFIG, env.overrides)
    assert load_state(state_path(cfg, "weekly-retrain", parse_day("2026-02-09")))["status"] == "failed"
    assert load_state(state_path(cfg, "weekly-retrain", parse_day("2026-02-16"))) is None

    calls.clear()  # a range that ends in the future: its past dates run, the future ones are left out
    monkeypatch.setattr(runner, "now_utc", lambda: parse_day("2026-03-04"))
    assert jobs(env, "run", "nightly-score", "--from", "2026-03-03", "--to", "2026-03-09") == 0
    assert [d for s, d in calls if s == "first"] == ["2026-03-03", "2026-03-04"]
    assert "leaving out 5 as-of date(s) from 2026-03-05 on: still in the future" in capsys.readouterr().out


def test_the_feed_check_reads_a_report_of_naive_times_as_utc(tmp_path):
    vdir = tmp_path / "validated"
    vdir.mkdir()
    (vdir / "validation.json").write_text(json.dumps({"ts_max": "2026-01-01 12:00:00"}))  # no zone: UTC
    cfg = load_config(CONFIG, [f"workdir={tmp_path}/w", f"data.events={vdir}", "data.source=files"])
    definitions.check_feed(cfg, parse_day("2026-01-08"), vdir)  # 6.5 days: fine
    with pytest.raises(UserError, match="7.5 days after the newest event"):
        definitions.check_feed(cfg, parse_day("2026-01-09"), vdir)


HOLDER = """
import sys, time
from pathlib import Path
from jobs import runner
from jobs.definitions import Job, Step
from pipeline.config import load_config

cfg = load_config("configs/test.yaml", [f"workdir={sys.argv[1]}"])
release = Path(sys.argv[2])

def hold(ctx):
    while not release.exists():
        time.sleep(0.05)

runner.run(cfg, Job("weekly-retrain", "holds the lock", "weekly_retrain_cron", (Step("features", hold),)),
           [runner.parse_day("2026-02-09")])
"""


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_second_run_exits_at_once_while_the_first_holds_the_lock(tmp_path):
    workdir, release = tmp_path / "w", tmp_path / "release"
    cfg = load_config(CONFIG, [f"workdir={workdir}"])
    path = state_path(cfg, "weekly-retrain", parse_day("2026-02-09"))
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(release)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ((s := load_state(path)) and s["steps"]["features"]["status"] == "running"):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        before = snapshot(workdir)
        t0 = time.monotonic()
        second = subprocess.run(jobs_cmd([f"workdir={workdir}"], "run", "weekly-retrain", "--as-of", "2026-02-09"),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert first.poll() is None  # the first still held the lock throughout
        assert second.returncode == 3, second.stderr
        assert "weekly-retrain is already running" in second.stderr and f"pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1  # one line, no traceback
        assert took < 30  # at once: no waiting for the lock, no pipeline work
        assert snapshot(workdir) == before  # nothing changed
    finally:
        release.touch()
        first.wait(timeout=60)
    assert first.returncode == 0 and load_state(path)["status"] == "finished"
    env = SimpleNamespace(overrides=[f"workdir={workdir}"])
    assert jobs(env, "run", "weekly-retrain", "--as-of", "2026-02-09") == 0  # released: runs (and skips)


def test_an_unreadable_lock_note_still_gives_the_one_line_locked_error(tmp_path, capsys):
    from filelock import FileLock

    from pipeline.paths import Paths

    env = SimpleNamespace(overrides=[f"workdir={tmp_path}/w"])
    root = Paths.of(load_config(CONFIG, env.overrides)).jobs
    root.mkdir(parents=True)
    (root / "weekly-retrain.lock.json").write_text('{"pid": 41')  # a holder killed mid-write
    with FileLock(root / "weekly-retrain.lock"):
        assert jobs(env, "run", "weekly-retrain", "--as-of", "2026-02-09") == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: weekly-retrain is already running") and "\n" not in err


def test_jobs_warn_on_the_demo_pseudonym_key_and_the_production_config_refuses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ENGAGEMENT_PSEUDONYM_KEY", raising=False)
    calls: list = []
    monkeypatch.setitem(definitions.JOBS, "weekly-retrain", recording_job("weekly-retrain", calls))
    demo = SimpleNamespace(overrides=[f"workdir={tmp_path}/demo"])
    assert jobs(demo, "run", "weekly-retrain", "--as-of", "2026-02-09") == 0  # the demo runs, warned
    assert "warning: ENGAGEMENT_PSEUDONYM_KEY is not set" in capsys.readouterr().err and len(calls) == 2

    production = ["run", "weekly-retrain", "--as-of", "2026-02-09", "--config", "configs/production.yaml",
                  f"workdir={tmp_path}/prod"]
    assert main(production) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config 'production' uses the public demo pseudonym key") and "\n" not in err
    assert "export ENGAGEMENT_PSEUDONYM_KEY" in err and len(calls) == 2  # nothing ran
    assert not (tmp_path / "prod").exists()  # nor made a folder or took the lock

    monkeypatch.setenv("ENGAGEMENT_PSEUDONYM_KEY", "s3cret")
    assert main(production) == 0 and len(calls) == 4
    assert "ENGAGEMENT_PSEUDONYM_KEY" not in capsys.readouterr().err

    # The setting refuses, not the config's name: a copy of the template under another name too.
    monkeypatch.delenv("ENGAGEMENT_PSEUDONYM_KEY")
    assert main([*production, "name=acme"]) == 2 and len(calls) == 4
    assert capsys.readouterr().err.startswith("error: config 'acme' uses the public demo pseudonym key")


def test_no_raw_user_ids_message_text_or_key_reach_mlflow_from_the_jobs(trained, env):
    import mlflow

    assert jobs(env, "run", "nightly-score", "--as-of", "2026-01-23") == 0
    client = mlflow.MlflowClient(env.cfg.tracking.uri)
    exp = client.get_experiment_by_name(env.cfg.tracking.experiment)
    stages = {r.data.tags.get("stage") for r in client.search_runs([exp.experiment_id])}
    assert {"pretrain", "train", "score"} <= stages  # the scan below covers every job's runs
    blob = (env.root / "mlflow.db").read_bytes()
    for f in (env.root / "mlartifacts").rglob("*"):
        if f.is_file():
            blob += f.read_bytes()
    events = pd.read_parquet(env.cfg.data.events)
    users = events.user_id.dropna().unique()
    assert not [u for u in users if u.encode() in blob]
    texts = events.text.dropna()
    long_texts = texts[texts.str.len() > 25].unique()[:300]
    assert len(long_texts) > 50 and not [t for t in long_texts if t.encode() in blob]
    assert KEY.encode() not in blob


def test_list_shows_schedules_and_last_runs(trained, env, tmp_path, monkeypatch, capsys):
    capsys.readouterr()
    assert jobs(env, "list") == 0
    out = capsys.readouterr().out
    assert "weekly-retrain  cron '0 3 * * 1' (UTC)  next due" in out and "nightly-score  cron '0 2 * * *'" in out
    assert f"  {WEEK}  finished  steps 4/4  attempts 2" in out and "promoted version" in out

    monkeypatch.setitem(definitions.JOBS, "weekly-retrain", recording_job("weekly-retrain", [], "2026-02-09"))
    other = SimpleNamespace(overrides=[f"workdir={tmp_path}/w"])
    assert jobs(other, "run", "weekly-retrain", "--as-of", "2026-02-09") == 1
    capsys.readouterr()
    assert jobs(other, "list") == 0
    out = capsys.readouterr().out
    assert "2026-02-09  failed    steps 0/2  attempts 1" in out and "step first: RuntimeError: disk on fire" in out
    assert "nightly-score" in out and "no runs yet" in out


def test_schedule_runs_due_jobs_in_scheduled_order(tmp_path):
    cfg = load_config(CONFIG, [f"workdir={tmp_path}/w"])
    launched: list = []

    def launcher(cmd):
        launched.append((cmd[4], cmd[cmd.index("--as-of") + 1]))
        return 0

    serve(cfg, CONFIG, [], once=True, now=parse_day("2026-02-16") + timedelta(hours=3, minutes=30), launcher=launcher)
    assert launched == [("nightly-score", "2026-02-16"), ("weekly-retrain", "2026-02-16")]  # 02:00, then 03:00
    launched.clear()  # Monday 02:30: the retrain due is last week's
    serve(cfg, CONFIG, [], once=True, now=parse_day("2026-02-16") + timedelta(hours=2, minutes=30), launcher=launcher)
    assert launched == [("weekly-retrain", "2026-02-09"), ("nightly-score", "2026-02-16")]


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_schedule_once_runs_a_due_job_as_a_subprocess(trained, env):
    weekly_before = state_of(env, "weekly-retrain", WEEK)
    # Tuesday 02:30: the nightly score of 2026-02-10 is due; the retrain of Monday is done.
    assert jobs(env, "schedule", "--once", "--now", "2026-02-10T02:30") == 0
    s = state_of(env, "nightly-score", "2026-02-10")
    assert s["status"] == "finished" and s["pid"] != os.getpid()  # ran in its own process
    assert Path(s["steps"]["score"]["result"]["scores"]).exists()
    assert state_of(env, "weekly-retrain", WEEK) == weekly_before  # finished: not due, not run


def test_rollback_points_the_champion_back(trained, env, capsys):
    first = trained.state["steps"]["evaluate"]["result"]["version"]
    assert jobs(env, "rollback", "--version", first) == 0
    assert str(registry.champion_version(env.cfg).version) == first
    assert jobs(env, "rollback", "--version", "999") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'engagement-test' has no version 999") and "\n" not in err


def test_promote_moves_the_champion_by_hand(trained, env, capsys):
    from pipeline import tracking

    first = trained.state["steps"]["evaluate"]["result"]["version"]
    run = tracking.client(env.cfg).create_run(tracking.setup(env.cfg))
    mv = registry.register(env.cfg, run.info.run_id)  # a version the gate never saw
    capsys.readouterr()
    assert jobs(env, "promote", "--version", str(mv.version)) == 0
    assert str(registry.champion_version(env.cfg).version) == str(mv.version)
    assert "version" in capsys.readouterr().out
    assert jobs(env, "promote", "--version", first) == 0  # and back, for the tests after this one
    assert str(registry.champion_version(env.cfg).version) == first
    assert jobs(env, "promote", "--version", "999") == 2


def test_shipped_crontab_runs_every_job_on_the_configured_schedule():
    from jobs.definitions import JOBS
    from pipeline.config import JobsConfig

    lines = [ln.split() for ln in (REPO / "jobs" / "crontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    schedule = {ln[ln.index("run") + 1]: " ".join(ln[:5]) for ln in lines}
    assert schedule == {name: getattr(JobsConfig(), job.cron_key) for name, job in JOBS.items()}
    assert all("--as-of" in ln and "jobs" in ln for ln in lines)


def test_the_retrain_reports_where_champion_points_when_the_blend_is_promoted_after_the_model(monkeypatch):
    """With eval.champion_blend the blend is gated after the model: the step's `promoted` and
    `version` are the last promotion's (where `champion` points), each gate is recorded."""
    from pipeline.evaluation import evaluate as E

    def gate(promoted, version, candidate, reason):
        return registry.GateDecision(promoted, version, candidate, 0.8, "1", reason)

    model = gate(False, "2", 0.79, "champion is as good or better")
    decisions = {"model": model, "blend": gate(True, "3", 0.81, "candidate is better")}
    monkeypatch.setattr(E, "evaluate", lambda cfg: E.EvalResult("run", {}, model, decisions))
    monkeypatch.setattr(definitions, "retrain_config", lambda cfg, as_of: cfg)
    r = definitions.evaluate_step(SimpleNamespace(cfg=None, as_of=None))
    assert r["promoted"] is True and r["version"] == "3" and r["reason"] == "candidate is better"
    assert r["candidate"] == 0.79 and r["champion_before"] == "1"  # the sequence model's own gate
    assert r["gates"] == {"model": {"promoted": False, "version": "2", "candidate": 0.79, "reason": "champion is as good or better"},
                          "blend": {"promoted": True, "version": "3", "candidate": 0.81, "reason": "candidate is better"}}
    json.dumps(r)  # the job's state file takes it as it is
    decisions["blend"] = gate(False, "3", 0.78, "champion is as good or better")
    r = definitions.evaluate_step(SimpleNamespace(cfg=None, as_of=None))
    assert r["promoted"] is False and r["version"] == "2"  # nothing moved: the model's own record


def test_the_weekly_features_step_builds_every_shard_each_from_its_own_partitions(sim_store_files, tiny_encoder,
                                                                                 tmp_path, monkeypatch):
    """With a streamed validation and features.num_shards, the weekly retrain builds every shard,
    each reading only its partitions though the log is cut at the as-of (data.until), and the
    set holds what one unsharded build of that week does."""
    import pipeline.data.features as F
    from features.stream import PARTITIONS, partition_name
    from jobs.definitions import Context, features_step
    from tests.test_scale import assert_same_examples

    _, base = sim_store_files
    inputs = [f"features.text_encoder={tiny_encoder.name}", "data.source=files", f"data.events={base.data.events}",
              f"data.users={base.data.users}", "data.foods=null"]
    as_of = parse_day(LATER)

    def step(name: str, *overrides) -> list[Path]:
        cfg = load_config(CONFIG, [f"workdir={tmp_path / name}", *inputs, *overrides])
        return [Path(f) for f in features_step(Context(cfg, "weekly-retrain", as_of, tmp_path))["feature_files"]]

    whole = step("one")
    reads = []
    real = F.pq.read_table
    monkeypatch.setattr(F.pq, "read_table", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    shards = step("two", "data.stream_partitions=2", "features.num_shards=2")
    dated = tmp_path / "two" / "jobs" / "weekly-retrain" / LATER / "features"
    assert [f.name for f in whole] == ["features.h5"] and shards == [dated / "features-000-of-002.h5",
                                                                      dated / "features-001-of-002.h5"]
    validated = tmp_path / "two" / "validated" / PARTITIONS
    assert [r for r in reads if "part-" in r] == [str(validated / partition_name(p, 2)) for p in range(2)]
    assert_same_examples(whole[0], shards, load_config(CONFIG, [f"workdir={tmp_path / 'one'}", *inputs]))
