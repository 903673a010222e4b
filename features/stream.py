"""Streaming validation (docs/scaling.md#streaming-validation): raw events larger than memory ->
validated events as a Parquet dataset partitioned by user shard, plus the small summary of the
global facts every shard must agree on.

The input is read in record batches, file by file (pyarrow's Parquet and CSV readers), and
each batch goes through the same `validate_events` as an in-memory validation: the same rules,
the same reason codes, the same quarantine columns. Accepted rows are appended to their
user's partition (`shard_of`, the hash the sharded feature build uses). Exact duplicates in
two different batches meet in the same partition (duplicates share a user), where one more
pass over the partition (validation's `dedup_and_sort`) removes them and sorts it by
(user_id, ts); so
`rows_in = accepted + duplicates + quarantined` stays exact, and memory depends on the batch
and on the largest partition, not on the whole log.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import write_text_atomic
from features import contract as C
from features.config import DataConfig
from features.io import SOURCE_FILE, SOURCE_ROW, _table_files, _types_mapper
from features.validate import dedup_and_sort, validate_events
from features.vocab import KINDS, codes, shard_of

log = logging.getLogger(__name__)
PARTITIONS = "events"  # <out>/events/part-PPP-of-NNN.parquet
QUARANTINE = "quarantine"  # <out>/quarantine/batch-BBBBBB.parquet
SUMMARY = "summary.json"


def partition_name(p: int, n: int) -> str:
    return f"part-{p:03d}-of-{n:03d}.parquet"


def batches(path: str | Path, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The table(s) at `path` as DataFrames of at most `batch_rows` rows, with provenance
    (source_file, source_row), as `read_table` would give them whole. CSV columns are text."""
    for f in _table_files(Path(path)):
        name, start = f.name.lower(), 0
        if name.endswith((".parquet", ".pq")):
            reader = pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        else:
            parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            names = pacsv.open_csv(f, parse_options=parse).schema.names
            reader = pacsv.open_csv(f, parse_options=parse, read_options=pacsv.ReadOptions(block_size=1 << 26),
                                    convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                         strings_can_be_null=True))
        for batch in reader:
            df = pa.Table.from_batches([batch]).to_pandas(types_mapper=_types_mapper)
            df[SOURCE_FILE] = pd.Categorical([str(f)] * len(df))
            df[SOURCE_ROW] = np.arange(start, start + len(df))
            start += len(df)
            yield df


def validate_to_partitions(path: str | Path, data: DataConfig, out: str | Path, num_partitions: int,
                           users: pd.DataFrame | None = None, now: pd.Timestamp | None = None,
                           batch_rows: int = 1_000_000) -> dict:
    """Validate the events at `path` batch by batch into `out` (see the module docstring);
    returns the report (validation.json's counts) and writes SUMMARY beside the partitions."""
    out = Path(out)
    if num_partitions < 1:
        raise UserError(f"num_partitions={num_partitions}: at least 1")
    parts_dir, quarantine_dir = out / PARTITIONS, out / QUARANTINE
    for d in (parts_dir, quarantine_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    now = now or pd.Timestamp.now(tz="UTC")
    writers: dict[int, pq.ParquetWriter] = {}
    totals = {"rows_in": 0, "duplicates": 0, "quarantined": 0}
    reasons: dict[str, int] = {}
    future: list[str] = []
    try:
        for b, raw in enumerate(batches(path, batch_rows)):
            r = validate_events(raw, data, users, now)
            for k in totals:
                totals[k] += r.report[k]
            for k, v in r.report["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
            if r.report["earliest_future_ts"]:
                future.append(r.report["earliest_future_ts"])
            if len(r.quarantine):
                r.quarantine.to_parquet(quarantine_dir / f"batch-{b:06d}.parquet", index=False)
            shard = shard_of(r.events[C.USER_ID].to_numpy(zero_copy_only=False), num_partitions)
            for p in np.unique(shard):
                if p not in writers:
                    writers[p] = pq.ParquetWriter(parts_dir / f".{partition_name(p, num_partitions)}.tmp",
                                                  C.NORMALISED_SCHEMA)
                writers[p].write_table(r.events.filter(pa.array(shard == p)))
    finally:
        for w in writers.values():
            w.close()
    if totals["rows_in"] == 0:
        raise UserError(f"{path}: events table is empty; nothing to do")
    report, facts = _finish_partitions(parts_dir, num_partitions)
    report = {"rows_in": totals["rows_in"], "accepted": report["accepted"],
              "duplicates": totals["duplicates"] + report["duplicates"], "quarantined": totals["quarantined"],
              "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])), "users": report["users"],
              "event_types": report["event_types"], "ts_min": facts["ts_min"], "ts_max": facts["ts_max"],
              "earliest_future_ts": min(future) if future else None, "num_partitions": num_partitions}
    assert report["rows_in"] == report["accepted"] + report["duplicates"] + report["quarantined"]
    write_text_atomic(json.dumps(facts), out / SUMMARY)
    return report


def _finish_partitions(parts_dir: Path, n: int) -> tuple[dict, dict]:
    """Per partition: duplicates that arrived in different batches removed and the rows sorted
    (validation's own `dedup_and_sort`), then the rename into place; and the global facts,
    merged from every partition's."""
    counts = {"accepted": 0, "duplicates": 0, "users": 0}
    event_types: dict[str, int] = {}
    first_seen: dict[str, dict] = {k: {} for k in KINDS}
    ts_min = ts_max = None
    for p in range(n):
        tmp, final = parts_dir / f".{partition_name(p, n)}.tmp", parts_dir / partition_name(p, n)
        if not tmp.exists():  # no user of this shard: an empty partition, so every shard has one
            pq.write_table(C.NORMALISED_SCHEMA.empty_table(), final)
            continue
        events, dup = dedup_and_sort(pq.read_table(tmp).to_pandas(types_mapper=_types_mapper))
        pq.write_table(events, final)
        tmp.unlink()
        counts["accepted"] += events.num_rows
        counts["duplicates"] += int(dup.sum())
        counts["users"] += len(pc.unique(events[C.USER_ID]))  # a user lives in one partition only
        types, n_of = codes(events[C.EVENT_TYPE])
        for k, v in zip(n_of, np.bincount(types[types >= 0], minlength=len(n_of)).tolist()):
            event_types[k] = event_types.get(k, 0) + v
        _first_seen(events, first_seen)
        lo, hi = (v.as_py() for v in pc.min_max(pc.cast(events[C.TS], pa.int64())).values())  # epoch us
        ts_min, ts_max = min(lo, ts_min if ts_min is not None else lo), max(hi, ts_max if ts_max is not None else hi)
    facts = {
        "num_partitions": n,
        # Epoch microseconds of the first and last accepted event, and as text.
        "ts_min_us": ts_min, "ts_max_us": ts_max,
        "ts_min": str(pd.Timestamp(ts_min, unit="us", tz="UTC")) if ts_min is not None else None,
        "ts_max": str(pd.Timestamp(ts_max, unit="us", tz="UTC")) if ts_max is not None else None,
        # Tokens in the order Vocab.extend appends them: by earliest time, ties by token.
        "first_seen": {k: [t for t, _ in sorted(v.items(), key=lambda kv: (kv[1], kv[0]))] for k, v in first_seen.items()},
    }
    return counts | {"event_types": event_types}, facts


def _first_seen(events: pa.Table, into: dict[str, dict]) -> None:
    """Earliest timestamp (epoch microseconds) of every event type, meal and food id here."""
    ts = pc.cast(events[C.TS], pa.int64())
    foods = events[C.FOOD_IDS]
    columns = {"event_types": (events[C.EVENT_TYPE], ts), "meals": (events[C.MEAL], ts),
               "foods": (pc.list_flatten(foods), ts.take(pc.list_parent_indices(foods)))}
    for kind, (values, when) in columns.items():
        c, distinct = codes(values)
        if not len(distinct):
            continue
        first = np.full(len(distinct), np.iinfo(np.int64).max)
        ok = c >= 0
        np.minimum.at(first, c[ok], pc.cast(when, pa.int64()).to_numpy(zero_copy_only=False)[ok])
        for token, t in zip(distinct, first.tolist()):
            into[kind][token] = min(t, into[kind].get(token, t))
