"""The benchmarks' naive versions are only a fair baseline if they compute the same thing:
the per-user Python loop of `make bench` must produce the real build's arrays exactly, and
the per-item HDF5 reader the real loader's items."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks.naive import PerItemReads, per_user_arrays
from benchmarks.sections import write_bench_store
from features.build import build_features
from features.config import DataConfig
from features.dataset import FeatureDataset, model_config_for
from features.store import SPLITS, load_arrays, read_meta
from features.validate import normalise_users, validate_events
from features.vocab import Vocab
from models.config import ModelConfig
from pipeline.config import Config
from pipeline.simulator.config import SimConfig
from pipeline.simulator.run import simulate


def _sim_events(users=25, weeks=5):
    tables = simulate(SimConfig(users=users, weeks=weeks, truth_samples=1, dirty_fraction=0.0))
    u = normalise_users(tables["users"], "users")
    return validate_events(tables["events"], DataConfig(), u).events, u


def test_naive_build_equals_the_vectorised_build():
    events, users = _sim_events()
    real = build_features(events, users, Config(), None, 0, "none", Vocab()).arrays
    naive = per_user_arrays(events, users, Config(), Vocab())
    assert set(naive) == set(real)
    for group, arrays in naive.items():
        assert set(arrays) <= set(real[group]), group
        for name, a in arrays.items():
            assert np.array_equal(a, real[group][name]), f"{group}/{name}"
    assert len(real["examples"]["as_of"]) > 0 and (real["examples"]["split"] == SPLITS.index("oot")).any()  # oot present


def test_per_item_reader_yields_the_loaders_items(tmp_path):
    events, users = _sim_events(users=12, weeks=4)
    store = write_bench_store(events, users, tmp_path / "features.h5")
    mcfg = model_config_for(ModelConfig(), read_meta(store))
    n = len(FeatureDataset([store], mcfg))
    idx = np.unique(np.linspace(0, n - 1, 10).astype(int))
    fast, slow = FeatureDataset([store], mcfg, idx), PerItemReads(store, mcfg, idx)
    assert sum(len(fast[i]["events"]["type_id"]) for i in range(len(idx))) > 0
    for i in range(len(idx)):
        a, b = fast[i], slow[i]
        for s in ("conversation", "food", "events"):
            for k, v in a[s].items():
                assert np.array_equal(np.asarray(v), np.asarray(b[s][k])), (i, s, k)


def test_recipes_section_says_why_it_is_skipped_without_a_demo_store(tmp_path):
    from benchmarks import recipes

    r = recipes.training_recipes(tmp_path / "no-demo", tmp_path / "work", 1, 1)
    assert "make demo" in r["skipped"] and "skipped" in recipes.rows(r)[0][0]


@pytest.mark.slow
def test_recipes_section_trains_the_recipe_before_and_now_on_one_store(sim_store_files, tmp_path):
    from benchmarks import recipes

    _, cfg = sim_store_files
    r = recipes.training_recipes(Path(cfg.workdir), tmp_path, 1, 1, config="configs/test.yaml")
    assert r["before"]["train"]["batching"] == "random" and r["now"]["train"]["batching"] == "length"
    for name in ("before", "now"):
        assert r[name]["train_examples_per_s"] > 0 and r[name]["pretrain_windows_per_s"] > 0
        # the steps alone (from the loops' MLflow metrics) run faster than the whole stage
        assert r[name]["train_step_examples_per_s"] > r[name]["train_examples_per_s"]
        assert r[name]["pretrain_step_windows_per_s"] > r[name]["pretrain_windows_per_s"]
        assert len(r[name]["val_roc_auc_by_epoch"]) == 1 and 0.0 <= r[name]["best_val_roc_auc"] <= 1.0
    assert r["train_speedup"] == r["now"]["train_examples_per_s"] / r["before"]["train_examples_per_s"]
    assert r["train_step_speedup"] == r["now"]["train_step_examples_per_s"] / r["before"]["train_step_examples_per_s"]
    assert [row[0].split(",")[0] for row in recipes.rows(r)][0].startswith("6 training")


@pytest.mark.slow  # six fresh interpreters (~30 s): `make test-full`
def test_bench_scale_measures_each_step_in_its_own_process(tmp_path, capsys):
    from benchmarks.scale import main

    rows = main(["--users", "500", "--weeks", "3", "--partitions", "2", "--in-memory", "--dask", "2", "--repeat", "2",
                 "--job", "--job-as-of", "2026-01-19", "--dir", str(tmp_path)])
    steps = {r["step"].split(",")[0]: r for r in rows}
    assert set(steps) == {"simulate", "validate", "features", "features command",
                          "weekly retrain's features step"} and len(rows) == 7
    streamed, whole, shard, dask = rows[1], rows[2], rows[3], rows[4]
    assert [r["files"] for r in rows[5:]] == [1, 2]  # the week as one store, then as a shard per partition
    # the cluster validated the same events and its shards built every example (shard 0 is a part)
    assert dask["events"] == streamed["events"] and dask["examples"] > shard["examples"] > 0
    assert all(0 < dask[k] <= dask["wall_s"] for k in ("first_run_s", "run_s", "warm_run_s")) and dask["worker_peak_mb"] > 50
    assert len(dask["runs_s"]) == len(dask["warm_runs_s"]) == 2  # --repeat: the figures are their medians
    assert dask["run_s"] == np.median(dask["runs_s"]) and dask["warm_run_s"] == np.median(dask["warm_runs_s"])
    # what the machine's two cores are worth, per task: each side-by-side time, and the ratio
    for cores in (dask["cores"]["compute"], dask["cores"]["memory"]):
        assert len(cores["side_by_side_s"]) == 2 and cores["speedup"] == pytest.approx(
            2 * cores["alone_s"] / np.mean(cores["side_by_side_s"]), abs=0.01)
    assert streamed["events"] == whole["events"] > 1000 and streamed["accepted"] <= streamed["events"]
    assert 0 < shard["events"] < streamed["accepted"] and shard["examples"] > 0  # one shard's users only
    assert all(r["peak_mb"] > 50 for r in rows)
    # the features command wrote every shard's store, with every example and its message vectors
    stores = sorted((tmp_path / "fan-out" / "features").glob("features-*-of-002.h5"))
    arrays = [load_arrays(f, ("examples", "conversation"))[0] for f in stores]
    assert len(stores) == 2 and sum(len(a["examples"]["as_of"]) for a in arrays) == dask["examples"]
    assert all(a["conversation"]["embedding"].shape[1] == 16 for a in arrays)
    out = capsys.readouterr().out
    assert f"one feature shard ({shard['events']:,} events)" in out and "with the vectors cached" in out and "warm workers" in out
    assert "cores against one: compute" in out


def test_the_before_recipe_loads_item_by_item_and_gets_the_same_batches(sim_store, monkeypatch):
    import torch

    from benchmarks.recipes import as_before_issue_13
    from features.dataset import collate
    from pipeline.training import loop

    path, _, mcfg = sim_store
    ds = FeatureDataset(path, mcfg)
    sampler = loop.LengthBatches(ds.length_key(), 0, 0, 8)
    items, getitem = [], FeatureDataset.__getitem__
    monkeypatch.setattr(FeatureDataset, "__getitem__", lambda self, i: items.append(i) or getitem(self, i))
    now = list(loop.loader(ds, 8, collate, sampler))
    assert not items  # whole batches at once
    net = torch.nn.Linear(2, 2)
    with as_before_issue_13(True):
        before = list(loop.loader(ds, 8, collate, sampler))
        assert loop.make_optimizer(net, 1e-3, 0.0).defaults["foreach"] is False  # AdamW's per-parameter loop
        assert loop.prefetched is iter  # batches gathered on the training thread
    assert len(items) == len(ds) and callable(FeatureDataset.batch)  # item by item, then restored
    assert loop.prefetched is not iter
    assert loop.make_optimizer(net, 1e-3, 0.0).defaults["foreach"] is True
    assert len(now) == len(before) == len(sampler)
    for a, b in zip(now, before):
        assert torch.equal(a["example"], b["example"]) and torch.equal(a["events"]["type_id"], b["events"]["type_id"])
