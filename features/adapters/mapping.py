"""A generic adapter configured in YAML: map your own files onto the event contract without
writing Python (docs/mapping.md explains every key, with two examples).

Events come from one or more CSV/Parquet files in one of two shapes:
- long: one row per event, with columns for the user, the time, the type (or one constant
  type) and any other contract column (value, content_id, text, sender, meal, food_ids);
- wide: one row per (user, time) with a count column per event type, melted into one event
  per count > 0 (the count becomes `value`, the column name the event type).
Users come from a file (user_id, program_start, program_end and any attribute) or from the
events (program_start = the day of the user's first row). Labels come from a file, with
as_of from a column or at the end of each user's last day. Rows are otherwise passed through
as they are: validation (features/validate.py) checks and quarantines them.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from common.errors import UserError, config_error
from features import contract as C
from features.io import read_as_text, read_table, write_parquet_atomic
from features.normalise import clean_strings, parse_timestamps
from features.validate import numbers_in_text

log = logging.getLogger(__name__)
SHAPES = ("long", "wide")


@dataclass
class EventsMapping:
    files: list[str] = field(default_factory=list)  # glob patterns under `input` (or absolute): CSV, Parquet
    shape: str = "long"  # long: a row per event; wide: a row per (user, time), a count column per type
    # contract column -> source column: user_id and ts always; long: event_type (unless the
    # constant below) and any of value, content_id, text, sender, meal, food_ids
    columns: dict[str, str] = field(default_factory=dict)
    event_type: str | None = None  # long: every row is this type (a log without a type column)
    rename_types: dict[str, str] = field(default_factory=dict)  # source type -> contract type
    counts: list[str] = field(default_factory=list)  # wide: the count columns ...
    count_prefix: str = ""  # ... or every column starting with this; removed from the event types
    time_of_day: str | None = None  # "HH:MM:SS" added to every time: for date-only rows
    # attribute name -> a regular expression with one group, matched against each events file's
    # name: the group is that file's rows' value (one file per course: {course: "Course(\\d+)"});
    # users.from_events gives each user the value of their first row as a user attribute
    file_attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class UsersMapping:
    file: str | None = None  # a glob pattern under `input` (or from_events below)
    from_events: bool = False  # program_start = the day (00:00 UTC) of the user's first row
    # contract column -> source column: user_id, optional program_start and program_end; any
    # other key is a user attribute of that name
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class LabelsMapping:
    file: str = ""  # a glob pattern under `input`
    columns: dict[str, str] = field(default_factory=dict)  # user_id, label and (unless below) as_of
    invert: bool = False  # the file's 1 means disengaged (dropped out): label = 1 - value
    # as_of = 00:00 UTC of the user's last day in the events files + this many days (1: the
    # end of that day), instead of an as_of column; users without events get no label
    as_of_days_after_last_day: int | None = None


@dataclass
class Mapping:
    input: str = "."  # the folder every file pattern is relative to (data.adapter_input overrides it)
    user_prefix: str = ""  # prepended to every user id of every table
    events: EventsMapping = field(default_factory=EventsMapping)
    users: UsersMapping | None = None  # None: no users table
    labels: LabelsMapping | None = None  # None: labels are derived by the pipeline


def load_mapping(path: str | Path) -> Mapping:
    """The mapping in a YAML file, checked against the dataclasses (unknown keys and wrong
    types are errors naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mapping file {path} does not exist; set data.mapping to a mapping YAML (docs/mapping.md)")
    try:
        given = OmegaConf.load(path)
        if isinstance(OmegaConf.select(given, "events.files"), str):  # one pattern: a list of one
            given.events.files = [given.events.files]
        mapping: Mapping = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Mapping), given))
    except Exception as e:  # keep omegaconf's message and key, drop the traceback
        raise config_error(e, f"mapping {path}") from None
    return mapping


def input_files(mapping: Mapping) -> list[Path]:
    """Every file the mapping reads: what a conversion depends on besides the mapping."""
    _check(mapping)
    files = _files(mapping, mapping.events.files, "events.files")
    if mapping.users is not None and mapping.users.file:
        files += _files(mapping, [mapping.users.file], "users.file")
    if mapping.labels is not None:
        files += _files(mapping, [mapping.labels.file], "labels.file")
    return files


def convert(mapping: Mapping, out: str | Path) -> dict[str, Path]:
    """Write events.parquet, and users.parquet and labels.parquet when mapped, into `out`."""
    _check(mapping)
    out = Path(out)
    events, rows = _events(mapping)
    # Each user's days in the events files (every row, even a wide row whose counts are all
    # 0): derived program starts and as_of at the end of the last day come from here.
    days = rows.groupby(C.USER_ID)["when"].agg(["min", "max"]).apply(lambda t: t.dt.floor("D"))
    for name in mapping.events.file_attributes:  # a user's value: that of their first row
        days[name] = rows.groupby(C.USER_ID)[name].first()
    paths = {"events": write_parquet_atomic(events, out / "events.parquet")}
    if mapping.users is not None:
        paths["users"] = write_parquet_atomic(_users(mapping, days), out / "users.parquet")
    if mapping.labels is not None:
        labels = _labels(mapping, days)
        paths["labels"] = write_parquet_atomic(labels, out / "labels.parquet")
        log.info("labels: %d rows, engaged rate %.3f", len(labels), labels[C.LABEL].mean())
    log.info("mapping from %s: %d events of %d users -> %s", mapping.input, len(events), len(days), out)
    return paths


def _check(m: Mapping) -> None:
    """Mistakes in the mapping itself, before any file is read."""
    e = m.events
    if e.shape not in SHAPES:
        raise UserError(f"mapping events.shape={e.shape!r}; choose long or wide")
    needed = [C.USER_ID, C.TS] + ([C.EVENT_TYPE] if e.shape == "long" and e.event_type is None else [])
    allowed = C.ALL_COLUMNS if e.shape == "long" else (C.USER_ID, C.TS)
    _check_columns("events.columns", e.columns, needed, allowed)
    if e.shape == "long" and e.event_type is not None and C.EVENT_TYPE in e.columns:
        raise UserError("mapping: set events.event_type (one type for every row) or events.columns.event_type, not both")
    if e.shape == "wide" and not (e.counts or e.count_prefix):
        raise UserError("mapping: wide events need events.counts (the count columns) or events.count_prefix")
    if e.shape == "wide" and e.event_type is not None:
        raise UserError("mapping: events.event_type is for long logs; wide event types are the count columns")
    if e.time_of_day is not None:
        try:
            pd.Timedelta(e.time_of_day)
        except ValueError:
            raise UserError(f"mapping events.time_of_day={e.time_of_day!r}; write it as HH:MM:SS") from None
    if m.users is not None:
        if bool(m.users.file) == m.users.from_events:
            raise UserError("mapping: set users.file (a users table) or users.from_events: true, one of them")
        if m.users.file:
            _check_columns("users.columns", m.users.columns, [C.USER_ID], None)
    if e.file_attributes and (m.users is None or not m.users.from_events):
        raise UserError("mapping: events.file_attributes become user attributes through users.from_events: true")
    if m.labels is not None:
        if not m.labels.file:
            raise UserError("mapping labels.file is missing: the table of labels (or drop the labels section)")
        timed = m.labels.as_of_days_after_last_day is None
        needed = [C.USER_ID, C.LABEL] + ([C.AS_OF] if timed else [])
        _check_columns("labels.columns", m.labels.columns, needed, (C.USER_ID, C.LABEL, C.AS_OF))
        if not timed and C.AS_OF in m.labels.columns:
            raise UserError("mapping: set labels.columns.as_of or labels.as_of_days_after_last_day, not both")


def _check_columns(key: str, columns: dict[str, str], needed: list[str], allowed: tuple[str, ...] | None) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"mapping {key} lacks {', '.join(missing)}: name the source column of each "
                        f"(e.g. {missing[0]}: my_column)")
    unknown = [c for c in columns if allowed is not None and c not in allowed]
    if unknown:
        raise UserError(f"mapping {key} has {', '.join(unknown)}, not columns here; use {', '.join(allowed)}")


def _events(m: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The events table, and every source row's (user_id, parsed time as `when`)."""
    e = m.events
    needed = _keys("events.columns", e.columns) | {f"events.counts[{i}]": c for i, c in enumerate(e.counts)}
    raw = _read(_files(m, e.files, "events.files"), "events.files", needed, e.file_attributes)
    user = _user_ids(m, raw[e.columns[C.USER_ID]])
    when, _ = parse_timestamps(raw[e.columns[C.TS]])
    # Validation parses and checks times; here they are parsed only to add a time of day.
    ts = (when + pd.Timedelta(e.time_of_day)) if e.time_of_day else raw[e.columns[C.TS]]
    rows = pd.DataFrame({C.USER_ID: user, "when": when, **{a: raw[a] for a in e.file_attributes}})
    if e.shape == "long":
        events = pd.DataFrame({C.USER_ID: user, C.TS: ts})
        events[C.EVENT_TYPE] = e.event_type if e.event_type is not None else raw[e.columns[C.EVENT_TYPE]]
        for col, src in e.columns.items():
            if col not in events:
                events[col] = raw[src]
    else:
        events = _melt(m, raw, pd.DataFrame({C.USER_ID: user, C.TS: ts, "when": when}))
    if e.rename_types:
        events[C.EVENT_TYPE] = events[C.EVENT_TYPE].replace(e.rename_types)
    return events, rows


def _melt(m: Mapping, raw: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """Wide rows -> one event per (row, count column) with a count > 0, in the order of
    (user, time, count column); `keys` holds each row's user_id, ts and parsed time."""
    e = m.events
    counts = e.counts or [c for c in raw.columns if c.startswith(e.count_prefix)]
    if not counts:
        raise UserError(f"{m.input}: no column of events.files starts with events.count_prefix={e.count_prefix!r}")
    numbers = raw[counts].apply(_numbers)
    unreadable = int((numbers.isna() & raw[counts].notna()).sum().sum())
    if unreadable:
        log.warning("%d count cells of %s are not numbers; they are skipped", unreadable, counts)
    long = keys.join(numbers).melt(id_vars=list(keys.columns), var_name=C.EVENT_TYPE, value_name=C.VALUE)
    long = long[long[C.VALUE] > 0]
    long[C.EVENT_TYPE] = long[C.EVENT_TYPE].str.removeprefix(e.count_prefix)
    long[C.VALUE] = long[C.VALUE].astype(float)
    return long.sort_values([C.USER_ID, "when"], kind="stable").drop(columns="when").reset_index(drop=True)


def _users(m: Mapping, days: pd.DataFrame) -> pd.DataFrame:
    u = m.users
    if u.from_events:
        return pd.DataFrame({C.USER_ID: days.index, C.PROGRAM_START: days["min"].to_numpy(),
                             **{a: days[a].to_numpy() for a in m.events.file_attributes}})
    files = _files(m, [u.file], "users.file")
    raw = _read(files, "users.file", _keys("users.columns", u.columns))
    users = pd.DataFrame({col: raw[src] for col, src in u.columns.items()})
    users[C.USER_ID] = _user_ids(m, users[C.USER_ID])
    if all(read_as_text(f) for f in files):
        # All text, as a CSV users file given to validation directly: numbers become numbers there
        # (features/validate.py), so they do here, or the Parquet written here would keep them text.
        for col in set(users.columns) - {C.USER_ID, C.PROGRAM_START, C.PROGRAM_END}:
            users[col] = numbers_in_text(clean_strings(users[col]))
    return users


def _labels(m: Mapping, days: pd.DataFrame) -> pd.DataFrame:
    lab = m.labels
    raw = _read(_files(m, [lab.file], "labels.file"), "labels.file", _keys("labels.columns", lab.columns))
    user = _user_ids(m, raw[lab.columns[C.USER_ID]])
    label = _numbers(raw[lab.columns[C.LABEL]])
    if lab.invert:
        label = 1 - label
    if lab.as_of_days_after_last_day is None:
        as_of = raw[lab.columns[C.AS_OF]]
    else:
        as_of = user.map(days["max"] + pd.Timedelta(days=lab.as_of_days_after_last_day))
    labels = pd.DataFrame({C.USER_ID: user, C.AS_OF: as_of, C.LABEL: label})
    return labels if lab.as_of_days_after_last_day is None else labels[as_of.notna()]


def _numbers(col: pd.Series) -> pd.Series:
    """Numbers as read_csv would type them: int64, or float64 with NaN where not a number."""
    return pd.to_numeric(col.astype(object), errors="coerce")


def _user_ids(m: Mapping, col: pd.Series) -> pd.Series:
    return (m.user_prefix + clean_strings(col)).astype("str")


def _files(m: Mapping, patterns: list[str], key: str) -> list[Path]:
    found = {f for p in patterns for f in glob.glob(os.path.join(m.input, p))}  # an absolute p stays itself
    files = sorted(Path(f) for f in found if os.path.isfile(f))
    if not files:
        raise UserError(f"{m.input}: no file matches {key}={list(patterns)}; check the mapping's input "
                        f"(or data.adapter_input) and {key}")
    return files


def _keys(prefix: str, columns: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}.{k}": v for k, v in columns.items()}


def _read(paths: list[Path], key: str, columns: dict[str, str],
          from_name: dict[str, str] | None = None) -> pd.DataFrame:
    """The files `_files` found for the mapping's `key`, concatenated; each must have the
    source columns the mapping names (`columns`: mapping key -> source column). `from_name`:
    columns whose value is a regular expression's group in the file's name."""
    frames = []
    for path in paths:
        df = read_table(path, key.split(".")[0])
        for name, pattern in (from_name or {}).items():
            found = re.search(pattern, path.name)
            if not found or not found.groups():
                raise UserError(f"{path}: mapping events.file_attributes.{name}={pattern!r} does not match the "
                                "file name with a group ( ) to take the value from")
            df[name] = found.group(1)
        missing = [f"{k}: {src!r}" for k, src in columns.items() if src not in df.columns]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)} (has: {', '.join(map(str, df.columns))}); "
                            "fix the mapping or the file")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
