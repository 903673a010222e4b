import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import contract as C
from features.normalise import parse_food_ids, parse_timestamps
from features.validate import validate_events
from pipeline.cli import main
from pipeline.config import DataConfig

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
    assert report["rows_in"] == DIRTY_CSV.count("\n") - 1 == 19
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
    _, _, bad = parse_food_ids(pd.Series([[1.0, 2.5], [-1], [4]], dtype=object))
    assert bad.tolist() == [True, True, False] and not bad1.any() and not bad2.any()


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


def test_a_folder_without_tables_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    rc = main(["validate", "--config", "configs/test.yaml", "--events", str(tmp_path / "empty_dir"),
               f"workdir={tmp_path}/w"])
    assert rc == 2 and "holds no .parquet or .csv" in capsys.readouterr().err


def test_validation_is_vectorised_on_a_large_table():
    """Not a timing assertion: a 200k-row table must validate through the array path, i.e.
    each parser is called once on whole columns (a per-row loop would call them 200k times)."""
    n = 200_000
    rng = np.random.default_rng(0)
    raw = pd.DataFrame({
        "user_id": pd.Series(rng.integers(0, 5000, n)).map("u{}".format).astype("string"),
        "ts": pd.Series(1767600000 + rng.integers(0, 10**7, n)),
        "event_type": pd.Series(np.where(rng.random(n) < 0.5, "weigh_in", "food_log")).astype("string"),
        "value": rng.normal(80, 5, n),
        "food_ids": pd.Series(["1|2|3"] * n, dtype="string"),
    })
    import features.validate as V

    calls = {"n": 0}
    real = V.parse_timestamps

    def counting(col):
        calls["n"] += 1
        return real(col)

    V.parse_timestamps = counting
    try:
        result = validate_events(raw, DataConfig(events="big"), now=pd.Timestamp("2027-01-01", tz="UTC"))
    finally:
        V.parse_timestamps = real
    assert calls["n"] == 1
    assert result.report["rows_in"] == n == result.report["accepted"] + result.report["duplicates"] + result.report["quarantined"]
