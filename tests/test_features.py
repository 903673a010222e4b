import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from features import store as S
from features import timebuckets as tb
from features.dataset import FeatureDataset, collate, model_config_for
from features.labels import DAY
from features.stage import features_stage
from features.store import load_arrays, read_meta
from pipeline.config import load_config
from pipeline.errors import UserError
from tests.event_factories import START, build_store, make_events


def example_tensors(path, cfg, user_key: bytes, as_of: int) -> dict:
    meta = read_meta(path)
    ds = FeatureDataset(path, model_config_for(cfg.model, meta))
    keys = ds.user_key
    hit = np.flatnonzero((keys == user_key) & (ds.examples["as_of"] == as_of))
    assert len(hit) == 1
    return collate([ds[int(hit[0])]])


def flat(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        elif k not in ("label", "example"):
            out[k] = v
    return out


def test_dt_bucket_edges():
    ts = np.array([100, 100, 101, 161, 161 + 3 * 3600, 10**9], dtype=np.int64)
    starts = np.array([True, False, False, False, True, False])
    b = tb.dt_buckets(ts, starts)
    assert b[0] == tb.NO_PREVIOUS and b[4] == tb.NO_PREVIOUS  # first item of each user
    assert b[1] == tb.FIRST  # identical timestamps: the "< 1 s" bucket
    assert b[2] == tb.FIRST + 1  # exactly 1 s
    assert b[5] == tb.N_DT_BUCKETS - 1  # decades later: the last bucket
    secs = np.geomspace(0.5, 400 * DAY, 500)
    assert np.all(np.diff(tb.bucketize(secs)) >= 0) and tb.bucketize(secs).max() < tb.N_DT_BUCKETS
    assert len(tb.describe()) == tb.N_DT_BUCKETS


def test_leakage_changing_everything_after_as_of_leaves_inputs_unchanged(tmp_path, tiny_encoder):
    events = make_events(n_users=10, weeks=6, seed=1)
    path, cfg = build_store(tmp_path, events, tiny_encoder, "a")
    a, _ = load_arrays(path)
    ex = a["examples"]
    rng = np.random.default_rng(0)
    for i in rng.choice(np.flatnonzero(ex["label"] >= 0), size=3, replace=False):
        user_key, as_of = a["users"]["key"][ex["user_row"][i]], int(ex["as_of"][i])
        before = example_tensors(path, cfg, user_key, as_of)
        cut = pd.Timestamp(as_of, unit="s", tz="UTC")
        user = _user_of(events, user_key, cfg)
        later = events[(events.user_id == user) & (events.ts >= cut)]
        changed = events.drop(later.index[::2])  # delete half the future events...
        rest = changed.index.isin(later.index)
        changed.loc[rest, "ts"] = changed.loc[rest, "ts"] + pd.Timedelta(hours=5)  # ...move the others
        changed.loc[rest & (changed.event_type == "message"), "text"] = "a brand new future message"
        changed.loc[rest & (changed.event_type == "weigh_in"), "value"] = 150.0
        extra = pd.DataFrame({"user_id": [user] * 2, "ts": [cut, cut + pd.Timedelta(days=1)],
                              "event_type": ["brand_new_type", "food_log"], "food_ids": [None, [999, 1]],
                              "meal": [None, "lunch"]})
        changed = pd.concat([changed, extra], ignore_index=True)
        path2, _ = build_store(tmp_path, changed, tiny_encoder, f"b{i}")
        after = example_tensors(path2, cfg, user_key, as_of)
        fa, fb = flat(before), flat(after)
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.equal(fa[k], fb[k]), f"{k} changed for example {i}"


def _user_of(events, key, cfg):
    from features.vocab import pseudonyms

    ids = events.user_id.unique()
    return ids[pseudonyms(ids, cfg.features.pseudonym_key) == key][0]


def test_round_trip_what_is_written_is_what_is_read(tmp_path, tiny_encoder):
    events = make_events(n_users=8, seed=2)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, meta = load_arrays(path)
    types = ["<pad>", "<unk>"] + meta.vocab["event_types"]
    foods = meta.vocab["foods"]
    for row, uid in enumerate(sorted(events.user_id.unique())):
        src = events[events.user_id == uid].sort_values("ts", kind="stable")
        lo, hi = a["events"]["user_offsets"][row : row + 2]
        assert [types[t] for t in a["events"]["type_id"][lo:hi]] == src.event_type.tolist()
        assert a["events"]["ts"][lo:hi].tolist() == (src.ts.astype("int64") // 10**6).tolist()
        weigh = src.event_type == "weigh_in"
        np.testing.assert_allclose(a["events"]["value"][lo:hi][weigh.to_numpy()], src.value[weigh], rtol=1e-6)
        lo, hi = a["food"]["user_offsets"][row : row + 2]
        offs = a["food"]["meal_offsets"]
        meals = [[foods[f - 2] for f in a["food"]["food_ids"][offs[j] : offs[j + 1]]] for j in range(lo, hi)]
        assert meals == [list(m) for m in src[src.event_type == "food_log"].food_ids]
        lo, hi = a["conversation"]["user_offsets"][row : row + 2]
        msgs = src[src.event_type == "message"]
        assert a["conversation"]["msg_no"][lo:hi].tolist() == list(range(1, len(msgs) + 1))
        assert a["conversation"]["sender"][lo:hi].tolist() == [1 if s == "user" else 2 for s in msgs.sender]
        want = tiny_encoder.encode(msgs.text.tolist(), progress=False)
        np.testing.assert_allclose(a["conversation"]["embedding"][lo:hi], want, atol=2e-3)
    with h5py.File(path) as f:  # no raw text and no raw user id anywhere in the file
        blob = b"".join(f[g][d][()].tobytes() for g in f for d in f[g]) + str(dict(f.attrs)).encode()
    for text in events.text.dropna().unique():
        assert text.encode() not in blob
    for uid in events.user_id.unique():
        assert f'"{uid}"'.encode() not in blob


def test_derived_labels_match_a_brute_force_count(tmp_path, tiny_encoder):
    events = make_events(n_users=10, seed=3, per_user=(20, 90))
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, _ = load_arrays(path)
    ex = a["examples"]
    uids = sorted(events.user_id.unique())
    own = events[~((events.event_type == "message") & (events.sender == "coach"))]
    for i in range(len(ex["as_of"])):
        uid, as_of = uids[ex["user_row"][i]], int(ex["as_of"][i])
        t = own[own.user_id == uid].ts.astype("int64") // 10**6
        days = {int((x - as_of) // DAY) for x in t if as_of <= x < as_of + 7 * DAY}
        assert ex["label"][i] == int(len(days) >= cfg.labels.min_active_days)
        # eligibility: at least one event of any kind strictly before as_of
        assert (events[events.user_id == uid].ts.astype("int64") // 10**6 < as_of).any()


def test_edge_users_coach_only_single_event_no_meals(tmp_path, tiny_encoder):
    events = make_events(n_users=6, seed=4)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, meta = load_arrays(path)
    ds = FeatureDataset(path, model_config_for(cfg.model, meta))
    rows = {uid: r for r, uid in enumerate(sorted(events.user_id.unique()))}
    ex = a["examples"]
    coach_only = np.flatnonzero(ex["user_row"] == rows["u0"])
    assert len(coach_only) and (ex["label"][coach_only] == 0).all()  # coach messages are not activity
    batch = collate([ds[int(i)] for i in np.flatnonzero(np.isin(ex["user_row"], [rows["u0"], rows["u1"], rows["u2"]]))])
    assert batch["food"]["padding_mask"].all(dim=1).any()  # someone with no meals: a fully padded row
    assert batch["food"]["food_ids"].shape[1] >= 1 and batch["presence"].shape[1] == 3
    for s in ("conversation", "food", "events"):
        m = batch[s]["padding_mask"]
        assert (batch[s]["position"][m] == 0).all() and (batch[s]["position"][~m] > 0).all()


def test_dataset_keeps_the_most_recent_items_and_derives_recency(tmp_path, tiny_encoder):
    events = make_events(n_users=4, seed=5, per_user=(80, 120))
    path, cfg = build_store(tmp_path, events, tiny_encoder, "w", "model.max_len_events=5")
    a, meta = load_arrays(path)
    ds = FeatureDataset(path, model_config_for(cfg.model, meta))
    i = int(np.argmax(a["examples"]["events_end"] - a["examples"]["events_start"]))
    item = ds[i]
    end = a["examples"]["events_end"][i]
    as_of = a["examples"]["as_of"][i]
    assert item["events"]["position"].tolist() == [5, 4, 3, 2, 1]
    np.testing.assert_array_equal(item["events"]["dt_bucket"], a["events"]["dt_bucket"][end - 5 : end])
    np.testing.assert_array_equal(item["events"]["recency"], tb.bucketize(as_of - a["events"]["ts"][end - 5 : end]))
    assert (a["events"]["ts"][end - 5 : end] < as_of).all() and a["events"]["ts"][end] >= as_of


def test_splits_by_user_and_out_of_time(tmp_path, tiny_encoder):
    events = make_events(n_users=30, weeks=8, seed=6)
    path, cfg = build_store(tmp_path, events, tiny_encoder, "w", "labels.oot_cutoffs=2")
    ex, _ = load_arrays(path, ("examples",))
    ex = ex["examples"]
    oot = ex["split"] == S.SPLITS.index("oot")
    assert set(np.unique(ex["as_of"][oot])) == set(np.unique(ex["as_of"])[-2:])
    for u in np.unique(ex["user_row"]):
        assert len(set(ex["split"][(ex["user_row"] == u) & ~oot])) <= 1  # never straddles


def test_message_cache_embeds_only_new_messages(tmp_path, tiny_encoder):
    events = make_events(n_users=6, seed=7)
    calls = []
    real = tiny_encoder.encode

    def counting(texts, *a, **k):
        calls.append(len(texts))
        return real(texts, *a, **k)

    tiny_encoder.encode = counting
    try:
        build_store(tmp_path, events, tiny_encoder)
        first = sum(calls)
        assert first == events.text.dropna().nunique()
        more = pd.DataFrame({"user_id": ["u3", "u3", "u4"], "event_type": ["message"] * 3, "sender": ["user"] * 3,
                             "ts": [START + pd.Timedelta(days=50, hours=h) for h in (1, 2, 3)],
                             "text": ["totally new one", "message 1 for you", "another new one"]})
        build_store(tmp_path, pd.concat([events, more], ignore_index=True), tiny_encoder)
        assert sum(calls) - first == 2  # only the two unseen texts
    finally:
        del tiny_encoder.encode
    cache_files = list((tmp_path / "w" / "features" / "text_cache").rglob("*.h5"))
    blob = b"".join(p.read_bytes() for p in cache_files)
    assert b"totally new one" not in blob and len(cache_files) == 2


def test_schema_mismatch_and_truncated_file_are_clear_errors(tmp_path, tiny_encoder):
    path, cfg = build_store(tmp_path, make_events(n_users=4, seed=8), tiny_encoder)
    bad = tmp_path / "old.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "a") as f:
        f.attrs["schema_version"] = json.dumps(S.SCHEMA_VERSION + 1)
    with pytest.raises(UserError, match="schema version .* rebuild"):
        load_arrays(bad)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        FeatureDataset(cut, cfg.model)


def test_interrupted_write_leaves_previous_file_intact(tmp_path, tiny_encoder, monkeypatch):
    path, cfg = build_store(tmp_path, make_events(n_users=4, seed=9), tiny_encoder)
    before = path.read_bytes()

    real = h5py.Group.create_dataset

    def killed_half_way(self, name, *a, **k):
        if name == "food_ids":
            raise RuntimeError("killed mid-write")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", killed_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        build_store(tmp_path, make_events(n_users=5, seed=10), tiny_encoder)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_arrays(path)[0]["examples"]["as_of"].size > 0
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no litter


def test_kdd_adapter_on_a_slice_of_the_real_files(tmp_path):

    src = tmp_path / "kdd"
    src.mkdir()
    real = "../shared/data/kddcup2015"
    daily = pd.read_csv(f"{real}/trainCourse1038.csv")
    keep = daily.enrollment_id.unique()[:40]
    daily[daily.enrollment_id.isin(keep)].to_csv(src / "trainCourse1038.csv", index=False)
    truth = pd.read_csv(f"{real}/truth_train.csv")
    truth.to_csv(src / "truth_train.csv", index=False)
    cfg = load_config("configs/kddcup.yaml", [f"workdir={tmp_path / 'w'}", f"data.adapter_input={src}"])
    path = features_stage(cfg)
    a, meta = load_arrays(path)
    ex = a["examples"]
    counts = daily[daily.enrollment_id.isin(keep)].set_index("enrollment_id").iloc[:, 1:].sum(axis=1)
    active = counts[counts > 0].index.unique()
    assert len(ex["as_of"]) == len(active)  # one example per enrollment with any activity
    assert set(np.unique(ex["as_of"])) == {int(pd.Timestamp("2014-06-24", tz="UTC").timestamp())}
    engaged = 1 - truth.set_index("enrollment_id").loc[active, "label"]
    assert ex["label"].mean() == pytest.approx(engaged.mean())
    assert meta.vocab["event_types"][:4] == ["message", "food_log", "weigh_in", "content_view"]
    assert {"access", "video", "problem"} <= set(meta.vocab["event_types"])
    assert a["conversation"]["embedding"].shape == (0, 0)  # no messages: no encoder needed


def test_an_up_to_date_store_is_reused_and_a_changed_setting_rebuilds(tmp_path, tiny_encoder):
    events = make_events(n_users=5, seed=11)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    stamp = path.stat().st_mtime_ns
    again, _ = build_store(tmp_path, events, tiny_encoder)
    assert again == path and path.stat().st_mtime_ns == stamp  # same inputs and settings: reused
    build_store(tmp_path, events, tiny_encoder, "w", "labels.min_active_days=2")
    assert path.stat().st_mtime_ns != stamp  # a label setting changed: rebuilt


def test_a_model_that_cannot_load_offline_says_how_to_point_at_a_local_copy():
    from features.text_vectors import TextEncoder

    with pytest.raises(UserError, match="local-dir .* features.text_encoder="):
        TextEncoder.load("distilbert-base-uncased-not-on-this-machine")
