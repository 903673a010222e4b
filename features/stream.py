"""Streaming validation (docs/scaling.md#streaming-validation): raw events larger than memory ->
validated events as a Parquet dataset partitioned by user shard, plus the small summary of the
global facts every shard must agree on.

The input is cut into units (a Parquet row group, or a whole CSV file), each read in record
batches and checked by the same `validate_events` as an in-memory validation: the same rules,
the same reason codes, the same quarantine columns. Accepted rows go to their user's partition
(`shard_of`, the hash the sharded feature build uses). Exact duplicates, in one batch or in
two, meet in the same partition (duplicates share a user), where validation's own
`dedup_and_sort` removes them (only there: a batch is not deduplicated on its own) and sorts
the partition by (user_id, ts); so `rows_in = accepted + duplicates + quarantined` stays
exact, and memory depends on the batch and on the largest partition, not on the whole log.
Units, then partitions, are independent: with a Dask client each is a task.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import write_text_atomic
from common.memory import keep_freed_memory
from features import contract as C
from features.config import DataConfig
from features.io import SOURCE_FILE, SOURCE_ROW, _table_files, _types_mapper, write_parquet_atomic
from features.validate import dedup_and_sort, validate_events
from features.vocab import KINDS, first_seen, in_order, shard_of, value_counts

log = logging.getLogger(__name__)
PARTITIONS = "events"  # <out>/events/part-PPP-of-NNN.parquet
QUARANTINE = "quarantine"  # <out>/quarantine/unit-UUUUUU-batch-BBBBBB.parquet
SUMMARY = "summary.json"
# Parquet settings of the partitions: dictionaries for the columns of few distinct values only
# (the text and the instants would fall back to plain after trying), min/max statistics for the
# user and the instant only (what a reader filters on): 15-30% less time to write, 10% more bytes.
PARTITION_WRITE = {"use_dictionary": [C.USER_ID, C.EVENT_TYPE, C.SENDER, C.MEAL, C.CONTENT_ID],
                   "write_statistics": [C.USER_ID, C.TS]}


# The partitions' columns of few distinct values, read back as dictionary arrays: a shard compares
# and maps them through their codes (`vocab.codes`) without hashing a string per row.
DICTIONARY_COLUMNS = [C.EVENT_TYPE, C.SENDER, C.MEAL, C.CONTENT_ID]


def read_partition(path: str | Path) -> pa.Table:
    """One partition's events as a shard reads them (`DICTIONARY_COLUMNS` as dictionaries)."""
    return pq.read_table(path, read_dictionary=DICTIONARY_COLUMNS)


def partition_name(p: int, n: int) -> str:
    return f"part-{p:03d}-of-{n:03d}.parquet"


def units(path: str | Path) -> list[tuple[str, int | None, int]]:
    """The independent pieces of the input: (file, Parquet row group or None for a whole CSV
    file, the piece's first row within its file). Each is validated on its own (a task on a
    Dask cluster); row numbers stay those of the file, for the quarantine's provenance."""
    out = []
    for f in _table_files(Path(path)):
        if f.name.lower().endswith((".parquet", ".pq")):
            meta = pq.ParquetFile(f).metadata
            starts = np.r_[0, np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])]
            out += [(str(f), i, int(starts[i])) for i in range(meta.num_row_groups)]
        else:
            out.append((str(f), None, 0))
    return out


def batches(unit: tuple[str, int | None, int], batch_rows: int) -> Iterator[pd.DataFrame]:
    """One unit's rows as DataFrames of at most `batch_rows` rows, with provenance
    (source_file, source_row), as `read_table` would give them. CSV columns are text."""
    f, group, start = Path(unit[0]), unit[1], unit[2]
    if group is not None:
        reader = pq.ParquetFile(f).iter_batches(batch_size=batch_rows, row_groups=[group])
    else:
        parse = pacsv.ParseOptions(delimiter="\t" if f.name.lower().endswith(".tsv") else ",")
        names = pacsv.open_csv(f, parse_options=parse).schema.names
        reader = pacsv.open_csv(f, parse_options=parse, read_options=pacsv.ReadOptions(block_size=1 << 26),
                                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                     strings_can_be_null=True))
    for batch in reader:
        df = pa.Table.from_batches([batch]).to_pandas(types_mapper=_types_mapper)
        df[SOURCE_FILE] = pd.Categorical.from_codes(np.zeros(len(df), dtype=np.int8), categories=[str(f)])
        df[SOURCE_ROW] = np.arange(start, start + len(df))
        start += len(df)
        yield df


def validate_unit(unit, u: int, data: DataConfig, users, now, out: Path, n: int, batch_rows: int) -> dict:
    """Validate one unit batch by batch; accepted rows go to `<out>/events/.pPPP/` (one Arrow
    IPC file per batch and partition), rejected ones to `<out>/quarantine/`. Returns the batch counts."""
    keep_freed_memory()  # in this process, a worker's or ours (common/memory.py)
    totals = {"rows_in": 0, "duplicates": 0, "quarantined": 0, "reasons": Counter(), "future": []}
    for b, raw in enumerate(batches(unit, batch_rows)):
        name = f"unit-{u:06d}-batch-{b:06d}"
        r = validate_events(raw, data, users, now, dedup=False)  # the partition pass removes them
        for k in ("rows_in", "duplicates", "quarantined"):
            totals[k] += r.report[k]
        totals["reasons"].update(r.report["reasons"])
        if r.report["earliest_future_ts"]:
            totals["future"].append(r.report["earliest_future_ts"])
        if len(r.quarantine):
            r.quarantine.to_parquet(out / QUARANTINE / f"{name}.parquet", index=False)
        shard = shard_of(r.events[C.USER_ID], n)
        for p in np.unique(shard):
            # Arrow IPC, uncompressed: the partition pass maps the file instead of reading and
            # decompressing it (docs/benchmarks.md); about twice lz4's bytes, until that pass.
            feather.write_feather(r.events.filter(pa.array(shard == p)), _pending(out, p) / name,
                                  compression="uncompressed")
    return totals


def _pending(out: Path, p: int) -> Path:
    return out / PARTITIONS / f".p{p:03d}"


def validate_to_partitions(path: str | Path, data: DataConfig, out: str | Path, num_partitions: int,
                           users: pd.DataFrame | None = None, now: pd.Timestamp | None = None,
                           batch_rows: int = 1_000_000, client=None) -> dict:
    """Validate the events at `path` into `out` (see the module docstring); returns the report
    (validation.json's counts) and writes SUMMARY beside the partitions. `client`: a
    dask.distributed Client: every unit of the input, then every partition, is a task there
    (workers need `out` on a shared filesystem); None: one after another, here."""
    out, n = Path(out), num_partitions
    if n < 1:
        raise UserError(f"num_partitions={n}: at least 1")
    for d in (out / PARTITIONS, out / QUARANTINE):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for p in range(n):
        _pending(out, p).mkdir()
    now = now or pd.Timestamp.now(tz="UTC")
    work = units(path)
    if client is not None and users is not None:  # sent to every worker once, not pickled into every task
        users = client.scatter(users, broadcast=True)
    args = (data, users, now, out, n, batch_rows)
    if client is None:
        counts = [validate_unit(w, u, *args) for u, w in enumerate(work)]
        parts = [finish_partition(out, p, n) for p in range(n)]
    else:
        counts = client.gather([client.submit(validate_unit, w, u, *args, pure=False) for u, w in enumerate(work)])
        parts = client.gather([client.submit(finish_partition, out, p, n, pure=False) for p in range(n)])
    rows_in = sum(c["rows_in"] for c in counts)
    if rows_in == 0:
        raise UserError(f"{path}: events table is empty; nothing to do")
    reasons = sum((Counter(c["reasons"]) for c in counts), Counter())
    event_types = sum((Counter(part["event_types"]) for part in parts), Counter())
    future = [t for c in counts for t in c["future"]]
    facts = _merge(parts, n)
    report = {"rows_in": rows_in, "accepted": sum(part["accepted"] for part in parts),
              "duplicates": sum(c["duplicates"] for c in counts) + sum(part["duplicates"] for part in parts),
              "quarantined": sum(c["quarantined"] for c in counts),
              "reasons": dict(reasons.most_common()),
              "users": sum(part["users"] for part in parts),  # a user lives in one partition only
              "event_types": dict(event_types), "ts_min": facts["ts_min"], "ts_max": facts["ts_max"],
              "earliest_future_ts": min(future) if future else None, "num_partitions": n}
    assert report["rows_in"] == report["accepted"] + report["duplicates"] + report["quarantined"]
    write_text_atomic(json.dumps(facts), out / SUMMARY)
    return report


def finish_partition(out: Path, p: int, n: int) -> dict:
    """One partition's batches -> its file: duplicates that arrived in different batches
    removed and the rows sorted (validation's own `dedup_and_sort`); then its counts and its
    part of the global facts."""
    keep_freed_memory()
    pending = _pending(out, p)
    files = sorted(pending.glob("unit-*"))
    table = (pa.concat_tables([feather.read_table(f, memory_map=True) for f in files]) if files
             else C.NORMALISED_SCHEMA.empty_table())
    events, dup = dedup_and_sort(table)  # a copy: the mapped files can go
    write_parquet_atomic(events, out / PARTITIONS / partition_name(p, n), **PARTITION_WRITE)
    shutil.rmtree(pending)
    ts = pc.min_max(pc.cast(events[C.TS], pa.int64()))  # epoch us; nulls for an empty partition
    return {"accepted": events.num_rows, "duplicates": int(dup.sum()), "users": len(pc.unique(events[C.USER_ID])),
            "event_types": value_counts(events[C.EVENT_TYPE]),
            "first_seen": first_seen(events), "ts_min_us": ts["min"].as_py(), "ts_max_us": ts["max"].as_py()}


def _merge(parts: list[dict], n: int) -> dict:
    """The global facts from every partition's: the summary a shard build reads."""
    first: dict[str, dict] = {k: {} for k in KINDS}
    for part in parts:
        for kind, tokens in part["first_seen"].items():
            for token, t in tokens.items():
                first[kind][token] = min(t, first[kind].get(token, t))
    lo = [part["ts_min_us"] for part in parts if part["ts_min_us"] is not None]
    hi = [part["ts_max_us"] for part in parts if part["ts_max_us"] is not None]
    ts_min, ts_max = (min(lo), max(hi)) if lo else (None, None)
    order = in_order(first)
    return {
        "num_partitions": n,
        # Epoch microseconds of the first and last accepted event, and as text.
        "ts_min_us": ts_min, "ts_max_us": ts_max,
        "ts_min": str(pd.Timestamp(ts_min, unit="us", tz="UTC")) if ts_min is not None else None,
        "ts_max": str(pd.Timestamp(ts_max, unit="us", tz="UTC")) if ts_max is not None else None,
        "first_seen": order,  # tokens in the order Vocab.extend appends them
        # The same tokens with their first instant (epoch us): a build whose log ends earlier
        # (data.until) keeps those seen before the end, in the same order (`facts_until`).
        "first_seen_us": {k: [[t, first[k][t]] for t in tokens] for k, tokens in order.items()},
    }


def facts_until(facts: dict, until_us: int) -> dict | None:
    """The global facts of the log cut at `until_us` (its events before that instant only):
    the tokens first seen before it, in the same order, and the same first event. (The build
    ends the data at `until` itself.) None where this summary cannot say: one written before
    `first_seen_us`, or no event before the cut."""
    if "first_seen_us" not in facts or facts["ts_min_us"] is None or facts["ts_min_us"] >= until_us:
        return None
    return facts | {"first_seen": {k: [t for t, us in pairs if us < until_us] for k, pairs in facts["first_seen_us"].items()}}
