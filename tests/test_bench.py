"""The benchmarks' naive versions are only a fair baseline if they compute the same thing:
the per-user Python loop of `make bench` must produce the real build's arrays exactly, and
the per-item HDF5 reader the real loader's items."""

import numpy as np

from benchmarks.naive import PerItemReads, per_user_arrays
from benchmarks.sections import write_bench_store
from features.build import build_features
from features.config import DataConfig
from features.dataset import FeatureDataset, model_config_for
from features.store import SPLITS, read_meta
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
