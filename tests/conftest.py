"""Shared fixtures: a tiny random DistilBERT text encoder saved to a temp dir (the same
loading code as production, no downloads) and small hand-made event tables."""

from __future__ import annotations

import pytest

from tests.event_factories import make_events  # noqa: F401  (re-exported for tests)


@pytest.fixture
def one_thread():
    """Torch on one thread for a test: tiny models on a shared 2-core machine run several
    times faster on one thread than on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """At least two torch threads for a test: training steps split over two threads need them
    (pipeline/training/loop.py: step_parts)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A random 1-layer DistilBERT (dim 16) with a character-level WordPiece vocabulary."""
    from models.synthetic import save_tiny_text_encoder

    d = tmp_path_factory.mktemp("tiny-distilbert")
    save_tiny_text_encoder(d)
    return d


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_dir):
    from features.text_vectors import TextEncoder

    return TextEncoder.load(str(tiny_encoder_dir), "cpu")


@pytest.fixture(scope="session")
def sim_store_files(tmp_path_factory, tiny_encoder):
    """A feature store built from the simulator at test size (configs/test.yaml), once."""
    from pipeline.config import load_config
    from pipeline.data.features import features_stage

    root = tmp_path_factory.mktemp("sim")
    cfg = load_config("configs/test.yaml", [f"workdir={root}/w", f"tracking.uri=sqlite:///{root}/mlflow.db",
                                            f"features.text_encoder={tiny_encoder.name}"])
    path = features_stage(cfg, encoder=tiny_encoder)
    return path, cfg


@pytest.fixture
def sim_store(sim_store_files):
    """(feature file, a fresh copy of its config, the model config sized from the store)."""
    import copy

    from features.dataset import model_config_for
    from features.store import read_meta

    path, cfg = sim_store_files
    cfg = copy.deepcopy(cfg)
    return path, cfg, model_config_for(cfg.model, read_meta(path))
