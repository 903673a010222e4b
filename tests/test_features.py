import dataclasses
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from common.errors import UserError
from features import store as S
from features import timebuckets as tb
from features.dataset import FeatureDataset, collate, model_config_for
from features.labels import DAY
from features.store import STREAMS, load_arrays, read_meta
from pipeline.config import load_config
from pipeline.data.features import features_stage
from tests.event_factories import START, build_store, make_events


def flat(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items()}
        elif k not in ("label", "future", "example"):  # targets, not inputs
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


def tensors_at(path, cfg, as_of: int) -> dict:
    """{user key: flattened tensors} of every example at `as_of`, each collated alone (so
    padding never depends on the other examples)."""
    meta = read_meta(path)
    ds = FeatureDataset(path, model_config_for(cfg.model, meta))
    rows = np.flatnonzero(ds.examples["as_of"] == as_of)
    return {bytes(ds.user_key[i]): flat(collate([ds[int(i)]])) for i in rows}


def rewrite_the_future(events: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame:
    """Every event at or after `cut` changed, a third of them deleted, and new events added:
    new foods, a new meal, new event types and content, new users who appear only then (and sort first, so every user row shifts)."""
    future = (events.ts >= cut).to_numpy()
    out = events.copy()
    f = pd.Series(future, index=out.index)
    msg, weigh, meals, views, other = (f & (out.event_type == t) for t in
                                       ("message", "weigh_in", "food_log", "content_view", "water_log"))
    out.loc[f, "ts"] = out.loc[f, "ts"] + pd.Timedelta(hours=5)  # moved, still after the cut
    out.loc[msg, "text"] = [f"a brand new future message {i}" for i in range(msg.sum())]
    out.loc[msg, "sender"] = out.loc[msg, "sender"].map({"user": "coach", "coach": "user"})
    out.loc[weigh, "value"] = out.loc[weigh, "value"] + 30.0
    out.loc[meals, "food_ids"] = pd.Series([[999, 1000 + i % 3] for i in range(meals.sum())], index=out.index[meals])
    out.loc[meals, "meal"] = "brunch"
    out.loc[views, "content_id"] = "c-only-later"
    out.loc[other, "event_type"] = "brand_new_type"
    out = out.drop(out.index[future][::3])  # and delete a third of them
    at_cut = [  # exactly at as_of counts as the future too
        {"user_id": u, "ts": cut, "event_type": "food_log", "food_ids": [4242], "meal": "supper"}
        for u in events.user_id.unique()
    ]
    newcomers = [
        {"user_id": f"a-newcomer-{k}", "ts": cut + pd.Timedelta(days=d, hours=k), "event_type": t,
         **({"food_ids": [777, 101], "meal": "lunch"} if t == "food_log" else {}),
         **({"sender": "user", "text": "hi, I am new here"} if t == "message" else {})}
        for k in range(3) for d in range(3) for t in ("food_log", "message", "sleep_log")
    ]
    return pd.concat([out, pd.DataFrame(at_cut + newcomers)], ignore_index=True)


@pytest.mark.parametrize("eligibility", [[], ["labels.max_inactive_days=7"]], ids=["default", "max_inactive_days"])
def test_leakage_changing_everything_at_or_after_as_of_leaves_every_example_unchanged(tmp_path, tiny_encoder, eligibility):
    """docs/design.md §3: for every user at once, events at or after as_of are changed, moved,
    deleted or added (with foods, meals, event types, content and users that only exist
    later, which must not renumber any vocabulary), or all deleted; every example at that
    as_of keeps exactly the same tensors. Only labels (and splits) may differ. With an
    eligibility rule on, the same users stay eligible."""
    events = make_events(n_users=10, weeks=6, seed=1)
    scoring = "labels.include_unlabelled=true"  # an as_of stays an example when the log ends there
    path, cfg = build_store(tmp_path, events, tiny_encoder, "a", scoring, *eligibility)
    as_ofs = np.unique(load_arrays(path, ("examples",))[0]["examples"]["as_of"])
    as_of = int(as_ofs[len(as_ofs) // 2])
    cut = pd.Timestamp(as_of, unit="s", tz="UTC")
    before = tensors_at(path, cfg, as_of)
    assert len(before) >= (4 if eligibility else 8)  # nearly every user, or every recently active one
    variants = {
        "rewritten": (rewrite_the_future(events, cut), ()),
        "deleted": (events[events.ts < cut], (f"data.until={cut.isoformat()}",)),
    }
    for name, (changed, extra) in variants.items():
        path2, _ = build_store(tmp_path, changed, tiny_encoder, name, scoring, *eligibility, *extra)
        report = json.loads((tmp_path / name / "validated" / "validation.json").read_text())
        assert report["quarantined"] == 0 and report["accepted"] == len(changed)  # every change arrived
        after = tensors_at(path2, cfg, as_of)
        assert after.keys() == before.keys(), name  # the same users, no newcomer
        for user, fa in before.items():
            fb = after[user]
            assert fa.keys() == fb.keys()
            for k in fa:
                assert torch.equal(fa[k], fb[k]), f"{name}: {k} changed for user {user!r} at as_of {cut}"


def test_users_who_leave_flood_the_examples_unless_eligibility_ends(tmp_path, tiny_encoder, capsys):
    """Six learners active for two weeks of a 12-week log, two active throughout: every week
    the leavers stay eligible as easy negatives, unless max_inactive_days, program_end or
    last_cutoff ends their eligibility."""
    rng = np.random.default_rng(0)
    rows = [{"user_id": f"u{u}", "ts": START + pd.Timedelta(days=int(d), hours=int(rng.integers(8, 20))),
             "event_type": "water_log", "value": 250.0}
            for u in range(8) for d in range(0, 84 if u < 2 else 14) if rng.random() < 0.7]
    events = pd.DataFrame(rows).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    flood_path, _ = build_store(tmp_path, events, tiny_encoder, "flood")
    flood = load_arrays(flood_path, ("examples",))[0]["examples"]
    out = capsys.readouterr().out
    assert "no own activity in the 28 days before as_of" in out and "labels.max_inactive_days" in out
    leavers = flood["user_row"] >= 2
    assert leavers.mean() > 0.6 and (flood["label"][leavers & (flood["as_of"] > int(START.timestamp()) + 21 * 86400)] == 0).all()

    quiet_path, _ = build_store(tmp_path, events, tiny_encoder, "quiet", "labels.max_inactive_days=14")
    quiet = load_arrays(quiet_path, ("examples",))[0]["examples"]
    last_seen = int((START + pd.Timedelta(days=14)).timestamp())
    assert (quiet["as_of"][quiet["user_row"] >= 2] <= last_seen + 14 * 86400).all()
    assert (quiet["user_row"] < 2).sum() == (flood["user_row"] < 2).sum()  # the active stay
    assert "easy negatives" not in capsys.readouterr().out

    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(8)],
                          "program_end": [START + pd.Timedelta(days=84 if u < 2 else 21) for u in range(8)]})
    users.to_parquet(tmp_path / "users.parquet")
    ended_path, _ = build_store(tmp_path, events, tiny_encoder, "ended", f"data.users={tmp_path / 'users.parquet'}")
    ended = load_arrays(ended_path, ("examples",))[0]["examples"]
    end = int((START + pd.Timedelta(days=21)).timestamp())
    assert (ended["as_of"][ended["user_row"] >= 2] + 7 * 86400 <= end).all()  # the label's window fits
    assert (ended["user_row"] < 2).sum() == (flood["user_row"] < 2).sum()

    from features.build import _program_end  # unknown ends stay "never", whatever the table holds

    half = users.assign(program_end=[users.program_end[0], pd.NaT, *users.program_end[2:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN cast to int64 warns (and gives garbage)
        ends = _program_end(np.array(["u0", "u1", "u9"], dtype=object), half)
    assert ends[1] == ends[2] == np.iinfo(np.int64).max and ends[0] == int(users.program_end[0].timestamp())

    cut = (START + pd.Timedelta(days=35)).isoformat()
    capped_path, _ = build_store(tmp_path, events, tiny_encoder, "capped", f"labels.last_cutoff={cut}")
    capped = load_arrays(capped_path, ("examples",))[0]["examples"]
    assert capped["as_of"].max() <= int(pd.Timestamp(cut).timestamp()) < flood["as_of"].max()


def test_round_trip_what_is_written_is_what_is_read(tmp_path, tiny_encoder):
    events = make_events(n_users=8, seed=2)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, meta = load_arrays(path)
    types = ["<pad>", "<unk>"] + meta.vocab["event_types"]
    assert meta.vocab["senders"] == ["user", "coach"] and meta.sizes()["n_senders"] == 3
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
        senders = ["<pad>"] + meta.vocab["senders"]  # the stored vocabulary decodes the ids
        assert [senders[s] for s in a["conversation"]["sender"][lo:hi]] == msgs.sender.tolist()
        want = tiny_encoder.encode(msgs.text.tolist(), progress=False)
        np.testing.assert_allclose(a["conversation"]["embedding"][lo:hi], want, atol=2e-3)
    with h5py.File(path) as f:  # no raw text and no raw user id anywhere in the file
        blob = b"".join(f[g][d][()].tobytes() for g in f for d in f[g]) + str(dict(f.attrs)).encode()
    for text in events.text.dropna().unique():
        assert text.encode() not in blob
    for uid in events.user_id.unique():
        assert f'"{uid}"'.encode() not in blob


def test_derived_labels_and_future_days_match_a_brute_force_count(tmp_path, tiny_encoder):
    from features.aggregates import future_activity

    events = make_events(n_users=10, seed=3, per_user=(20, 90))
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, meta = load_arrays(path)
    ex = a["examples"]
    future = future_activity(a, meta, 7)  # (n, 7): the auxiliary targets, the days the label counts
    uids = sorted(events.user_id.unique())
    own = events[~((events.event_type == "message") & (events.sender == "coach"))]
    for i in range(len(ex["as_of"])):
        uid, as_of = uids[ex["user_row"][i]], int(ex["as_of"][i])
        t = own[own.user_id == uid].ts.astype("int64") // 10**6
        days = {int((x - as_of) // DAY) for x in t if as_of <= x < as_of + 7 * DAY}
        assert ex["label"][i] == int(len(days) >= cfg.labels.min_active_days)
        assert set(np.flatnonzero(future[i])) == days
        # eligibility: at least one event of any kind strictly before as_of
        assert (events[events.user_id == uid].ts.astype("int64") // 10**6 < as_of).any()
    labelled = ex["label"] >= 0
    assert labelled.any() and future.any() and not future.all()
    assert np.array_equal((future.sum(1) >= cfg.labels.min_active_days)[labelled], ex["label"][labelled] == 1)
    with pytest.raises(UserError, match="future_days=8 exceeds labels.horizon_days=7"):
        FeatureDataset(path, dataclasses.replace(model_config_for(cfg.model, meta), future_days=8), targets=True)
    plain = FeatureDataset(path, model_config_for(cfg.model, meta))  # predicting: no targets computed
    assert plain.future is None and "future" not in plain[0]
    assert np.array_equal(FeatureDataset(path, model_config_for(cfg.model, meta), targets=True)[0]["future"], future[0])
    assert model_config_for(cfg.model, meta).future_days == 7  # -1: the label's horizon
    last = ex["as_of"] == ex["as_of"].max()  # a log ending 3 days after it: days 3..6 unknown (-1)
    cut = future_activity(a, dataclasses.replace(meta, extra=meta.extra | {"data_end": int(ex["as_of"].max()) + 3 * DAY}), 7)
    assert (cut[last, 3:] == -1).all() and np.array_equal(cut[last, :3], future[last, :3])
    assert np.array_equal(cut[~last], future[~last])
    supplied = dataclasses.replace(meta, config=meta.config | {"data": {"labels": "labels.parquet"}})
    assert model_config_for(cfg.model, supplied).future_days == 0  # a supplied label's days may be unlogged


def test_edge_users_coach_only_single_event_no_meals(tmp_path, tiny_encoder):
    events = make_events(n_users=6, seed=4)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    a, meta = load_arrays(path)
    ds = FeatureDataset(path, model_config_for(cfg.model, meta))
    rows = {uid: r for r, uid in enumerate(sorted(events.user_id.unique()))}
    ex = a["examples"]

    def batch_of(uid: str) -> dict:  # every example of one user, in one batch
        idx = np.flatnonzero(ex["user_row"] == rows[uid])
        assert len(idx), f"{uid} has no examples"
        return collate([ds[int(i)] for i in idx])

    stream_no = {s: i for i, s in enumerate(STREAMS)}
    # u0: only coach messages. Never engaged (coach messages are not activity), but its
    # examples see those messages: a conversation of coach turns, no meals.
    coach_only = batch_of("u0")
    assert (coach_only["label"] == 0).all()
    conv = coach_only["conversation"]
    assert (~conv["padding_mask"]).any(dim=1).all()
    assert (conv["sender"][~conv["padding_mask"]] == 2).all()  # 2 = coach
    assert coach_only["food"]["padding_mask"].all()
    # u1: one event in its whole history: every example has an events stream of length 1.
    single = batch_of("u1")
    assert single["events"]["padding_mask"].shape[1] == 1
    assert (~single["events"]["padding_mask"]).sum(dim=1).tolist() == [1] * len(single["label"])
    assert (single["events"]["position"] == 1).all()
    assert single["presence"][:, stream_no["events"]].eq(1).all()
    assert single["events"]["dt_bucket"].eq(tb.NO_PREVIOUS).all()  # no previous item
    # u2: events but never a meal: a fully padded food stream (T >= 1) and presence 0.
    no_meals = batch_of("u2")
    assert no_meals["food"]["padding_mask"].all() and no_meals["food"]["food_ids"].shape[1] >= 1
    assert no_meals["presence"][:, stream_no["food"]].eq(0).all()
    assert no_meals["presence"][:, stream_no["events"]].eq(1).all()
    for batch in (coach_only, single, no_meals):
        assert batch["presence"].shape[1] == 3
        for s in STREAMS:
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


def test_subsets_share_one_read_of_the_store_and_workers_give_the_same_batches(sim_store, monkeypatch, tmp_path):
    import os
    import pickle

    from features import dataset as D
    from pipeline.training import loop

    path, _, mcfg = sim_store
    log = tmp_path / "reads.txt"  # a file, so reads in worker processes count too
    real = D.load_arrays

    def counted(f, groups=None):
        if groups == STREAMS:
            with open(log, "a") as out:
                out.write(f"{os.getpid()}\n")
        return real(f, groups)

    def stream_reads() -> list[str]:
        return log.read_text().split() if log.exists() else []

    monkeypatch.setattr(D, "load_arrays", counted)
    data = FeatureDataset(path, mcfg)
    train, val = data.subset(data.select(["train"])), data.subset(data.select(["val"]))
    train[0], val[0], train[1]
    assert stream_reads() == [str(os.getpid())] and train._load() is val._load()  # one read for every subset

    shipped = pickle.loads(pickle.dumps(train))  # what a spawned worker receives: no arrays
    assert shipped._arrays is None and shipped._loaded == {} and len(shipped) == len(train)

    order = list(range(min(len(val), 40)))
    in_process = list(loop.loader(val, 8, collate, order))
    log.unlink()
    fresh = FeatureDataset(path, mcfg).subset(data.select(["val"]))  # nothing read yet
    with_workers = list(loop.loader(fresh, 8, collate, order, num_workers=2))
    assert len(in_process) == len(with_workers) > 1
    for a, b in zip(in_process, with_workers):
        for k, t in a.items():
            if isinstance(t, dict):
                assert all(torch.equal(t[j], b[k][j]) for j in t), k
            else:
                assert torch.equal(t, b[k]), k
    assert stream_reads() == [str(os.getpid())]  # read once, by the loader; the forked workers share it


def test_splits_by_user_and_out_of_time(tmp_path, tiny_encoder):
    events = make_events(n_users=30, weeks=8, seed=6)
    path, cfg = build_store(tmp_path, events, tiny_encoder, "w", "labels.oot_cutoffs=2")
    ex, _ = load_arrays(path, ("examples",))
    ex = ex["examples"]
    oot = ex["split"] == S.SPLITS.index("oot")
    assert set(np.unique(ex["as_of"][oot])) == set(np.unique(ex["as_of"])[-2:])
    for u in np.unique(ex["user_row"]):
        assert len(set(ex["split"][(ex["user_row"] == u) & ~oot])) <= 1  # never straddles


def test_denser_training_cutoffs_add_training_examples_only_and_none_that_see_out_of_time_days(tmp_path, tiny_encoder):
    events = make_events(n_users=30, weeks=8, seed=6)
    keys = ("user_row", "as_of", "label", "events_start", "events_end", "conversation_end", "food_end")
    plain = load_arrays(build_store(tmp_path, events, tiny_encoder, "w", "labels.oot_cutoffs=2")[0], ("examples",))[0]
    path, cfg = build_store(tmp_path, events, tiny_encoder, "d", "labels.oot_cutoffs=2", "labels.train_cutoff_every_days=2")
    dense = load_arrays(path, ("examples",))[0]
    p, d = plain["examples"], dense["examples"]
    train = S.SPLITS.index("train")

    def rows(ex, mask):
        return {tuple(int(ex[k][i]) for k in keys) for i in np.flatnonzero(mask)}

    for split in ("val", "test", "oot"):  # the evaluated examples are exactly the calendar's
        code = S.SPLITS.index(split)
        assert rows(d, d["split"] == code) == rows(p, p["split"] == code) != set(), split
    assert rows(p, p["split"] == train) < rows(d, d["split"] == train)
    calendar = np.unique(p["as_of"])
    extra = (d["split"] == train) & ~np.isin(d["as_of"], calendar)
    assert extra.sum() > 2 * (p["split"] == train).sum()  # about twice as many training windows, and more
    assert set(np.unique(d["user_row"][extra])) <= set(np.unique(p["user_row"][p["split"] == train]))
    assert ((d["as_of"][extra] - calendar[0]) % (2 * DAY) == 0).all()
    oot_from = np.unique(p["as_of"][p["split"] == S.SPLITS.index("oot")]).min()
    horizon = cfg.labels.horizon_days * DAY
    assert (d["as_of"][extra] + horizon <= oot_from).all()  # no training label reads an out-of-time day
    assert (d["as_of"][extra] + horizon >= oot_from - 2 * DAY).any()  # and the grid runs up to it
    last = pd.Timestamp(int(calendar[2]), unit="s", tz="UTC").isoformat()  # labels.last_cutoff holds for them too
    cut = load_arrays(build_store(tmp_path, events, tiny_encoder, "c", "labels.train_cutoff_every_days=2", "labels.oot_cutoffs=0",
                                  f"labels.last_cutoff={last}")[0], ("examples",))[0]["examples"]
    assert cut["as_of"].max() == calendar[2] and (cut["as_of"] < calendar[2]).sum() > (p["as_of"] < calendar[2]).sum()


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
    blob = b"".join(p.read_bytes() for p in cache_files)  # the date-mention cache's files too: no text
    assert b"totally new one" not in blob and len([p for p in cache_files if "date-mentions" not in str(p)]) == 2


def test_the_vector_cache_reads_the_rows_asked_for_across_segments_and_blocks(tmp_path, monkeypatch):
    from features.text_vectors import VectorCache

    monkeypatch.setattr(VectorCache, "BLOCK_ROWS", 4)  # segments of 5, 9 and 2 rows span blocks
    rng = np.random.default_rng(0)
    cache = VectorCache(tmp_path, "enc")
    keys = np.array([f"{i:016d}".encode() for i in range(16)], dtype="S16")
    vectors = rng.normal(size=(16, 3)).astype(np.float16)
    for lo, hi in ((0, 5), (5, 14), (14, 16)):
        cache.add(keys[lo:hi], vectors[lo:hi])
    cache.add(keys[:2], vectors[:2] + 1)  # a text cached twice (side-by-side builds): the first copy counts
    rows = rng.integers(0, 16, size=40)
    for c in (cache, VectorCache(tmp_path, "enc")):  # as written, and read back from disk
        np.testing.assert_array_equal(c.read(c.lookup(keys[rows]), 3), vectors[rows])
        assert c.read(np.zeros(0, np.int64), 3).shape == (0, 3)
        # absent keys, sorting before, between and after the cached ones: -1 (binary search)
        absent = np.array([b"\x00" * 16, f"{5:015d}x".encode(), b"\xff" * 16], dtype="S16")
        assert (c.lookup(absent) == -1).all() and (c.lookup(keys[[15, 0]]) == [15, 0]).all()
    assert not hasattr(VectorCache(tmp_path, "enc"), "vectors")  # nothing but keys held in memory


def test_the_vector_cache_reuses_what_this_process_read_and_sees_segments_written_since(tmp_path, monkeypatch):
    from features import text_vectors as T

    monkeypatch.setattr(T.VectorCache, "_seen", {})  # as a fresh process
    rng = np.random.default_rng(1)
    keys = np.array([f"{i:016d}".encode() for i in range(16)], dtype="S16")
    vectors = rng.normal(size=(16, 3)).astype(np.float16)
    first = T.VectorCache(tmp_path, "enc")
    first.add(keys[:8], vectors[:8])
    opened, real = [], T.h5py.File
    monkeypatch.setattr(T.h5py, "File", lambda p, *a, **k: (opened.append(Path(p).name), real(p, *a, **k))[1])
    again = T.VectorCache(tmp_path, "enc")  # the next shard in this process
    assert opened == [] and again._sorted is first._sorted  # nothing read or sorted again
    # A segment another process wrote since, named to sort before ours: rows are numbered anew.
    with real(tmp_path / "enc" / "seg-0-other.h5", "w") as f:
        f["keys"], f["vectors"] = keys[8:], vectors[8:]
    later = T.VectorCache(tmp_path, "enc")
    assert opened == ["seg-0-other.h5"]  # only the new segment is read
    rows = rng.integers(0, 16, size=40)
    monkeypatch.setattr(T.h5py, "File", real)
    np.testing.assert_array_equal(later.read(later.lookup(keys[rows]), 3), vectors[rows])
    monkeypatch.setattr(T.VectorCache, "_seen", {})  # a process that never read the cache: the same rows
    fresh = T.VectorCache(tmp_path, "enc")
    np.testing.assert_array_equal(fresh.lookup(keys[rows]), later.lookup(keys[rows]))
    for seg in (tmp_path / "enc").glob("seg-*"):  # the cache cleared: nothing is remembered
        seg.unlink()
    assert len(T.VectorCache(tmp_path, "enc").keys) == 0 and (T.VectorCache(tmp_path, "enc").lookup(keys) == -1).all()


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


def test_an_up_to_date_store_is_reused_and_a_changed_setting_or_code_rebuilds(tmp_path, tiny_encoder, monkeypatch):
    from pipeline.data import features as stage

    events = make_events(n_users=5, seed=11)
    path, cfg = build_store(tmp_path, events, tiny_encoder)
    stamp = path.stat().st_mtime_ns
    again, _ = build_store(tmp_path, events, tiny_encoder)
    assert again == path and path.stat().st_mtime_ns == stamp  # same inputs and settings: reused
    build_store(tmp_path, events, tiny_encoder, "w", "labels.min_active_days=2")
    assert path.stat().st_mtime_ns != stamp  # a label setting changed: rebuilt
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(stage, "feature_code", lambda: "other feature code")
    build_store(tmp_path, events, tiny_encoder, "w", "labels.min_active_days=2")
    assert path.stat().st_mtime_ns != stamp  # the same settings, other feature code: rebuilt


def test_a_build_whose_texts_are_all_cached_never_loads_the_encoder_weights(tmp_path, tiny_encoder_dir):
    """TextEncoder.load reads a local model's config and digests its files (identity and width);
    the tokenizer and weights only when a text must be encoded."""
    from features.store import load_arrays
    from features.text_vectors import TextEncoder

    events = make_events(n_users=4, seed=3)
    first = TextEncoder.load(str(tiny_encoder_dir), "cpu")
    assert first._parts is None and first.dim == 16
    cache = f"features.cache_dir={tmp_path / 'cache'}"
    path, _ = build_store(tmp_path, events, first, "a", cache)
    assert first._parts is not None  # texts were encoded
    again = TextEncoder.load(str(tiny_encoder_dir), "cpu")
    assert (again.identity, again.dim) == (first.identity, first.dim)
    rebuilt, _ = build_store(tmp_path, events, again, "b", cache)  # another workdir, the same cache
    assert again._parts is None and rebuilt != path
    np.testing.assert_array_equal(load_arrays(rebuilt, ("conversation",))[0]["conversation"]["embedding"],
                                  load_arrays(path, ("conversation",))[0]["conversation"]["embedding"])


def test_a_model_that_cannot_load_offline_says_how_to_point_at_a_local_copy():
    from features.text_vectors import TextEncoder

    with pytest.raises(UserError, match="local-dir .* features.text_encoder="):
        TextEncoder.load("distilbert-base-uncased-not-on-this-machine")
    with pytest.raises(UserError, match="no such folder on this machine; .* default 'minilm'"):  # a path, not a name
        TextEncoder.load("/models/distilbert-base-uncased-not-on-this-machine")


def test_changed_validation_settings_validate_again_and_rebuild(tmp_path, tiny_encoder):
    heavy = pd.DataFrame({"user_id": ["u3"], "ts": [START + pd.Timedelta(days=3)], "event_type": ["weigh_in"],
                          "value": [900.0]})
    events = pd.concat([make_events(n_users=5, seed=12), heavy], ignore_index=True)
    path, _ = build_store(tmp_path, events, tiny_encoder)
    report_file = tmp_path / "w" / "validated" / "validation.json"
    report = json.loads(report_file.read_text())
    assert report["reasons"] == {"weigh_in_impossible_value": 1} and report["settings"]["max_weight_kg"] == 400
    stamp = path.stat().st_mtime_ns

    build_store(tmp_path, events, tiny_encoder, "w", "data.max_weight_kg=1000")  # same files, new limit
    report = json.loads(report_file.read_text())
    assert report["quarantined"] == 0 and report["settings"]["max_weight_kg"] == 1000
    assert path.stat().st_mtime_ns != stamp  # rebuilt from the new validation
    assert 900.0 in load_arrays(path, ("events",))[0]["events"]["value"]

    stamp = path.stat().st_mtime_ns
    allowed = "data.allowed_event_types=[message,food_log,weigh_in,content_view]"
    build_store(tmp_path, events, tiny_encoder, "w", "data.max_weight_kg=1000", allowed)
    report = json.loads(report_file.read_text())
    assert report["reasons"] == {"unknown_event_type": int((events.event_type == "water_log").sum())}
    assert path.stat().st_mtime_ns != stamp
    a, meta = load_arrays(path, ("events",))
    water = meta.vocab["event_types"].index("water_log") + 2  # still in the append-only vocabulary
    assert water not in a["events"]["type_id"]  # but no such event in the store any more


def test_rows_quarantined_as_future_are_validated_again_once_due(tmp_path):
    from pipeline.data.validate import ensure_validated

    now = START + pd.Timedelta(days=20)
    early = pd.DataFrame({"user_id": ["u3"], "ts": [now + pd.Timedelta(days=3)], "event_type": ["weigh_in"],
                          "value": [81.0]})  # 3 days ahead of the clock: max_future_days is 1
    src = tmp_path / "events.parquet"
    pd.concat([make_events(n_users=4, weeks=3, seed=14), early], ignore_index=True).to_parquet(src)
    cfg = load_config("configs/test.yaml", [f"workdir={tmp_path / 'w'}", f"data.events={src}", "data.source=files",
                                            "data.users=null", "data.foods=null", "data.truth=null"])
    out = ensure_validated(cfg, now=now)
    report = json.loads((out / "validation.json").read_text())
    assert report["reasons"] == {"future_timestamp": 1}
    assert pd.Timestamp(report["earliest_future_ts"]) == now + pd.Timedelta(days=3)
    stamp = (out / "validation.json").stat().st_mtime_ns

    assert ensure_validated(cfg, now=now + pd.Timedelta(days=1)) == out  # still > 1 day ahead: reused
    assert (out / "validation.json").stat().st_mtime_ns == stamp

    ensure_validated(cfg, now=now + pd.Timedelta(days=2))  # the row is now within the day allowed
    report = json.loads((out / "validation.json").read_text())
    assert report["quarantined"] == 0 and report["earliest_future_ts"] is None
    assert 81.0 in pq.read_table(out / "events.parquet").column("value").to_pylist()


def test_a_changed_food_catalog_rebuilds(tmp_path, tiny_encoder):
    events = make_events(n_users=4, seed=13)
    catalog = tmp_path / "foods.csv"
    catalog.write_text("food_id,name,category\n" + "".join(f"{i},food {i},x\n" for i in range(100, 130)))
    path, _ = build_store(tmp_path, events, tiny_encoder, "w", f"data.foods={catalog}")
    stamp = path.stat().st_mtime_ns
    catalog.write_text(catalog.read_text() + "5000,kale,vegetable\n")  # a new food in the catalog
    build_store(tmp_path, events, tiny_encoder, "w", f"data.foods={catalog}")
    assert path.stat().st_mtime_ns != stamp and 5000 in read_meta(path).vocab["foods"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--shard", "2", "--num-shards", "1"], "features.shard=2 needs features.num_shards > 2"),
        (["--shard", "1"], "add --num-shards N"),
        (["--num-shards", "0"], "must be at least 1"),
        (["--shard", "3", "--num-shards", "3"], "use --shard 0..2"),
        (["--shard", "-1", "--num-shards", "3"], "use --shard 0..2"),
        # Label settings that would build a store without test users, examples or positives.
        (["labels.val_frac=1.5"], "train_frac + val_frac < 1"),
        (["labels.val_frac=0.3"], "train_frac + val_frac < 1"),
        (["labels.max_inactive_days=-3"], "labels.max_inactive_days=-3: at least 1 day"),
        (["labels.min_active_days=8"], "no user could ever be engaged"),
        (["labels.horizon_days=0"], "labels.horizon_days=0: at least 1"),
        (["data.until=yesterday"], "data.until='yesterday' is not a date or time"),
        (["labels.last_cutoff=soon"], "labels.last_cutoff='soon' is not a date or time"),
    ],
)
def test_shard_arguments_are_checked_before_any_work(tmp_path, capsys, args, expected):
    from pipeline.cli import main

    rc = main(["features", "--config", "configs/test.yaml", f"workdir={tmp_path / 'w'}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "w").exists()  # nothing validated, no empty store


def test_features_without_a_shard_builds_every_shard_in_one_command(tmp_path, tiny_encoder_dir, capsys):
    from features.store import feature_files
    from pipeline.cli import main

    w = tmp_path / "w"
    assert main(["features", "--config", "configs/test.yaml", f"workdir={w}", f"features.text_encoder={tiny_encoder_dir}",
                 "--num-shards", "2"]) == 0
    assert [p.name for p in feature_files(w / "features")] == ["features-000-of-002.h5", "features-001-of-002.h5"]
    assert not (w / "features" / "features.h5").exists()
    # The test world's 60 users leave under 50 in validation: said once, for the whole build.
    assert capsys.readouterr().out.count("few users to judge models on") == 1


def test_each_shard_saves_its_own_config_and_never_the_shared_one(tmp_path, tiny_encoder):
    events = make_events(n_users=6, seed=14)
    path, _ = build_store(tmp_path, events, tiny_encoder, "w", "features.shard=1", "features.num_shards=2")
    folder = path.parent
    assert path.name == "features-001-of-002.h5"
    saved = load_config(folder / "features-001-of-002.config.yaml")
    assert (saved.features.shard, saved.features.num_shards) == (1, 2)
    assert not (folder / "config.yaml").exists()  # shards side by side never write one shared file
    whole, _ = build_store(tmp_path, events, tiny_encoder, "w")
    assert load_config(whole.parent / "config.yaml").features.shard is None


def _assert_same_batch(got: dict, want: dict, where: str = "") -> None:
    assert got.keys() == want.keys(), where
    for k, v in want.items():
        if isinstance(v, dict):
            _assert_same_batch(got[k], v, f"{where}{k}.")
        else:
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, (where + k, got[k].shape, v.shape)
            assert torch.equal(got[k], v), where + k


def test_a_whole_batch_fetch_equals_collating_its_items(tmp_path, tiny_encoder, sim_store):
    """`FeatureDataset.batch` (the loaders' path) against `collate` of `ds[i]`, key for key,
    on the simulator store with targets and on two shard files read as one dataset, with
    empty streams, truncation to max_len and every order of rows."""
    path, cfg, mcfg = sim_store
    events = make_events(n_users=10, seed=21, per_user=(0, 60))
    shards = [build_store(tmp_path, events, tiny_encoder, "s", f"features.shard={i}", "features.num_shards=2",
                          "model.max_len_events=9")[0] for i in range(2)]
    short = dataclasses.replace(mcfg, max_len_events=9, max_len_food=3)
    datasets = [FeatureDataset(path, mcfg, targets=True), FeatureDataset(path, short),
                FeatureDataset(shards, model_config_for(short, read_meta(shards[0])))]
    rng = np.random.default_rng(0)
    for ds in datasets:
        for size in (1, 7, 33):
            idx = rng.choice(len(ds), size=min(size, len(ds)), replace=False)
            _assert_same_batch(ds.batch(idx), collate([ds[int(i)] for i in idx]))
        empty = np.flatnonzero(ds.lengths().sum(1) == 0)[:3]
        if len(empty):  # rows with no item at all: one padded column everywhere
            _assert_same_batch(ds.batch(empty), collate([ds[int(i)] for i in empty]))
    assert len(np.unique(datasets[2].file_of)) == 2


def test_trained_limits_are_the_largest_day_and_message_number_training_saw_and_later_inputs_clamp(
        tmp_path, tiny_encoder, sim_store):
    """`trained_limits` (saved with a trained model) against every item of the training windows
    read one by one, on the simulator store and on two shard files; with them set, the items
    and the whole-batch fetch of any split stay within them (the rows training updated), and
    without them nothing else changes."""
    path, cfg, mcfg = sim_store
    events = make_events(n_users=10, seed=22, per_user=(0, 60))
    shards = [build_store(tmp_path, events, tiny_encoder, "s", f"features.shard={i}", "features.num_shards=2")[0]
              for i in range(2)]
    for files, model in ((path, mcfg), (shards, model_config_for(mcfg, read_meta(shards[0])))):
        ds = FeatureDataset(files, model)
        train = ds.subset(ds.select(["train"]))
        limits = train.trained_limits()
        items = [train[i] for i in range(len(train))]  # inputs are day + 1 and msg_no, 0 = padding
        assert limits["trained_max_day"] == max(int(it["events"]["day"].max(initial=0)) for it in items) - 1
        assert limits["trained_max_msg_no"] == max(int(it["conversation"]["msg_no"].max(initial=0)) for it in items)
        later = ds.subset(ds.select(["test", "oot"], labelled=False))
        before = [later[i] for i in range(len(later))]
        reached = max(int(it["events"]["day"].max(initial=0)) for it in before) - 1
        assert reached > limits["trained_max_day"]  # the out-of-time examples go further into programs
        ds.model = dataclasses.replace(model, **limits)
        later = ds.subset(ds.select(["test", "oot"], labelled=False))
        after = [later[i] for i in range(len(later))]
        assert max(int(it["events"]["day"].max(initial=0)) for it in after) == limits["trained_max_day"] + 1
        assert max(int(it["conversation"]["msg_no"].max(initial=0)) for it in after) <= limits["trained_max_msg_no"]
        for b, a in zip(before, after):  # only the values past training's change, and only to its latest
            np.testing.assert_array_equal(a["events"]["day"], np.minimum(b["events"]["day"], limits["trained_max_day"] + 1))
        idx = np.arange(min(40, len(later)))
        _assert_same_batch(later.batch(idx), collate([later[int(i)] for i in idx]))


def test_tokens_compare_row_by_row_through_dictionary_codes():
    import pyarrow as pa

    from features.vocab import Tokens

    col = pa.chunked_array([["message", None, "food_log"], ["message", "weigh_in"]])
    t = Tokens(col)
    ref = np.array(["message", "", "food_log", "message", "weigh_in"])  # null compares equal to nothing
    assert (t == "message").tolist() == (ref == "message").tolist()
    assert (t == "never").tolist() == [False] * 5
    assert t.isin(["food_log", "weigh_in"]).tolist() == np.isin(ref, ["food_log", "weigh_in"]).tolist()
    assert not (t == "").any()  # a null is not the empty string


def test_window_items_lists_every_item_of_each_window_in_order():
    from features.labels import window_items

    got = window_items(np.array([5, 0, 9, 2]), np.array([2, 0, 3, 1]))
    assert got.tolist() == [5, 6, 9, 10, 11, 2]
    assert window_items(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []


def test_dictionary_columns_as_a_shard_reads_them_give_what_their_strings_give():
    """A partition's columns read as dictionaries (features/stream.py read_partition): chunks with
    their own dictionaries, values no row has; codes, Tokens, ids and value_counts as on strings."""
    import pyarrow as pa

    from features.vocab import Tokens, Vocab, codes, value_counts

    plain = pa.chunked_array([["message", None, "food_log"], ["weigh_in", "message"]])
    as_dict = pa.chunked_array([
        pa.DictionaryArray.from_arrays(pa.array([0, None, 1]), pa.array(["message", "food_log", "unused"])),
        pa.DictionaryArray.from_arrays(pa.array([0, 1]), pa.array(["weigh_in", "message"])),
    ])
    c, distinct = codes(as_dict)
    assert [distinct[i] if i >= 0 else None for i in c] == plain.to_pylist()
    assert value_counts(as_dict) == value_counts(plain) == {"message": 2, "food_log": 1, "weigh_in": 1}
    assert (Tokens(as_dict) == "message").tolist() == (Tokens(plain) == "message").tolist()
    vocab = Vocab()
    np.testing.assert_array_equal(vocab.ids("event_types", as_dict), vocab.ids("event_types", plain))


def test_the_summary_says_when_validation_or_test_hold_too_few_users_to_judge_models(capsys):
    from pipeline.data.features import FEW_USERS_WARN, print_summary

    def summary(val_users):
        split = {"examples": 10 * val_users, "label_rate": 0.5}
        return {"feature_file": "f.h5", "users": 1000, "examples": 9000, "unlabelled_examples": 0, "items": {},
                "validation": {"rows_in": 1, "accepted": 1, "duplicates": 0, "quarantined": 0, "reasons": {}},
                "splits": {"train": split | {"users": 700}, "val": split | {"users": val_users},
                           "test": split | {"users": 300}, "oot": split | {"users": 10}},
                "message_vectors": None, "seconds": {}}

    print_summary(summary(FEW_USERS_WARN - 1))
    out = capsys.readouterr().out
    assert f"few users to judge models on (val {FEW_USERS_WARN - 1}; under {FEW_USERS_WARN})" in out
    print_summary(summary(FEW_USERS_WARN))  # oot's 10 users are the same users later on: no warning for it
    assert "few users" not in capsys.readouterr().out
    print_summary(summary(FEW_USERS_WARN - 1), whole=False)  # one shard's share of the users: not the run's
    assert "few users" not in capsys.readouterr().out
