import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from features import contract as C
from features.config import DataConfig
from features.io import read_table
from features.normalise import parse_food_ids, parse_timestamps, parse_timestamps_and_units
from features.validate import validate_events
from pipeline.cli import main

NOW = pd.Timestamp("2027-01-01", tz="UTC")

# One dirty CSV that hits every reason code at least once, plus one exact duplicate.
DIRTY_CSV = """user_id,ts,event_type,sender,text,food_ids,meal,value,content_id
u1,2026-01-05T10:00:00Z,message,user,hello coach,,,,
u1,2026-01-05T10:00:00Z,message,user,hello coach,,,,
u1,2026-01-05T11:00:00+02:00,food_log,,,12|55|9,lunch,,
u1,1767610800,weigh_in,,,,,82.5,
u2,2026-01-06 08:00,content_view,,,,,4,c17
,2026-01-05T10:00:00Z,message,user,no user,,,,
ghost,2026-01-05T10:00:00Z,message,user,not in users table,,,,
u1,yesterday-ish,message,user,bad time,,,,
u1,2099-01-01T00:00:00Z,message,user,from the future,,,,
u1,2026-01-05T10:00:00Z,,user,no type,,,,
u1,2026-01-05T10:00:00Z,Bad Type!,user,odd type,,,,
u1,2026-01-05T10:00:00Z,step_sync,,,,,100,
u1,2026-01-05T12:00:00Z,message,user,,,,,
u1,2026-01-05T12:00:00Z,message,bot,who am i,,,,
u1,2026-01-05T12:00:00Z,food_log,,,,dinner,,
u1,2026-01-05T12:00:00Z,food_log,,,12|x|9,dinner,,
u1,2026-01-05T12:00:00Z,weigh_in,,,,,,
u1,2026-01-05T12:00:00Z,weigh_in,,,,,900,
u1,2026-01-05T12:00:00Z,content_view,,,,,lots,c1
u1,2026-01-05T12:00:00Z,food_log,,,99999999999999999999|1,dinner,,
u1,1767610800000,weigh_in,,,,,82.5,
"""
USERS_CSV = "user_id,program_start\nu1,2026-01-01\nu2,2026-01-02T00:00:00Z\n"
ALLOWED = "data.allowed_event_types=[message,food_log,weigh_in,content_view]"


@pytest.fixture
def dirty(tmp_path):
    (tmp_path / "events.csv").write_text(DIRTY_CSV)
    (tmp_path / "users.csv").write_text(USERS_CSV)
    return tmp_path


def _validate(tmp_path, *extra):
    out = tmp_path / "out"
    args = ["validate", "--config", "configs/test.yaml", "--events", str(tmp_path / "events.csv"),
            "--out", str(out), f"workdir={tmp_path}/w", *extra]
    return main(args), out


def test_dirty_file_reconciles_and_hits_every_reason_code(dirty):
    rc, out = _validate(dirty, "--users", str(dirty / "users.csv"), ALLOWED)
    assert rc == 0
    report = json.loads((out / "validation.json").read_text())
    assert report["rows_in"] == DIRTY_CSV.count("\n") - 1 == 21
    assert report["rows_in"] == report["accepted"] + report["duplicates"] + report["quarantined"]
    assert report["accepted"] == 4 and report["duplicates"] == 1
    assert set(report["reasons"]) == set(C.REASONS), set(C.REASONS) ^ set(report["reasons"])
    assert sum(report["reasons"].values()) == report["quarantined"]

    q = pd.read_parquet(out / "quarantine.parquet")
    assert len(q) == report["quarantined"]
    # Rows as they came in, traceable to their file and line.
    bad_time = q[q["reason"] == "bad_timestamp"].iloc[0]
    assert bad_time["ts"] == "yesterday-ish" and bad_time["text"] == "bad time"
    assert bad_time["source_file"].endswith("events.csv") and bad_time["source_row"] == 7
    reason_of = dict(zip(q["source_row"], q["reason"]))
    assert reason_of[19] == "food_log_bad_food_ids"  # an id beyond int64 is a bad id, not a crash
    assert reason_of[20] == "epoch_not_seconds"  # epoch milliseconds get their own reason
    accepted = pq.read_table(out / "events.parquet")
    assert accepted.schema.equals(C.NORMALISED_SCHEMA)
    rows = accepted.to_pylist()
    assert [r["event_type"] for r in rows if r["user_id"] == "u1"] == ["food_log", "message", "weigh_in"]
    assert rows[0]["food_ids"] == [12, 55, 9] and str(rows[0]["ts"]) == "2026-01-05 09:00:00+00:00"


def test_without_users_table_or_allow_list_those_codes_do_not_fire(dirty):
    rc, out = _validate(dirty)
    report = json.loads((out / "validation.json").read_text())
    assert rc == 0 and "unknown_user" not in report["reasons"]
    assert "unknown_event_type" not in report["reasons"]
    assert report["accepted"] == 6  # ghost's message and the step_sync event are now fine


def test_time_zones_land_on_the_same_utc_instant():
    instant = pd.Timestamp("2026-03-01T12:00:00Z")
    forms = pd.Series(
        ["2026-03-01T12:00:00Z", "2026-03-01T14:00:00+02:00", "2026-03-01T07:00:00-05:00",
         "2026-03-01 12:00:00", str(int(instant.timestamp()))], dtype="string")
    parsed, bad = parse_timestamps(forms)
    assert not bad.any() and (parsed == instant).all()
    for col in (
        pd.Series([instant.timestamp()]),  # epoch seconds as a number
        pd.Series([instant.tz_convert("Asia/Tokyo")]),  # tz-aware datetimes
        pd.Series([instant.tz_localize(None)]),  # naive datetimes mean UTC
    ):
        parsed, bad = parse_timestamps(col)
        assert not bad.any() and parsed.iloc[0] == instant


def test_food_ids_as_lists_or_pipe_strings_parse_the_same():
    lists, empty1, bad1 = parse_food_ids(pd.Series([[12, 55, 9], [], None, [3]], dtype=object))
    strings, empty2, bad2 = parse_food_ids(pd.Series(["12|55|9", "", None, " 3 "], dtype="string"))
    assert lists.to_pylist() == strings.to_pylist() == [[12, 55, 9], [], [], [3]]
    assert empty1.tolist() == empty2.tolist() == [False, True, True, False]
    _, _, bad = parse_food_ids(pd.Series([[1.0, 2.5], [-1], [4], [1e19]], dtype=object))
    assert bad.tolist() == [True, True, False, True] and not bad1.any() and not bad2.any()


def test_food_ids_beyond_int64_are_bad_ids_not_a_crash():
    big = str(np.iinfo(np.int64).max)  # 9223372036854775807, the largest id that fits
    col = pd.Series(["99999999999999999999|1", big, str(int(big) + 1), " 0007 | 000", "00000000000000000000042"],
                    dtype="string")
    lists, empty, bad = parse_food_ids(col)
    assert bad.tolist() == [True, False, True, False, False] and not empty.any()
    assert lists.to_pylist()[1:2] + lists.to_pylist()[3:] == [[int(big)], [7, 0], [42]]


def test_epoch_milliseconds_are_flagged_as_not_seconds():
    ms = 1767610800000  # 2026-01-05 11:00 UTC in milliseconds
    for col in (pd.Series([ms, 1767610800]), pd.Series([str(ms), "1767610800"], dtype="string")):
        parsed, bad, not_seconds = parse_timestamps_and_units(col)
        assert bad.tolist() == [True, False] and not_seconds.tolist() == [True, False]
        assert parsed.iloc[1] == pd.Timestamp("2026-01-05 11:00", tz="UTC")


def test_a_folder_of_mixed_partitions_is_one_table(tmp_path):
    part = tmp_path / "events"
    part.mkdir()
    pd.DataFrame({"user_id": ["a"], "ts": [pd.Timestamp("2026-01-05", tz="UTC")], "event_type": ["weigh_in"],
                  "value": [80.0]}).to_parquet(part / "day=1.parquet")
    (part / "day=2.csv").write_text("user_id,ts,event_type,food_ids\na,2026-01-06T08:00:00Z,food_log,1|2\n")
    assert main(["validate", "--config", "configs/test.yaml", "--events", str(part), "--out",
                 str(tmp_path / "out"), f"workdir={tmp_path}/w"]) == 0
    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert report["accepted"] == 2 and report["event_types"] == {"weigh_in": 1, "food_log": 1}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing_col.csv", "user_id,event_type\nu1,message\n", "lacks required column(s) ts"),
        ("empty.csv", "", "empty"),
        ("header_only.csv", "user_id,ts,event_type\n", "empty"),
        ("garbage.parquet", "this is not parquet", "unreadable"),
        ("notes.txt", "hello", "not a table file"),
        ("nothing_here", None, "does not exist"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    rc = main(["validate", "--config", "configs/test.yaml", "--events", str(path), "--out", str(tmp_path / "o"),
               f"workdir={tmp_path}/w"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(path) in err and expected in err and "Traceback" not in err
    if name == "missing_col.csv":  # the file's own columns, not the provenance validation adds
        assert "(has: user_id, event_type)" in err and "source_" not in err


def test_a_folder_without_tables_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    rc = main(["validate", "--config", "configs/test.yaml", "--events", str(tmp_path / "empty_dir"),
               f"workdir={tmp_path}/w"])
    assert rc == 2 and "holds no .parquet or .csv" in capsys.readouterr().err


def _events_file(n: int, path, fmt: str) -> None:
    """n events of every kind with about 10% bad rows (epoch milliseconds, unknown senders,
    bad food ids, absurd weights), as CSV (all text) or typed Parquet (lists, timestamps)."""
    i = np.arange(n)
    kind = np.array(["message", "food_log", "weigh_in", "content_view", "step_sync"])[i % 5]
    ts = 1767600000 + (i * 7919) % 10**7
    df = pd.DataFrame({
        "user_id": np.char.add("u", (i % 997).astype(str)),
        "ts": np.where(i % 17 == 0, ts * 1000, ts),
        "event_type": kind,
        "sender": np.where(kind == "message", np.where(i % 7 == 0, "bot", "user"), None),
        "text": np.where(kind == "message", np.char.add("hello ", (i % 50).astype(str)), None),
        "food_ids": np.where(kind == "food_log", np.where(i % 11 == 0, "1|x", "12|55|9"), None),
        "meal": np.where(kind == "food_log", "lunch", None),
        "value": np.where(kind == "weigh_in", np.where(i % 13 == 0, 900.0, 80.0), np.nan),
        "content_id": np.where(kind == "content_view", "c1", None),
    })
    if fmt == "csv":
        df.to_csv(path, index=False)
        return
    df["ts"] = pd.to_datetime(df["ts"].where(df.ts < 1e11), unit="s", utc=True)
    foods = {"1|x": [1, -1], "12|55|9": [12, 55, 9]}
    df["food_ids"] = [foods.get(f) if isinstance(f, str) else None for f in df.food_ids]
    df.to_parquet(path)


def _python_calls(fn) -> int:
    """How many Python-level calls (functions and builtins called from Python) `fn` makes."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_validation_is_vectorised(tmp_path, fmt):
    """Reading and validating 10x more rows makes (almost) no more Python calls: the work is
    whole-column numpy/pyarrow/pandas. A loop, .map or .apply per row, or a Python parser
    called per value, adds at least one call per row (18,000 here). Counts, not seconds."""
    def validate(n):
        path = tmp_path / f"events-{n}.{fmt}"
        _events_file(n, path, fmt)
        report = {}

        def run():
            raw = read_table(path, "events", provenance=True)
            report.update(validate_events(raw, DataConfig(events=str(path)), now=NOW).report)

        calls = _python_calls(run)
        assert report["rows_in"] == n == report["accepted"] + report["duplicates"] + report["quarantined"]
        assert report["quarantined"] > n // 20  # the dirty rows went through the reason checks
        return calls

    validate(200)  # warm-up: first-call imports and caches
    small, large = validate(2_000), validate(20_000)
    assert large - small < 500, (small, large)


def test_dedup_and_sort_matches_a_full_comparison_of_every_row():
    """dedup_and_sort compares in full only rows that share (user_id, ts): its result must be
    what pandas' duplicated over every column (keep the first) then a stable sort gives, with
    many rows sharing an instant and differing in one column (food lists, missing values)."""
    import pyarrow as pa

    from features.validate import dedup_and_sort

    rng = np.random.default_rng(0)
    n = 3000
    foods = [None if rng.random() < 0.5 else [int(x) for x in rng.integers(0, 3, rng.integers(1, 3))] for _ in range(n)]
    df = pd.DataFrame({
        C.USER_ID: rng.choice(["u1", "u2", "u10", "ü"], n),
        C.TS: pd.Timestamp("2026-01-05", tz="UTC") + pd.to_timedelta(rng.integers(0, 6, n), unit="h"),
        C.EVENT_TYPE: rng.choice(["message", "food_log"], n),
        C.SENDER: rng.choice(["user", None], n),
        C.TEXT: rng.choice(["hi", "hi ", None], n),
        C.FOOD_IDS: foods,
        C.MEAL: rng.choice(["lunch", None], n),
        C.VALUE: rng.choice([1.0, np.nan, -0.0], n),
        C.CONTENT_ID: None,
    })
    table = pa.Table.from_pandas(df, schema=C.NORMALISED_SCHEMA, preserve_index=False)
    kept, dup = dedup_and_sort(table)

    key = df.assign(**{C.FOOD_IDS: ["|".join(map(str, f)) if f is not None else None for f in foods]})
    expected_dup = key.duplicated(keep="first").to_numpy()
    expected = df[~expected_dup].sort_values([C.USER_ID, C.TS], kind="stable")
    assert 0 < expected_dup.sum() < n - 100  # both kinds of rows are there
    np.testing.assert_array_equal(dup, expected_dup)
    assert kept.schema == C.NORMALISED_SCHEMA
    assert kept.to_pylist() == pa.Table.from_pandas(expected, schema=C.NORMALISED_SCHEMA, preserve_index=False).to_pylist()


def test_event_type_checks_per_distinct_value_equal_per_row_checks():
    """The event-type pattern runs once per distinct value (`_per_value`); it must give every row
    what the row-by-row check gives, repeats, blanks and odd values included."""
    from features.normalise import clean_strings
    from features.validate import _per_value

    rng = np.random.default_rng(1)
    values = rng.choice(["message", " Food_Log", "", "weigh in", "x" * 70, "a:b.c-d", "ü", None], 500)
    etype = clean_strings(pd.Series(values, dtype=object), lower=True).fillna("")
    per_row = etype.str.match(C.EVENT_TYPE_PATTERN).fillna(False).to_numpy()
    per_value = _per_value(etype, lambda v: v.str.match(C.EVENT_TYPE_PATTERN).fillna(False))
    assert 0 < per_row.sum() < len(values)
    np.testing.assert_array_equal(per_value, per_row)


@pytest.mark.parametrize("lower", [False, True])
def test_clean_strings_skips_only_columns_that_are_clean_already(lower):
    """`clean_strings` returns a column untouched when its bytes show nothing to strip, lower or
    blank out (`_clean_already`); on every mix of edge cases, slices and nulls it must give what
    stripping, lowering and blanking every value gives, and it must take the shortcut on a clean one."""
    from features import normalise as N

    def cleaned_in_full(col):
        arr = pc.utf8_trim_whitespace(N.as_arrow(col.astype(pd.StringDtype("pyarrow"))))
        arr = pc.utf8_lower(arr) if lower else arr
        return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr).to_pylist()

    rng = np.random.default_rng(7)
    pieces = ["a", "B", " ", "\t", "é", "\u00a0", "\u3000", "z", "1", "🙈", "\n", "_", "Ä", "\x1f", "~"]
    shortcuts = 0
    for _ in range(400):
        values = [None if rng.random() < 0.2 else "".join(rng.choice(pieces, rng.integers(0, 4)))
                  for _ in range(rng.integers(1, 7))]
        col = pd.Series(values, dtype="string[pyarrow]")
        col = col.iloc[1:] if len(col) > 2 and rng.random() < 0.5 else col  # an Arrow slice with an offset
        shortcuts += N._clean_already(N.as_arrow(col), lower)
        assert N.as_arrow(N.clean_strings(col, lower)).to_pylist() == cleaned_in_full(col), values
    assert shortcuts > 20  # the shortcut was taken, and checked, many times
    clean = pd.Series(["food_log", "message", None, "weigh_in"], dtype="string[pyarrow]")
    assert N._clean_already(N.as_arrow(clean), lower)
    for odd in (["Food_Log"], ["xÄx"], ["x\u3000"]):  # an uppercase inside, a non-ASCII letter inside, a trailing space
        col = pd.Series(odd, dtype="string[pyarrow]")
        assert not N._clean_already(N.as_arrow(col), lower=True)
        assert N.as_arrow(N.clean_strings(col, lower=True)).to_pylist() == [odd[0].strip().lower()]
