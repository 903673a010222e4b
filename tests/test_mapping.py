"""The generic YAML mapping (features/adapters/mapping.py, docs/mapping.md): the bundled KDD
Cup mapping writes exactly the tables of the hand-written converter it replaced, and a long
event log of another shape goes all the way to a feature store."""

import filecmp

import numpy as np
import pandas as pd
import pytest
import yaml

from common.errors import UserError
from features import contract as C
from features.adapters import kddcup2015
from features.adapters.mapping import (
    EventsMapping,
    LabelsMapping,
    Mapping,
    UsersMapping,
    convert,
    load_mapping,
)
from features.store import load_arrays
from pipeline.config import load_config
from pipeline.data.features import features_stage

KDD = "../shared/data/kddcup2015"
TABLES = ("events", "users", "labels")


def kdd_reference(src, out):
    """The KDD Cup converter as it was before the mapping (features/adapters/kddcup2015.py
    at commit f409b12), frozen here as the reference the mapping must reproduce."""
    files = sorted(src.glob("trainCourse*.csv"))
    daily = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    counts = [c for c in daily.columns if c.startswith("event_")]
    day = pd.to_datetime(daily["time"], utc=True)
    user = "e" + daily["enrollment_id"].astype(str)
    long = pd.DataFrame({C.USER_ID: user, "day": day}).join(daily[counts]).melt(
        id_vars=[C.USER_ID, "day"], var_name=C.EVENT_TYPE, value_name=C.VALUE
    )
    long = long[long[C.VALUE] > 0]
    events = pd.DataFrame(
        {
            C.USER_ID: long[C.USER_ID].to_numpy(),
            C.TS: (long["day"] + pd.Timedelta(hours=12)).to_numpy(),
            C.EVENT_TYPE: long[C.EVENT_TYPE].str.removeprefix("event_").to_numpy(),
            C.VALUE: long[C.VALUE].astype(float).to_numpy(),
        }
    ).sort_values([C.USER_ID, C.TS], kind="stable")
    window = pd.DataFrame({C.USER_ID: user, "day": day}).groupby(C.USER_ID)["day"].agg(["min", "max"])
    users = pd.DataFrame({C.USER_ID: window.index, C.PROGRAM_START: window["min"].to_numpy()})
    truth = pd.read_csv(src / "truth_train.csv")
    truth[C.USER_ID] = "e" + truth["enrollment_id"].astype(str)
    truth = truth.merge(window, left_on=C.USER_ID, right_index=True)
    labels = pd.DataFrame({C.USER_ID: truth[C.USER_ID], C.AS_OF: truth["max"] + pd.Timedelta(days=1),
                           C.LABEL: 1 - truth["label"].astype(int)})
    out.mkdir(parents=True)
    for name, df in zip(TABLES, (events, users, labels)):
        df.to_parquet(out / f"{name}.parquet", index=False)


@pytest.fixture(scope="module")
def kdd_slice(tmp_path_factory):
    """40 enrollments of each of two courses (two files: the glob and their concatenation)
    and the whole truth file (labels of other courses must be left out)."""
    src = tmp_path_factory.mktemp("kdd")
    for course in ("1038", "1185"):
        daily = pd.read_csv(f"{KDD}/trainCourse{course}.csv")
        daily[daily.enrollment_id.isin(daily.enrollment_id.unique()[:40])].to_csv(
            src / f"trainCourse{course}.csv", index=False)
    pd.read_csv(f"{KDD}/truth_train.csv").to_csv(src / "truth_train.csv", index=False)
    return src


def test_the_kdd_mapping_writes_the_tables_the_kdd_converter_wrote(kdd_slice, tmp_path):
    kdd_reference(kdd_slice, tmp_path / "reference")
    paths = kddcup2015.convert(kdd_slice, tmp_path / "mapped")
    assert sorted(paths) == sorted(TABLES)
    for name in TABLES:
        expected = pd.read_parquet(tmp_path / "reference" / f"{name}.parquet")
        got = pd.read_parquet(paths[name])
        pd.testing.assert_frame_equal(got, expected)
        assert filecmp.cmp(paths[name], tmp_path / "reference" / f"{name}.parquet", shallow=False), name
    events = pd.read_parquet(paths["events"])
    assert len(events) > 1000 and events[C.USER_ID].nunique() <= 80
    assert (events[C.TS].dt.hour == 12).all() and not events[C.EVENT_TYPE].str.startswith("event_").any()
    assert len(pd.read_parquet(paths["labels"])) == 80  # only the two courses' enrollments


LONG_LOG = {
    "user_prefix": "m-",
    "events": {"files": ["actions*.csv"], "rename_types": {"weight": "weigh_in"},
               "columns": {"user_id": "member", "ts": "timestamp", "event_type": "action", "value": "amount"}},
    "users": {"file": "members.csv",
              "columns": {"user_id": "member", "program_start": "joined", "program_end": "left", "plan": "plan",
                          "age": "age"}},
}


def write_long_log(root, **edits):
    """A fitness app's own export: one row per action, members in a side table; and its
    mapping (LONG_LOG with `edits` replacing whole sections)."""
    start = pd.Timestamp("2024-01-01 07:30", tz="UTC")  # a Monday
    rows = []
    for member in ("a", "b", "c"):
        for d in range(29):
            t = start + pd.Timedelta(days=d)
            rows.append((member, t.isoformat(), "Workout", 20 + d))
            if d % 7 == 0:
                rows.append((member, (t + pd.Timedelta(hours=1)).isoformat(), "weight", 80.0 - d / 7))
    rows.append(("c", (start + pd.Timedelta(days=2)).isoformat(), "login", None))
    pd.DataFrame(rows, columns=["member", "timestamp", "action", "amount"]).to_csv(root / "actions.csv", index=False)
    pd.DataFrame({"member": ["a", "b", "c"], "joined": ["2024-01-01"] * 3,
                  "left": [None, None, "2024-01-15"], "plan": ["gold", "basic", "basic"], "age": [34, 51, None]}).to_csv(
        root / "members.csv", index=False)
    mapping = root / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"input": str(root), **LONG_LOG, **edits}))
    return mapping, len(rows)


def mapping_config(tmp_path, mapping):
    return load_config("configs/test.yaml", [
        f"workdir={tmp_path / 'w'}", "data.source=mapping", f"data.mapping={mapping}",
        "data.events=${workdir}/raw/events.parquet", "data.users=${workdir}/raw/users.parquet",
        "data.foods=null", "data.truth=null", "model.streams=[events]",
    ])


def test_a_long_event_log_mapping_goes_all_the_way_to_a_feature_store(tmp_path):
    mapping, n_rows = write_long_log(tmp_path)
    path = features_stage(mapping_config(tmp_path, mapping))

    raw = tmp_path / "w" / "raw"
    events = pd.read_parquet(raw / "events.parquet")
    assert len(events) == n_rows == 3 * 29 + 3 * 5 + 1
    assert events.groupby(C.EVENT_TYPE).size().to_dict() == {"Workout": 87, "login": 1, "weigh_in": 15}
    weights = events[events[C.EVENT_TYPE] == "weigh_in"]
    assert pd.to_numeric(weights[C.VALUE]).tolist() == [80.0, 79.0, 78.0, 77.0, 76.0] * 3  # amount -> value
    users = pd.read_parquet(raw / "users.parquet")
    assert users[C.USER_ID].tolist() == ["m-a", "m-b", "m-c"] and users["plan"].tolist() == ["gold", "basic", "basic"]
    assert users["age"].tolist()[:2] == [34, 51]  # a CSV's numbers stay numbers through the mapping

    a, meta = load_arrays(path)
    assert {"workout", "weigh_in", "login"} <= set(meta.vocab["event_types"])  # lower-cased by validation
    assert meta.attributes["numeric"] == ["age"] and meta.attributes["categorical"] == ["plan"]
    assert a["events"]["ts"].shape == (n_rows,)
    ex = a["examples"]
    # Weekly Monday cutoffs (8th, 15th, 22nd) with a complete 7-day horizon: a and b get each
    # one; c's program ended on the 15th, so only the cutoff whose label window fits before it.
    assert np.bincount(ex["user_row"], minlength=3).tolist() == [3, 3, 1]
    assert ex["as_of"][ex["user_row"] == 2].tolist() == [int(pd.Timestamp("2024-01-08", tz="UTC").timestamp())]


def test_an_edited_mapping_converts_again(tmp_path):
    from pipeline.data.sources import ensure_raw

    mapping, _ = write_long_log(tmp_path)
    cfg = mapping_config(tmp_path, mapping)
    ensure_raw(cfg)
    events = tmp_path / "w" / "raw" / "events.parquet"
    assert "weigh_in" in set(pd.read_parquet(events)[C.EVENT_TYPE])
    write_long_log(tmp_path, events={**LONG_LOG["events"], "rename_types": {"weight": "weighed"}})
    ensure_raw(cfg)
    assert "weighed" in set(pd.read_parquet(events)[C.EVENT_TYPE])


def test_wide_counts_by_name_from_parquet_and_labels_with_their_own_as_of(tmp_path):
    pd.DataFrame({"uid": [1, 1, 2], "date": ["2024-03-01", "2024-03-02", "2024-03-01"], "steps": [5000, 0, 12000],
                  "meals": [3, 2, None], "note": ["x", "y", "z"]}).to_parquet(tmp_path / "daily.parquet")
    pd.DataFrame({"uid": [1, 2, 3], "week": ["2024-03-04"] * 3, "engaged": [1, 0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    mapping = Mapping(
        input=str(tmp_path),
        events=EventsMapping(files=["*.parquet"], shape="wide", columns={"user_id": "uid", "ts": "date"},
                             counts=["steps", "meals"], rename_types={"meals": "food_log"}),
        users=UsersMapping(from_events=True),
        labels=LabelsMapping(file="labels.csv", columns={"user_id": "uid", "as_of": "week", "label": "engaged"}),
    )
    paths = convert(mapping, tmp_path / "out")
    events = pd.read_parquet(paths["events"])
    assert events.columns.tolist() == [C.USER_ID, C.TS, C.EVENT_TYPE, C.VALUE]  # no note
    assert events.drop(columns=C.TS).values.tolist() == [
        ["1", "steps", 5000.0], ["1", "food_log", 3.0], ["1", "food_log", 2.0], ["2", "steps", 12000.0]]
    assert events[C.TS].tolist() == ["2024-03-01", "2024-03-01", "2024-03-02", "2024-03-01"]  # as written
    users = pd.read_parquet(paths["users"])
    assert users[C.PROGRAM_START].tolist() == [pd.Timestamp("2024-03-01", tz="UTC")] * 2
    labels = pd.read_parquet(paths["labels"])
    assert labels.values.tolist() == [["1", "2024-03-04", 1], ["2", "2024-03-04", 0], ["3", "2024-03-04", 1]]


def test_a_log_of_one_kind_takes_a_constant_event_type(tmp_path):
    pd.DataFrame({"person": ["p1", "p1"], "measured_at": [1704096000, 1704182400], "kg": [81.5, 81.0]}).to_csv(
        tmp_path / "scale.csv", index=False)
    mapping = Mapping(input=str(tmp_path), events=EventsMapping(
        files=["scale.csv"], event_type="weigh_in", columns={"user_id": "person", "ts": "measured_at", "value": "kg"}))
    paths = convert(mapping, tmp_path / "out")
    assert sorted(paths) == ["events"]  # no users or labels mapped
    events = pd.read_parquet(paths["events"])
    assert events[C.EVENT_TYPE].tolist() == ["weigh_in"] * 2 and events[C.VALUE].tolist() == ["81.5", "81.0"]


COLUMNS = LONG_LOG["events"]["columns"]


@pytest.mark.parametrize("edits, message", [
    ({"events": {"files": ["a*.csv"], "columns": {"user_id": "member", "ts": "timestamp"}}},
     "mapping events.columns lacks event_type"),
    ({"events": {"files": ["a*.csv"], "columns": {**COLUMNS, "ts": "when"}}},
     r"actions.csv: no column events.columns.ts: 'when' \(has: member, timestamp, action, amount\)"),
    ({"events": {"files": ["a*.csv"], "shape": "wide", "columns": {"user_id": "member", "ts": "timestamp"}}},
     "wide events need events.counts"),
    ({"users": {"file": "members.csv", "from_events": True}}, "set users.file .* or users.from_events"),
    ({"users": {"file": "members.csv", "columns": {"user_id": "member", "plan": "tier"}}},
     "members.csv: no column users.columns.plan: 'tier'"),
    ({"events": {"files": ["nothing*.csv"], "columns": COLUMNS}}, r"no file matches events.files=\['nothing\*.csv'\]"),
    ({"colour": "red"}, r"\(key colour\)"),
])
def test_mistakes_in_a_mapping_name_the_key_and_the_file(tmp_path, edits, message):
    mapping, _ = write_long_log(tmp_path, **edits)
    with pytest.raises(UserError, match=message):
        convert(load_mapping(mapping), tmp_path / "out")


def test_one_events_pattern_may_be_a_plain_string(tmp_path):
    mapping, n_rows = write_long_log(tmp_path, events={**LONG_LOG["events"], "files": "actions*.csv"})
    assert load_mapping(mapping).events.files == ["actions*.csv"]
    assert len(pd.read_parquet(convert(load_mapping(mapping), tmp_path / "out")["events"])) == n_rows


def test_a_file_name_gives_each_user_an_attribute(kdd_slice, tmp_path):
    from dataclasses import replace

    from features.adapters.mapping import convert, load_mapping

    mapping = replace(load_mapping("configs/mappings/kddcup2015-course.yaml"), input=str(kdd_slice))
    paths = convert(mapping, tmp_path / "course")
    plain = kddcup2015.convert(kdd_slice, tmp_path / "plain")
    pd.testing.assert_frame_equal(pd.read_parquet(paths["events"]), pd.read_parquet(plain["events"]))
    users = pd.read_parquet(paths["users"])
    assert list(users.columns) == [C.USER_ID, C.PROGRAM_START, "course"]
    daily = {c: pd.read_csv(kdd_slice / f"trainCourse{c}.csv") for c in ("1038", "1185")}
    expected = {f"e{e}": c for c, d in daily.items() for e in d.enrollment_id.unique()}
    assert users.set_index(C.USER_ID)["course"].to_dict() == expected
    bad = replace(mapping, events=replace(mapping.events, file_attributes={"course": "nothing(\\d+)"}))
    with pytest.raises(UserError, match="file_attributes.course"):
        convert(bad, tmp_path / "bad")
