"""`make pretrain` on a tiny simulator store: the encoders it saves are the ones it trained
and load into the engagement model, an interrupted run resumes to the weights of an
uninterrupted one, and a run of another world size is neither reused nor resumed."""

import json

import mlflow
import numpy as np
import pytest
import torch

import pipeline.pretraining.pretrain as P
from features.dataset import FeatureDataset, collate, user_numbers
from features.store import build_id, feature_files
from models.encoders import ENCODERS
from models.engagement import EngagementModel
from pipeline.paths import Paths
from pipeline.pretraining.pretrain import DONE, LAST, pretrain, run_fingerprint
from pipeline.tracking import NOTE
from pipeline.training import loop


@pytest.fixture
def cfg(sim_store, tmp_path):
    _, cfg, _ = sim_store
    cfg.pretrain.epochs = 2
    cfg.pretrain.max_examples_per_user = 1  # a few batches an epoch
    cfg.pretrain.dir = str(tmp_path / "pre")
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    return cfg


def _encoder_state(objectives_state: dict, stream: str) -> dict:
    prefix = f"{stream}.encoder."
    return {k[len(prefix):]: v for k, v in objectives_state.items() if k.startswith(prefix)}


def test_batches_carry_a_user_number_shared_by_a_users_windows(sim_store):
    path, _, mcfg = sim_store
    data = FeatureDataset(path, mcfg)
    rows = np.flatnonzero(np.isin(data.user_key, np.unique(data.user_key)[:3]))  # every window of 3 users
    batch = collate([data[int(i)] for i in rows])
    same_key = data.user_key[rows][:, None] == data.user_key[rows][None, :]
    same_user = (batch["user"][:, None] == batch["user"][None, :]).numpy()
    assert batch["user"].dtype == torch.int64 and len(rows) > 3 and np.array_equal(same_key, same_user)
    # A number of the key alone: the same in any dataset that holds the user (shards, rebuilds).
    assert np.array_equal(user_numbers(data.user_key[rows[::-1]]), batch["user"].numpy()[::-1])


def test_pretrain_saves_the_encoders_it_trained_which_load_into_the_engagement_model(cfg, sim_store, monkeypatch):
    path, _, mcfg = sim_store
    init, logged, postfix = {}, [], []
    make_optimizer, log_metrics = loop.make_optimizer, P.tracking.log_metrics

    def snapshot_init(model, *a):  # called once, right after the objectives are built
        init.update({k: v.clone() for k, v in model.state_dict().items()})
        return make_optimizer(model, *a)

    class Bar(P.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kw):
            postfix.append((self.desc, dict(ordered_dict or {}, **kw)))
            super().set_postfix(ordered_dict, refresh, **kw)

    monkeypatch.setattr(loop, "make_optimizer", snapshot_init)
    monkeypatch.setattr(P.tracking, "log_metrics", lambda m, step=None, **kw: (logged.append(dict(m)), log_metrics(m, step, **kw)))
    monkeypatch.setattr(P, "tqdm", Bar)
    result = pretrain(cfg)

    assert set(result.checkpoints) == {"conversation", "food", "events"}
    for key in ("heldout_nsp_accuracy", "heldout_food_top10", "baseline_food_top10", "heldout_event_top1"):
        assert key in result.metrics
    # The bar shows the loss and, from the second epoch on, the last held-out metric of each objective.
    second = [p for desc, p in postfix if desc.startswith("pretrain 2/")]
    assert second and all(set(p) >= {"conversation", "food", "events"} for p in second)
    first = next(m for m in logged if "heldout_nsp_accuracy" in m)  # the first epoch's evaluation
    assert second[-1]["val_nsp_acc"] == f"{first['heldout_nsp_accuracy']:.3f}"
    assert second[-1]["val_food_top10"] == f"{first['heldout_food_top10']:.3f}"
    assert second[-1]["val_event_top1"] == f"{first['heldout_event_top1']:.3f}"
    assert [m["epoch_windows_per_s"] > 0 for m in logged if "epoch_windows_per_s" in m] == [True, True]

    trained = torch.load(result.directory / LAST, weights_only=True)["objectives"]
    model = EngagementModel(mcfg).eval()
    batch = collate([FeatureDataset(path, mcfg)[i] for i in range(8)])
    for stream, ckpt in result.checkpoints.items():
        saved = torch.load(ckpt, weights_only=True)["state_dict"]
        state = _encoder_state(trained, stream)
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
        start = _encoder_state(init, stream)
        moved = [k for k in state if not torch.equal(state[k], start[k])]
        # Every weight moved, but the conversation's recency and mentioned-day tables: negative
        # sampling blanks them (they would date a donor's messages), so only fine-tuning teaches them.
        still = ({"recency_embedding.weight", "mention_first_embedding.weight", "mention_last_embedding.weight"}
                 if stream == "conversation" else set())
        assert set(state) - set(moved) == still, stream
        # The engagement model with the checkpoint computes what the trained encoder computes.
        encoder = ENCODERS[stream](mcfg).eval()
        encoder.load_state_dict(state)
        model.load_encoder(stream, ckpt, freeze=True)
        with torch.no_grad():
            for got, want in zip(model.encoders[stream](batch[stream]), encoder(batch[stream])):
                assert torch.equal(got, want)
        assert not any(p.requires_grad for p in model.encoders[stream].parameters())
    again = pretrain(cfg)  # the same inputs: reused, not retrained
    assert again.skipped and again.run_id == result.run_id
    note = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.tags[NOTE]  # the UI's description
    assert note.startswith("**Pretraining**") and f"Feature build `{build_id([path])}`" in note


def test_interrupted_pretraining_resumes_to_the_weights_of_an_uninterrupted_run(cfg, tmp_path, monkeypatch,
                                                                               two_threads):
    real, steps = loop.update, {"n": 0, "stop_at": None}  # every update, whole-batch or split steps

    def step(*a, **k):
        steps["n"] += 1
        if steps["n"] == steps["stop_at"]:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "update", step)
    cfg.pretrain.step_threads = 2  # the default: batches split over two threads, per-part generators
    split, real_split = {"n": 0}, loop.parallel_backward

    def counted(*a, **k):
        split["n"] += 1
        return real_split(*a, **k)

    monkeypatch.setattr(loop, "parallel_backward", counted)
    whole = pretrain(cfg)
    per_epoch = steps["n"] // 2
    assert split["n"] == steps["n"]  # every step was split
    assert per_epoch >= 2 and steps["n"] == 2 * per_epoch

    cfg.pretrain.dir = str(tmp_path / "killed")
    steps.update(n=0, stop_at=per_epoch + 2)  # in the second epoch, after the first one's checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    killed = tmp_path / "killed"
    assert torch.load(killed / LAST, weights_only=True)["epoch"] == 1 and not (killed / DONE).exists()
    steps.update(n=0, stop_at=None)
    resumed = pretrain(cfg)
    assert steps["n"] == per_epoch  # only the second epoch ran again
    assert resumed.metrics == whole.metrics
    assert resumed.run_id == torch.load(killed / LAST, weights_only=True)["run_id"]  # the same MLflow run, continued
    a = torch.load(whole.directory / LAST, weights_only=True)
    b = torch.load(resumed.directory / LAST, weights_only=True)
    assert a["objectives"].keys() == b["objectives"].keys()
    for k, v in a["objectives"].items():
        assert torch.equal(v, b["objectives"][k]), k
    for stream in whole.checkpoints:
        x = torch.load(whole.checkpoints[stream], weights_only=True)["state_dict"]
        y = torch.load(resumed.checkpoints[stream], weights_only=True)["state_dict"]
        assert all(torch.equal(x[k], y[k]) for k in x), stream


def test_a_run_of_another_world_size_is_neither_reused_nor_resumed(cfg, monkeypatch):
    """batch_size is per rank and the data order is sharded over ranks: what 2 ranks (torchrun)
    pretrained is not what 1 rank would, so its done.json and last.pt are not taken."""
    files = feature_files(Paths.of(cfg).features)
    one, two = run_fingerprint(cfg, files, 1), run_fingerprint(cfg, files, 2)
    assert one != two and one == run_fingerprint(cfg, files, 1)
    out = P.Paths.of(cfg).pretrain
    out.mkdir(parents=True)

    class Trains(Exception):
        pass

    def stage_run(*a, **k):  # reached only when nothing was reused
        raise Trains

    resumed, real_resume = [], loop.resume

    def resume(*a, **k):
        out = real_resume(*a, **k)
        resumed.append(out[1])
        return out

    monkeypatch.setattr(P.tracking, "stage_run", stage_run)
    monkeypatch.setattr(loop, "resume", resume)
    (out / DONE).write_text(json.dumps({"fingerprint": two, "run_id": None, "metrics": {}}))
    loop.save_state(out / LAST, fingerprint=two, epoch=1, batch=0, run_id=None, metrics={})
    with pytest.raises(Trains):
        pretrain(cfg)  # one rank here (no torchrun)
    assert resumed == [False]  # nor resumed from the 2-rank checkpoint (loop.resume leaves its RNG state alone)
    (out / DONE).write_text(json.dumps({"fingerprint": one, "run_id": None, "metrics": {"x": 1.0}}))
    assert pretrain(cfg).skipped


def test_the_future_objective_trains_the_stream_encoders_and_reports_its_held_out_auc(cfg):
    cfg.pretrain.objectives = ["events", "future"]
    cfg.pretrain.epochs = 1
    result = pretrain(cfg)
    assert set(result.checkpoints) == {"events"}  # the future head is not an encoder
    assert 0.0 <= result.metrics["heldout_future_auc"] <= 1.0 and result.metrics["baseline_future_auc"] == 0.5
    assert result.metrics["train_loss_future"] > 0
    state = torch.load(result.directory / LAST, weights_only=True)["objectives"]
    # One encoder shared by both objectives: the same weights under both names.
    shared = [k for k in state if k.startswith("future.encoders.events.")]
    assert shared and all(torch.equal(state[k], state["events.encoder." + k[len("future.encoders.events."):]])
                          for k in shared)
    cfg.pretrain.objectives = ["events", "nonsense"]
    with pytest.raises(P.UserError, match="future"):  # the error names every valid objective
        pretrain(cfg)


def test_coles_rides_on_the_stream_encoders_and_reports_its_held_out_retrieval(cfg):
    cfg.pretrain.objectives = ["events", "coles"]
    cfg.pretrain.coles_streams = ["events", "food"]  # food is not pretrained here: left out
    cfg.pretrain.epochs = 1
    result = pretrain(cfg)
    assert set(result.checkpoints) == {"events"}
    m = result.metrics
    assert 0.0 < m["baseline_coles_top1"] < 0.2 and 0.0 <= m["heldout_coles_top1"] <= 1.0, m
    assert m["train_loss_coles"] > 0
    state = torch.load(result.directory / LAST, weights_only=True)["objectives"]
    shared = [k for k in state if k.startswith("coles.encoders.")]
    assert shared and all(k.startswith("coles.encoders.events.") for k in shared)
    assert all(torch.equal(state[k], state["events.encoder." + k[len("coles.encoders.events."):]]) for k in shared)
