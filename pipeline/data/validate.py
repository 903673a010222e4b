"""The validate stage: validate `data.events` (and `data.users`) against the contract, or
reuse validated events that are still current. The rules are features/validate.py's."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from common import stamps
from common.errors import UserError
from features import contract as C
from features import stream
from features import validate as V
from features.io import fingerprint, read_table, write_parquet_atomic
from pipeline.config import Config, save_config
from pipeline.data.sources import ensure_raw
from pipeline.paths import Paths

log = logging.getLogger(__name__)


def ensure_validated(cfg: Config, now: pd.Timestamp | None = None) -> Path:
    """The folder of validated events for `data.events`: the input itself when it already
    is one, the cached <workdir>/validated when it was validated from the same files (same
    fingerprint) under the same validation settings and no row it quarantined as in the
    future is due by `now` (default: the clock), else a fresh validation."""
    ensure_raw(cfg)
    settings = V.validation_settings(cfg.data)
    given = Path(cfg.data.events)
    if given.is_dir() and (given / V.REPORT).exists():
        used = json.loads((given / V.REPORT).read_text()).get("settings")
        if used != settings:  # the raw rows are not here: it can only be used as it is
            log.warning("%s was validated with %s, not this config's %s; using it as it is (validate the "
                        "raw events again to apply the new settings)", given, used, settings)
        return given
    out = Paths.of(cfg).validated
    source, files = _sources(cfg)
    source_fp = fingerprint(files)  # a read of every input file: once per command
    fp = _fingerprint(source, source_fp, settings)
    old = stamps.is_current(out / V.REPORT, fp) if V.validated_events(out).exists() else None
    if old is not None and V.future_rows_now_due(old, cfg.data, now):
        log.info("rows quarantined as future_timestamp (from %s) are no longer in the future: validating again",
                 old.get("earliest_future_ts"))
    elif old is not None:
        log.info("validated events are up to date: %s", out)
        return out
    elif (out / V.REPORT).exists():
        log.info("the input files or the validation settings (now %s) changed: validating again", settings)
    return validate_stage(cfg, out, now, source_fp)


def _sources(cfg: Config) -> tuple[dict, list[str]]:
    """Which inputs validation reads: as recorded in validation.json, and as files."""
    source = {"events": cfg.data.events, "users": cfg.data.users}
    if cfg.data.stream_partitions:  # another layout of the same rows
        source["stream_partitions"] = cfg.data.stream_partitions
    return source, [cfg.data.events] + ([cfg.data.users] if cfg.data.users else [])


def _fingerprint(source: dict, source_fingerprint: str, settings: dict) -> str:
    """What validated events depend on: which files, their bytes, the acceptance settings."""
    return stamps.fingerprint(source, source_fingerprint, settings)


def validate_stage(cfg: Config, out: Path | None = None, now: pd.Timestamp | None = None,
                   source_fingerprint: str | None = None) -> Path:
    """Read `data.events` (+ `data.users`), validate, write the accepted events,
    quarantine and report to `out` (default <workdir>/validated). Returns `out`.
    `source_fingerprint`: the input files' `fingerprint`, when the caller has just computed it."""
    out = Path(out) if out else Paths.of(cfg).validated
    started = time.perf_counter()
    source, files = _sources(cfg)
    source_fingerprint = source_fingerprint or fingerprint(files)
    users = V.normalise_users(read_table(cfg.data.users, "users"), cfg.data.users) if cfg.data.users else None
    if cfg.data.stream_partitions:
        return _validate_streaming(cfg, out, users, now, source, source_fingerprint, started)
    raw = read_table(cfg.data.events, "events", provenance=True)
    # Extra columns (here the provenance) pass through to the quarantine untouched.
    result = V.validate_events(raw, cfg.data, users, now)
    report = result.report | {
        "source": source,
        "source_fingerprint": source_fingerprint,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if report["accepted"] == 0:
        top = max(report["reasons"], key=report["reasons"].get)
        raise UserError(
            f"{cfg.data.events}: no row passed validation; most rows fail with {top!r} "
            f"({C.REASONS[top]}); see docs/contract.md"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / stream.PARTITIONS, ignore_errors=True)  # a streaming validation's, now stale
    write_parquet_atomic(result.events, out / V.EVENTS)
    write_parquet_atomic(result.quarantine, out / V.QUARANTINE)
    return _finish(cfg, out, users, report)


def _client(cfg: Config):
    """A Dask client of `features.scheduler` (a context manager), or none (None) without one."""
    if not cfg.features.scheduler:
        return nullcontext()
    from pipeline.data.fanout import client_of

    return client_of(cfg)


def _validate_streaming(cfg: Config, out: Path, users, now, source: dict, source_fingerprint: str, started: float) -> Path:
    """data.stream_partitions: the input in record batches into user-shard partitions
    (features/stream.py), the same report."""
    for stale in (out / V.EVENTS, out / V.QUARANTINE):
        stale.unlink(missing_ok=True)
    now = now or pd.Timestamp.now(tz="UTC")
    # With a Dask scheduler every unit of the input and every partition is a task there.
    with _client(cfg) as client:
        counts = stream.validate_to_partitions(cfg.data.events, cfg.data, out, cfg.data.stream_partitions,
                                               users, now, client=client)
    if counts["accepted"] == 0:
        raise UserError(f"{cfg.data.events}: no row passed validation ({counts['reasons']}); see docs/contract.md")
    report = counts | {
        "settings": V.validation_settings(cfg.data), "validated_at": str(now),
        "source": source, "source_fingerprint": source_fingerprint, "seconds": round(time.perf_counter() - started, 2),
    }
    return _finish(cfg, out, users, report)


def _finish(cfg: Config, out: Path, users, report: dict) -> Path:
    if users is not None:
        write_parquet_atomic(users, out / V.USERS)
    elif (out / V.USERS).exists():
        (out / V.USERS).unlink()
    stamps.mark_done(out / V.REPORT, _fingerprint(report["source"], report["source_fingerprint"], report["settings"]),
                     **report)
    save_config(cfg, out)
    log.info(
        "validated %s: %d rows in = %d accepted + %d duplicates + %d quarantined %s (%.1fs) -> %s",
        cfg.data.events, report["rows_in"], report["accepted"], report["duplicates"],
        report["quarantined"], report["reasons"] or "", report["seconds"], out,
    )
    return out
