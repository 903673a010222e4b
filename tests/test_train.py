"""Training, evaluation, MLflow tracking and the champion gate, on a tiny simulator store."""

import io
import json
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from common.errors import UserError
from models.checkpoint import load_model
from pipeline.evaluation import registry
from pipeline.evaluation.compare import compare
from pipeline.evaluation.evaluate import BLEND, evaluate
from pipeline.paths import Paths
from pipeline.tracking import NOTE
from pipeline.training.train import LAST, PREDICTIONS, train


@pytest.fixture
def cfg(sim_store, tmp_path):
    _, cfg, _ = sim_store
    cfg.train.init = "scratch"
    cfg.train.epochs = 2
    cfg.train.checkpoint_every_steps = 3
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.tracking.experiment = "t"
    return cfg


def _model_and_parts(sim_store, dropout: float, n: int = 24):
    """A tiny engagement model in training mode, a batch of n training examples, and the
    same examples dealt into 2 parts as the loader deals them."""
    from dataclasses import replace

    from features.dataset import FeatureDataset
    from models.engagement import EngagementModel

    path, _, mcfg = sim_store
    mcfg = replace(mcfg, dropout=dropout, future_days=0)
    torch.manual_seed(0)
    model = EngagementModel(mcfg).train()
    data = FeatureDataset(path, mcfg)
    sub = data.subset(data.select(["train"])[:n])
    rows = list(range(n))
    return model, sub.batch(rows), [sub.batch(rows[j::2]) for j in range(2)]


def test_a_batch_split_over_threads_gives_the_whole_batch_loss_and_gradients(sim_store):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.training import loop

    model, whole, parts = _model_and_parts(sim_store, dropout=0.0)
    _, loss = model(whole, whole["label"])
    loss.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with ThreadPoolExecutor(2) as pool, loop.threads_per_part(2):
        got, _ = loop.parallel_backward(lambda p, g: (model(p, p["label"])[1], None), parts, pool)
    assert got.item() == pytest.approx(loss.item(), rel=1e-5)
    assert len(want) > 20
    for k, p in model.named_parameters():
        if k in want:
            assert torch.allclose(p.grad, want[k], rtol=1e-4, atol=1e-6), k


def test_prefetched_fetches_the_next_batch_while_the_step_runs_and_keeps_order_and_errors():
    import threading

    from pipeline.training import loop

    fetched = [threading.Event() for _ in range(4)]

    def batches():
        for i in range(4):
            fetched[i].set()
            yield i

    gen = loop.prefetched(batches())
    assert next(gen) == 0
    assert fetched[1].wait(10)  # fetched while the caller still holds batch 0
    assert [0, *gen] == [0, 1, 2, 3]

    def broken():
        yield 0
        raise ValueError("unreadable batch")

    with pytest.raises(ValueError, match="unreadable batch"):  # raised where the loop asks for it
        list(loop.prefetched(broken()))


def test_threaded_parts_draw_the_same_dropout_masks_whichever_thread_runs_first(sim_store):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.training import loop

    grads = []
    for late in (0, 1):  # part 0, then part 1, waits before its forward: the other draws first
        model, _, parts = _model_and_parts(sim_store, dropout=0.3)
        real = model.forward

        def forward(batch, labels, late=late, parts=parts, real=real):
            if batch is parts[late]:
                time.sleep(0.2)
            return real(batch, labels)

        model.forward = forward
        torch.manual_seed(1)
        with ThreadPoolExecutor(2) as pool:
            loop.parallel_backward(lambda p, g, model=model: (model(p, p["label"])[1], None), parts, pool)
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_the_threaded_step_is_used_on_cpu_in_one_process_with_fast_dropout_only(sim_store):
    from dataclasses import replace

    from pipeline.training import loop

    mcfg, cpu, threads = sim_store[2], torch.device("cpu"), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert loop.step_parts(2, mcfg, cpu, world=1) == 2
        assert loop.step_parts(1, mcfg, cpu, world=1) == 1
        assert loop.step_parts(2, mcfg, cpu, world=2) == 1  # DDP all-reduces on every backward
        assert loop.step_parts(2, mcfg, torch.device("cuda"), world=1) == 1
        assert loop.step_parts(2, replace(mcfg, fast_dropout=False), cpu, world=1) == 1  # global-generator masks
        assert loop.step_parts(2, replace(mcfg, attention_dropout=0.1), cpu, world=1) == 1
        torch.set_num_threads(1)
        assert loop.step_parts(2, mcfg, cpu, world=1) == 1  # a process held to one thread keeps to it
    finally:
        torch.set_num_threads(threads)


# EMA, and encoders frozen for the first epoch (killed in it, resumed into the next): make test-full
@pytest.mark.parametrize("ema_decay,freeze_epochs", [(0.0, 0), pytest.param(0.9, 0, marks=pytest.mark.slow),
                                                     pytest.param(0.0, 1, marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_weights_and_metrics(cfg, tmp_path, monkeypatch, ema_decay, freeze_epochs,
                                                            two_threads):
    import pipeline.training.train as T

    cfg.train.ema_decay, cfg.train.freeze_epochs = ema_decay, freeze_epochs
    cfg.train.step_threads = 2  # the default: batches split over two threads, masks from per-part generators
    cfg.train.run_name = "whole"
    split, real_split = {"n": 0}, T.loop.parallel_backward

    def counted(*a, **k):
        split["n"] += 1
        return real_split(*a, **k)

    monkeypatch.setattr(T.loop, "parallel_backward", counted)
    whole = train(cfg)
    assert split["n"] > 0  # the steps were split
    state_whole = torch.load(whole.run_dir / LAST, weights_only=True)

    cfg.train.run_name = "killed"
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def crash_at_step_8(*a, **k):  # between the checkpoints of steps 6 and 9
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(T.torch.nn.utils, "clip_grad_norm_", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    saved = torch.load(whole.run_dir.parent / "killed" / LAST, weights_only=True)
    assert saved["step"] == 6 and saved["epoch"] == 0  # mid-epoch checkpoint on disk
    monkeypatch.setattr(T.torch.nn.utils, "clip_grad_norm_", real)
    resumed = train(cfg)
    state_resumed = torch.load(resumed.run_dir / LAST, weights_only=True)
    assert state_resumed["step"] == state_whole["step"]
    for part in ("model", "ema") if ema_decay else ("model",):
        assert state_whole[part].keys() == state_resumed[part].keys()
        for k, v in state_whole[part].items():
            assert torch.equal(v, state_resumed[part][k]), (part, k)
    assert state_resumed["history"] == state_whole["history"]
    assert resumed.val_roc_auc == whole.val_roc_auc
    # The resumed run continued the same MLflow run instead of starting another.
    assert resumed.run_id == saved["run_id"]


def test_evaluate_logs_baselines_oracle_plots_and_gates_the_champion(cfg, tmp_path):
    cfg.train.run_name = "good"
    cfg.train.epochs = 3
    cfg.eval.plots, cfg.eval.attention_users = True, 2  # configs/test.yaml draws none
    good = train(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    bid = json.loads((good.run_dir / "done.json").read_text())["build_id"]
    note = client.get_run(good.run_id).data.tags[NOTE]  # the run's description in the UI
    assert note.startswith("**Sequence model** `good`: scratch encoders, 100% of the training labels")
    assert f"`{bid}`" in note and "not evaluated yet" in note
    first = evaluate(cfg, good.run_dir)
    assert first.decision.promoted and first.decision.reason == "no champion yet"
    for name in ("model", "prevalence", "active_last_week", "logistic", "hgb", "hgb_text", "oracle"):
        assert set(first.metrics[name]) == {"val", "test", "oot"}
    assert first.metrics["prevalence"]["test"]["roc_auc"] == 0.5
    assert first.metrics["oracle"]["test"]["roc_auc"] > 0.6  # the simulator's own probability
    # Each learned model against gradient boosting on the aggregates: the difference of their
    # ROC-AUCs, with an interval over users, in the metrics and in MLflow; none for hgb itself.
    for name in ("model", "logistic", "hgb_text", BLEND):
        m = first.metrics[name]["test"]
        assert m["roc_auc_vs_hgb"] == pytest.approx(m["roc_auc"] - first.metrics["hgb"]["test"]["roc_auc"])
        assert m["roc_auc_vs_hgb_lo"] < m["roc_auc_vs_hgb_hi"]
    assert not {"roc_auc_vs_hgb"} & (set(first.metrics["hgb"]["test"]) | set(first.metrics["oracle"]["test"]))
    assert "oot_roc_auc_vs_hgb_hi" in mlflow.MlflowClient(cfg.tracking.uri).get_run(good.run_id).data.metrics
    # The blend's weight is picked on val, so its val figure is out of fold (by user): the
    # cross-fitted blend of the model's and its gradient boosting's val predictions.
    from features.dataset import load_examples
    from features.store import feature_files
    from pipeline.evaluation.blend import crossfit_blend
    from pipeline.evaluation.metrics import binary_metrics

    examples, user_key, _ = load_examples(feature_files(Paths.of(cfg).features))
    val = np.flatnonzero((examples["split"] == 1) & (examples["label"] >= 0))
    preds = pd.read_parquet(good.run_dir / PREDICTIONS).set_index("example")["p_engaged"]
    partner = cfg.eval.blend_with
    assert partner == "hgb_text"  # the default
    gbm = pd.read_parquet(next(Paths.of(cfg).features.glob("baselines-*.parquet")))[partner].to_numpy()
    oof = crossfit_blend(preds.reindex(val).to_numpy(), gbm[val], examples["label"][val], user_key[val])
    assert first.metrics[BLEND]["val"]["roc_auc"] == pytest.approx(binary_metrics(examples["label"][val], oof)["roc_auc"])

    # A worse candidate: the same model with its ranks reversed.
    bad_dir, bad_run_id = fake_run(cfg, good, "bad", reversed_model(good))
    cfg.eval.plots = False  # the first run's figures are checked below
    second = evaluate(cfg, bad_dir)
    assert not client.list_artifacts(bad_run_id, "plots")
    d = second.decision
    assert d.promoted is False and d.reason == "champion is as good or better"
    assert d.champion == pytest.approx(first.metrics["model"]["val"]["roc_auc"], abs=1e-6)  # re-scored, same examples
    assert registry.champion_version(cfg).run_id == good.run_id
    tags = client.get_run(bad_run_id).data.tags
    assert tags["promoted"] == "False" and "gate_champion_val_roc_auc" in client.get_run(bad_run_id).data.metrics

    # Runs carry what DESIGN §8 asks for.
    r = client.get_run(good.run_id)
    assert "train.lr" in r.data.params and r.data.tags["git_commit"]
    assert {"val_roc_auc", "test_roc_auc", "oot_roc_auc", "test_ece", "test_lift_at_top"} <= set(r.data.metrics)
    assert len(client.get_metric_history(good.run_id, "epoch_val_roc_auc")) == 3  # one per epoch
    assert [m.value > 0 for m in client.get_metric_history(good.run_id, "epoch_examples_per_s")] == [True] * 3
    assert r.inputs.dataset_inputs and r.inputs.dataset_inputs[0].dataset.digest
    arts = {a.path for a in client.list_artifacts(good.run_id, "plots")}
    assert {"plots/roc_test.png", "plots/calibration_oot.png", "plots/lift_test.png"} <= arts
    # One attention figure per stream for each of eval.attention_users distinct test users
    # (the tiny store's fullest test users have items in every stream).
    attention = [a.removeprefix("plots/attention_").removesuffix(".png").split("_") for a in arts if "attention_" in a]
    users = {user for _, user in attention}
    assert len(users) == 2 and len(attention) == len(users) * 3
    assert {stream for stream, _ in attention} == {"conversation", "food", "events"}

    # Every run says what it is, on which build, and its test ROC-AUC beside gradient boosting's.
    auc = {n: f"{m['test']['roc_auc']:.3f}" for n, m in first.metrics.items()}
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}
    for name, what, key in [("good", "**Sequence model** `good`", "model"), ("good+hgb_text", "**Blend**", BLEND),
                            ("logistic", "**Logistic regression**", "logistic"), ("oracle", "**Oracle**", "oracle"),
                            ("prevalence", "**Prevalence**", "prevalence"), ("hgb", "**Gradient boosting**", "hgb"),
                            ("hgb_text", "**Gradient boosting with message scores**", "hgb_text")]:
        note = runs[name].data.tags[NOTE]
        assert note.startswith(what) and f"Feature build `{bid}`" in note, name
        assert f"Test ROC-AUC **{auc[key]}**" in note, name
        assert (f"(gradient boosting {auc['hgb']} on the same examples" in note) == (name != "hgb"), name
        if key in ("model", BLEND, "logistic", "hgb_text"):  # and its lead over it, with the interval
            m = first.metrics[key]["test"]
            assert (f"the difference {m['roc_auc_vs_hgb']:+.4f}, 95% interval over users "
                    f"[{m['roc_auc_vs_hgb_lo']:+.4f}, {m['roc_auc_vs_hgb_hi']:+.4f}])." in note), name

    # compare reads it all back from MLflow, in every format.
    out = io.StringIO()
    df = compare(cfg, fmt="csv", out=out)
    table = pd.read_csv(io.StringIO(out.getvalue()))
    assert {"oracle", "hgb", "hgb_text", "logistic", "prevalence", "active_last_week", "good", "good+hgb_text"} <= set(table["name"])
    assert table.loc[table.name == "good+hgb_text", "kind"].eq("blend").all()
    assert table.loc[table.name == "hgb_text", "kind"].eq("boosting").all()
    assert table.loc[table.name == "good+hgb_text", "test_roc_auc"].iloc[0] == pytest.approx(first.metrics[BLEND]["test"]["roc_auc"])
    assert table.loc[table.name == "good", "champion"].eq("*").all()
    assert list(table["kind"]).index("oracle") == 0
    blend_row = table.set_index("name").loc["good+hgb_text"]
    assert blend_row["test_roc_auc_vs_hgb"] == pytest.approx(first.metrics[BLEND]["test"]["roc_auc_vs_hgb"])
    assert table.set_index("name")["oot_roc_auc_vs_hgb_lo"].isna()[["hgb", "oracle", "prevalence"]].all()
    shown = _format(cfg, "table")  # one "difference [interval]" column per split
    assert f"{first.metrics[BLEND]['test']['roc_auc_vs_hgb']:+.4f} [" in shown and "test_roc_auc_vs_hgb_lo" not in shown
    for fmt in ("json", "markdown", "table"):
        out = io.StringIO()
        compare(cfg, fmt=fmt, out=out)
        assert "hgb" in out.getvalue()
    assert len(json.loads(_format(cfg, "json"))) == len(df)


def test_evaluate_adds_the_differences_to_hgb_to_runs_an_earlier_evaluate_logged(cfg, monkeypatch):
    import pipeline.evaluation.evaluate as E

    cfg.train.run_name, cfg.train.epochs = "early", 1
    result = train(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)

    def metrics_of(name):
        exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        return next(r.data.metrics for r in client.search_runs([exp]) if r.info.run_name == name)

    monkeypatch.setattr(E, "against_reference", lambda *args: None)  # as the code before them
    evaluate(cfg, result.run_dir)
    assert "test_roc_auc_vs_hgb" not in metrics_of("hgb_text")
    monkeypatch.undo()
    again = evaluate(cfg, result.run_dir)
    for name, key in (("hgb_text", "hgb_text"), ("logistic", "logistic"), ("early+hgb_text", BLEND)):
        logged = metrics_of(name)
        for s in ("val", "test", "oot"):
            for end in ("", "_lo", "_hi"):
                assert logged[f"{s}_roc_auc_vs_hgb{end}"] == pytest.approx(again.metrics[key][s][f"roc_auc_vs_hgb{end}"])


def reversed_model(result):
    """The trained model with its output negated: p -> 1 - p, so ROC-AUC -> 1 - ROC-AUC."""
    model, _ = load_model(result.checkpoint)
    with torch.no_grad():
        model.head[-1].weight.neg_()
        model.head[-1].bias.neg_()
    return model


def fake_run(cfg, source, name: str, model, flip: bool = True) -> tuple:
    """A finished run `name` beside `source` with `model` as its MLflow model and source's
    predictions (ranks reversed with `flip`, to match a reversed model), as if trained."""
    from models.checkpoint import save_model
    from pipeline import tracking

    run_dir = source.run_dir.parent / name
    run_dir.mkdir()
    for f in ("done.json", "predictions.parquet", "config.yaml"):
        (run_dir / f).write_bytes((source.run_dir / f).read_bytes())
    if flip:
        preds = pd.read_parquet(run_dir / "predictions.parquet")
        preds["p_engaged"] = 1 - preds["p_engaged"]
        preds.to_parquet(run_dir / "predictions.parquet")
    save_model(run_dir / "best.pt", model, model.config, cfg, 0, 0.0)
    tracking.setup(cfg)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"kind": "model", "stage": "train"})
        mlflow.log_artifact(str(run_dir / "best.pt"), "model")
    info = json.loads((run_dir / "done.json").read_text()) | {"run_id": run.info.run_id}
    (run_dir / "done.json").write_text(json.dumps(info))
    return run_dir, run.info.run_id


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_a_better_candidate_replaces_the_champion_after_the_decision_is_logged(cfg, monkeypatch):
    cfg.train.run_name = "better"
    cfg.train.epochs = 3
    good = train(cfg)
    worse_dir, worse_run_id = fake_run(cfg, good, "better-reversed", reversed_model(good))
    real = registry.tracking.log_metrics

    def unavailable(metrics, *a, **k):  # the tracking store fails as the gate logs its decision
        if any(k.startswith("gate_") for k in metrics):
            raise RuntimeError("tracking server unavailable")
        return real(metrics, *a, **k)

    monkeypatch.setattr(registry.tracking, "log_metrics", unavailable)
    with pytest.raises(RuntimeError, match="tracking server unavailable"):
        evaluate(cfg, worse_dir)
    assert registry.champion_version(cfg) is None  # the alias moves last, after the decision is logged
    monkeypatch.undo()
    before = evaluate(cfg, worse_dir).decision
    assert before.promoted is True and before.reason == "no champion yet"

    d = evaluate(cfg, good.run_dir).decision
    assert d.promoted is True and d.reason == "candidate is better" and d.champion_version == before.version
    assert d.champion == pytest.approx(1 - d.candidate, abs=1e-6)  # the reversed model, re-scored on the same examples
    champion = registry.champion_version(cfg)
    assert (champion.run_id, str(champion.version)) == (good.run_id, d.version)
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(good.run_id)
    assert run.data.tags["promoted"] == "True" and run.data.tags["champion_version_before"] == before.version
    assert run.data.metrics["gate_candidate_val_roc_auc"] == pytest.approx(d.candidate)
    assert run.data.metrics["gate_champion_val_roc_auc"] == pytest.approx(d.champion)


def test_a_champion_that_cannot_read_the_features_is_kept_and_moved_only_by_hand(cfg):
    from dataclasses import replace

    from jobs.definitions import move_champion
    from models.engagement import EngagementModel

    cfg.train.run_name = "fits"
    cfg.train.epochs = 1
    fits = train(cfg)
    mcfg = load_model(fits.checkpoint)[0].config
    wide = EngagementModel(replace(mcfg, text_dim=mcfg.text_dim + 8))  # as if from another text encoder
    _, wide_run_id = fake_run(cfg, fits, "fits-wide", wide, flip=False)
    champion = str(registry.register(cfg, wide_run_id).version)  # the champion of an earlier store
    move_champion(cfg, champion)

    d = evaluate(cfg, fits.run_dir).decision
    assert d.promoted is False and d.champion is None
    assert d.reason.startswith(f"not promoted: champion version {champion} cannot be compared on these features")
    assert "text_dim" in d.reason and d.reason.endswith(f"python -m jobs promote --version {d.version}")
    assert str(registry.champion_version(cfg).version) == champion
    tags = mlflow.MlflowClient(cfg.tracking.uri).get_run(fits.run_id).data.tags
    assert tags["promoted"] == "False" and tags["gate_reason"] == d.reason
    assert move_champion(cfg, d.version) == (champion, d.version)  # `python -m jobs promote --version N`
    assert registry.champion_version(cfg).run_id == fits.run_id


def test_a_run_from_another_world_size_is_neither_reused_nor_resumed(cfg, monkeypatch):
    import pipeline.training.train as T
    from features.store import feature_files
    from pipeline.training import loop

    cfg.train.run_name = "world"
    cfg.train.epochs = 1
    assert not train(cfg).skipped
    assert train(cfg).skipped  # the same world size: reused

    class Retrains(Exception):
        pass

    def retrains(*a, **k):  # the first thing a run that is not reused does
        raise Retrains

    monkeypatch.setattr(T, "FeatureDataset", retrains)
    with pytest.raises(Retrains):
        T._train(cfg, loop.Dist(rank=0, world=2))  # batch_size is per rank: not the same run
    saved = torch.load(T.Paths.of(cfg).runs / "world" / LAST, weights_only=True)
    assert saved["fingerprint"] != T._fingerprint(cfg, feature_files(Paths.of(cfg).features), 2)  # last.pt is not resumed either


@pytest.mark.slow  # trains twice and evaluates (~9 s): `make test-full`
def test_evaluate_refuses_predictions_of_another_feature_build(cfg, sim_store, tmp_path):
    import shutil

    import h5py

    from common.errors import UserError
    from pipeline.paths import Paths

    cfg.workdir = str(tmp_path / "w")  # a copy of the store, to rebuild without touching the shared one
    store = Paths.of(cfg).feature_file
    store.parent.mkdir(parents=True)
    shutil.copy(sim_store[0], store)
    cfg.train.run_name = "rebuilt"
    cfg.train.epochs = 1
    result = train(cfg)
    with h5py.File(store, "r+") as f:  # rebuilt since: same sources, a new build
        f.attrs["created_at"] = json.dumps("2030-01-01T00:00:00+00:00")
    with pytest.raises(UserError, match=r"trained on feature build \w+, but .* run `make train`") as e:
        evaluate(cfg, result.run_dir)
    assert "\n" not in str(e.value)
    assert registry.champion_version(cfg) is None  # nothing was gated
    assert not train(cfg).skipped  # `make train` trains again on the new build
    assert evaluate(cfg, result.run_dir).decision.promoted


def test_evaluate_refuses_a_blend_partner_it_does_not_fit(cfg, sim_store, tmp_path):
    from features.store import build_id, feature_files

    run_dir = tmp_path / "run"  # a finished run on this build; the check comes before its predictions are read
    run_dir.mkdir()
    (run_dir / "done.json").write_text(json.dumps({"run_id": None, "build_id": build_id(feature_files(
        Paths.of(cfg).features))}))
    for partner, baselines in (("logistic", cfg.eval.baselines), ("hgb_text", ["prevalence", "hgb"])):
        cfg.eval.blend_with, cfg.eval.baselines = partner, baselines
        with pytest.raises(UserError, match=rf"eval.blend_with='{partner}': blend with one of \['hgb', 'hgb_text'\]"):
            evaluate(cfg, run_dir)


def _format(cfg, fmt):
    out = io.StringIO()
    compare(cfg, fmt=fmt, out=out)
    return out.getvalue()


def test_no_raw_user_ids_or_message_text_reach_mlflow(cfg, tmp_path):
    cfg.train.run_name = "privacy"
    cfg.features.pseudonym_key = "s3cret-production-key"  # as if from $ENGAGEMENT_PSEUDONYM_KEY
    result = train(cfg)
    evaluate(cfg, result.run_dir)
    events = pd.read_parquet(cfg.data.events)
    blob = (tmp_path / "mlflow.db").read_bytes()
    for f in (tmp_path / "mlartifacts").rglob("*"):
        if f.is_file():
            blob += f.read_bytes()
    users = events.user_id.dropna().unique()
    assert not [u for u in users if u.encode() in blob]
    texts = events.text.dropna()
    long_texts = texts[texts.str.len() > 25].unique()[:300]
    assert len(long_texts) > 50 and not [t for t in long_texts if t.encode() in blob]
    assert b"s3cret-production-key" not in blob  # the pseudonym key is never logged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_mlflow_server_on_loopback_round_trip(tmp_path):
    port = _free_port()
    exe = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art")]
    proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        client = mlflow.MlflowClient(uri)
        for _ in range(120):
            try:
                client.search_experiments()
                break
            except Exception:
                time.sleep(0.5)
        exp = client.create_experiment("over-http")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "test_roc_auc", 0.75)
        client.log_param(run.info.run_id, "train.lr", "0.001")
        client.set_terminated(run.info.run_id)
        back = client.get_run(run.info.run_id)
        assert back.data.metrics["test_roc_auc"] == 0.75 and back.data.params["train.lr"] == "0.001"
        bound = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN}
        assert bound == {"127.0.0.1"}  # loopback only
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert np.isfinite(back.data.metrics["test_roc_auc"])


# -- the hybrid: sequence model + the baselines' aggregate features ----------------------------


def test_hybrid_reads_the_baselines_aggregates_and_keeps_the_founding_bug_checks(sim_store):
    from dataclasses import replace

    from features.aggregates import aggregate_features, load_aggregate_inputs
    from features.dataset import FeatureDataset, collate, signed_log1p
    from models.engagement import EngagementModel
    from pipeline import diagnostics as diag

    path, _, mcfg = sim_store
    data = FeatureDataset(path, replace(mcfg, aggregates=True))
    X, names = aggregate_features(*load_aggregate_inputs(path))
    assert data.model.aggregate_names == names
    rows = data.select(["train"])[:16]
    sub = data.subset(rows)
    batch = collate([sub[j] for j in range(len(rows))])
    assert batch["aggregates"].shape == (len(rows), len(names))
    assert np.allclose(batch["aggregates"].numpy(), signed_log1p(X[rows]))

    torch.manual_seed(0)
    model = EngagementModel(replace(data.model, dropout=0.0)).eval()
    logits, _ = model(batch)
    changed = dict(batch, aggregates=batch["aggregates"] + 1.0)
    assert not torch.allclose(model(changed)[0], logits)  # the head uses them
    halves = [diag.select(batch, range(0, 8)), diag.select(batch, range(8, 16))]
    assert diag.batch_independence_check(lambda: EngagementModel(replace(data.model, dropout=0.0)), halves).passed

    # A model trained on other columns gets its own columns by name, 0 where a store lacks one.
    wanted = [names[3], "count_not_in_this_store_7d", names[0]]
    other = FeatureDataset(path, replace(mcfg, aggregates=True, aggregate_names=wanted))
    a = other.subset(rows)[0]["aggregates"]
    assert np.allclose(a, [signed_log1p(X[rows[0], 3]), 0.0, signed_log1p(X[rows[0], 0])])


def test_hybrid_trains_saves_its_columns_and_scores_alike(cfg):
    from features.dataset import FeatureDataset, collate
    from features.store import feature_files

    cfg.model.aggregates = True
    result = train(cfg)
    assert "+aggregates" in result.run_dir.name
    model, ckpt = load_model(result.checkpoint)
    assert ckpt["model_config"]["aggregates"] and len(ckpt["model_config"]["aggregate_names"]) > 10
    saved = pd.read_parquet(result.run_dir / "predictions.parquet")
    # A fresh dataset from the model's own config (as scoring builds it) gives the same risk.
    data = FeatureDataset(feature_files(Paths.of(cfg).features), model.config)
    rows = saved["example"].to_numpy()[:32]
    sub = data.subset(rows)
    with torch.no_grad():
        logits, _ = model(collate([sub[j] for j in range(len(rows))]))
    assert np.allclose(torch.sigmoid(logits).numpy(), saved["p_engaged"].to_numpy()[:32], atol=1e-4)


def test_resume_restores_only_its_own_runs_checkpoint_rng_included(tmp_path):
    from pipeline.training import loop

    model = torch.nn.Linear(3, 1)
    torch.manual_seed(1)
    saved_rng, saved_weight = torch.get_rng_state(), model.weight.detach().clone()
    loop.save_state(tmp_path / LAST, model=model.state_dict(), fingerprint="run-a", epoch=5)
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    with torch.no_grad():
        model.weight.zero_()

    state, resumed = loop.resume(tmp_path / LAST, "run-b", {"epoch": 0}, model=model)
    assert not resumed and state == {"epoch": 0}  # another run's checkpoint...
    assert torch.equal(torch.get_rng_state(), rng) and not model.weight.any()  # ...changes nothing

    state, resumed = loop.resume(tmp_path / LAST, "run-a", {"epoch": 0}, model=model)
    assert resumed and state == {"epoch": 5}
    assert torch.equal(model.weight, saved_weight) and torch.equal(torch.get_rng_state(), saved_rng)
    assert loop.resume(tmp_path / "missing.pt", "run-a", {"epoch": 0}) == ({"epoch": 0}, False)

    # Under torchrun each rank's state is kept (rng_states gathers them) and each rank takes its own;
    # a rank beyond the saved ones (more ranks than at saving) takes rank 0's.
    states = [{"torch": torch.manual_seed(10 + r).get_state()} for r in range(2)]
    loop.save_state(tmp_path / "ranks.pt", states, fingerprint="run-c")
    for rank, want in ((1, 1), (0, 0), (3, 0)):
        assert loop.resume(tmp_path / "ranks.pt", "run-c", {}, rank)[1]
        assert torch.equal(torch.get_rng_state(), states[want]["torch"])

    # A checkpoint of the code before per-rank states (a run interrupted across the upgrade) resumes.
    old_rng = torch.manual_seed(7).get_state()
    torch.save({"fingerprint": "run-d", "epoch": 2, "torch_rng": old_rng}, tmp_path / "old.pt")
    torch.manual_seed(8)
    assert loop.resume(tmp_path / "old.pt", "run-d", {"epoch": 0}) == ({"epoch": 2}, True)
    assert torch.equal(torch.get_rng_state(), old_rng)


def test_the_optimizer_takes_the_multi_tensor_path_with_the_same_updates():
    from pipeline.training.loop import make_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin.load_state_dict(net.state_dict())
    fast = make_optimizer(net, 1e-2, 0.1)
    assert fast.defaults["foreach"] is True
    # The same groups through PyTorch's per-parameter loop.
    mirror = dict(zip(map(id, net.parameters()), twin.parameters()))
    groups = [{"params": [mirror[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in fast.param_groups]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and len(groups[1]["params"]) == 3  # bias, norm
    loop_opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    x = torch.tensor([[0, 1, 2], [3, 4, 0]])
    for _ in range(3):
        for model, opt in ((net, fast), (twin, loop_opt)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(net[1].weight, torch.nn.Linear(4, 3).weight)  # it did move


def test_platt_scaling_recovers_a_known_scale_and_shift_and_keeps_the_ranking():
    from scipy.special import expit

    from pipeline.training.calibration import apply_platt, fit_platt, log_loss_at

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(len(z)) < expit(z)).astype(float)
    skewed = expit(2.5 * z - 1.0)  # overconfident and shifted: scale 0.4, bias 0.4 undo it
    a, b = fit_platt(skewed, y)
    assert abs(a - 0.4) < 0.03 and abs(b - 0.4) < 0.05
    u = 2.5 * z - 1.0
    assert log_loss_at(u, y, a, b) < log_loss_at(u, y, 1.0, 0.0) - 0.05
    calibrated = apply_platt(skewed, a, b)
    assert np.all(np.diff(calibrated[np.argsort(skewed)]) >= 0)  # the same order
    assert fit_platt(skewed, np.ones_like(y)) == (1.0, 0.0)  # one class: nothing to fit


def test_the_saved_model_carries_its_calibration_and_serves_the_logged_predictions(cfg):
    from sklearn.metrics import roc_auc_score

    from features.dataset import FeatureDataset, collate
    from features.store import feature_files
    from pipeline.training import loop

    result = train(cfg)
    model, ckpt = load_model(result.checkpoint)
    a, b = ckpt["model_config"]["calibration_scale"], ckpt["model_config"]["calibration_bias"]
    assert (a, b) != (1.0, 0.0) and (model.config.calibration_scale, model.config.calibration_bias) == (a, b)
    logged = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert (logged["calibration_scale"], logged["calibration_bias"]) == pytest.approx((a, b))
    preds = pd.read_parquet(result.run_dir / "predictions.parquet").sort_values("example")
    data = FeatureDataset(feature_files(Paths.of(cfg).features), model.config)
    # How far into programs training reached is saved with it (and the predictions below used it).
    limits = data.subset(data.select(["train"], user_fraction=cfg.train.label_fraction)).trained_limits()
    assert min(limits.values()) > 0 and limits == {k: ckpt["model_config"][k] for k in limits}
    subset = data.subset(preds["example"].to_numpy())
    _, _, p = loop.predict(model, loop.loader(subset, 16, collate), torch.device("cpu"))
    np.testing.assert_allclose(p, preds["p_engaged"].to_numpy(), rtol=1e-5, atol=1e-6)
    # A finish run again (after a kill between its save and done.json) fits on the raw logits
    # again, not on top of its first fit.
    import dataclasses

    import pipeline.training.train as T

    T._finish(cfg, dataclasses.replace(result, run_id=None), FeatureDataset(feature_files(Paths.of(cfg).features),
              model.config, targets=True), model.config, torch.device("cpu"), "again")
    again = load_model(result.checkpoint)[1]["model_config"]
    assert (again["calibration_scale"], again["calibration_bias"]) == pytest.approx((a, b), rel=1e-4, abs=1e-5)
    # Without calibration the same weights give other probabilities, the same ranking.
    cfg.train.calibrate, cfg.train.run_name = False, "raw"
    raw = pd.read_parquet(train(cfg).run_dir / "predictions.parquet").sort_values("example")
    assert not np.allclose(raw["p_engaged"], preds["p_engaged"])
    assert roc_auc_score(raw["label"], raw["p_engaged"]) == pytest.approx(roc_auc_score(preds["label"], preds["p_engaged"]))


def test_with_ema_the_averaged_weights_are_validated_and_kept(cfg):
    cfg.train.ema_decay, cfg.train.epochs, cfg.train.run_name = 0.9, 1, "ema"
    result = train(cfg)
    last = torch.load(result.run_dir / LAST, weights_only=True)
    kept = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    averaged = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert kept.keys() == averaged.keys() == last["model"].keys()
    assert all(torch.equal(kept[k], averaged[k]) for k in kept)  # the one epoch's end: the best
    assert not all(torch.equal(kept[k], last["model"][k]) for k in kept)  # not the raw weights
    assert int(last["ema"]["n_averaged"]) == last["step"]  # one update per step
    with pytest.raises(UserError, match="ema_decay"):
        cfg.train.ema_decay, cfg.train.run_name = 1.5, "bad"
        train(cfg)


def test_encoders_frozen_for_the_first_epochs_then_train_with_the_head(cfg, monkeypatch):
    import pipeline.training.loop as loop

    changed = []  # per step: how many parameter tensors the update moved
    real = loop.update

    def update(optimizer, parameters, grad_clip, scheduler=None):
        params = list(parameters)
        before = [p.detach().clone() for p in params]
        real(optimizer, params, grad_clip, scheduler)
        changed.append(sum(not torch.equal(b, p) for b, p in zip(before, params)))

    monkeypatch.setattr(loop, "update", update)
    cfg.train.freeze_epochs, cfg.train.epochs, cfg.train.run_name = 1, 2, "lpft"
    train(cfg)
    # (The warm-up's first step has learning rate 0 and moves nothing.)
    first, second = changed[1 : len(changed) // 2], changed[len(changed) // 2 :]
    assert len(set(first)) == 1 and 0 < first[0] < 12  # one epoch the head's few tensors only
    assert min(second) > 60  # then the encoders' too (a tensor whose gradient is 0 may wait a step)

    cfg.train.freeze_encoders = True  # frozen for good: freeze_epochs would mean nothing
    with pytest.raises(UserError, match="freeze_epochs"):
        train(cfg)


def test_a_changed_baseline_is_fitted_again_not_read_from_the_cache_of_the_code_before(sim_store, monkeypatch):
    from features.dataset import load_examples
    from features.store import feature_files
    from pipeline.evaluation import baselines, evaluate

    path, cfg, _ = sim_store
    files = feature_files(Paths.of(cfg).features)
    examples, user_key, _ = load_examples(files)
    before = evaluate.baselines_cache(cfg, files)
    evaluate.baseline_predictions(cfg, files, examples, user_key)
    assert before.exists()
    fits = []
    real = baselines.fit_baselines
    monkeypatch.setattr(evaluate, "fit_baselines", lambda *a, **k: fits.append(1) or real(*a, **k))
    evaluate.baseline_predictions(cfg, files, examples, user_key)
    assert fits == []  # the same code: read back
    monkeypatch.setattr(baselines, "__file__", __file__)  # as if baselines.py had changed
    after = evaluate.baselines_cache(cfg, files)
    assert after != before
    try:
        evaluate.baseline_predictions(cfg, files, examples, user_key)
        assert fits == [1]
    finally:  # the shared store's folder keeps one cache, as other tests read it
        for f in after.parent.glob(after.stem + "*"):
            f.unlink()


def test_distillation_trains_on_the_teachers_out_of_fold_probabilities(cfg, monkeypatch, tmp_path):
    """train.distill: a training example's target mixes its label with a gradient boosting fitted
    on the other folds of the training users (never its own), and that is what the loss reads."""
    from features.dataset import load_examples
    from features.store import feature_files
    from models.engagement import EngagementModel
    from pipeline.evaluation import message_scores
    from pipeline.evaluation.blend import user_folds
    from pipeline.training import distill

    files = feature_files(Paths.of(cfg).features)
    examples, user_key, _ = load_examples(files)
    train_rows = np.flatnonzero((examples["split"] == 0) & (examples["label"] >= 0))
    rows = train_rows[user_folds(user_key[train_rows], 3) != 0]  # as with label_fraction: some users only
    fitted_on = []
    fit = message_scores.MessageScoredHGB.fit

    def spy(self, X, msgs, y, split, groups):
        fitted_on.append(set(user_key[(split == 0) & (y >= 0)].tolist()))
        return fit(self, X, msgs, y, split, groups)

    monkeypatch.setattr(message_scores.MessageScoredHGB, "fit", spy)
    p = distill.teacher_probabilities(files, rows, "hgb_text", cache_dir=tmp_path)
    assert np.isfinite(p[rows]).all() and np.isnan(np.delete(p, rows)).all()
    assert len(fitted_on) == distill.FOLDS and set().union(*fitted_on) == set(user_key[rows].tolist())
    for k, users in enumerate(fitted_on):  # fold k's users were scored by the fit that never saw them
        held = set(user_key[rows][user_folds(user_key, distill.FOLDS)[rows] == k].tolist())
        assert held and not held & users
    fitted_on.clear()
    np.testing.assert_array_equal(distill.teacher_probabilities(files, rows, "hgb_text", cache_dir=tmp_path), p)
    assert not fitted_on  # read back from the cache
    soft = distill.soft_targets(examples["label"], rows, p, 0.25)
    np.testing.assert_allclose(soft[rows], 0.75 * examples["label"][rows] + 0.25 * p[rows], rtol=1e-6)
    assert (np.delete(soft, rows) == np.delete(examples["label"], rows)).all()
    with pytest.raises(UserError, match=r"train.distill=1.5"):
        distill.soft_targets(examples["label"], rows, p, 1.5)

    # Training reads them: a teacher that says the opposite of the labels, at weight 1.
    monkeypatch.setattr(distill, "teacher_probabilities",
                        lambda files, rows, *a: np.where(np.isin(np.arange(len(examples["label"])), rows),
                                                         1.0 - examples["label"], np.nan))
    seen, forward = [], EngagementModel.forward
    monkeypatch.setattr(EngagementModel, "forward", lambda self, batch, labels=None: (
        labels is not None and seen.append((batch["example"].clone(), labels.clone())), forward(self, batch, labels))[1])
    cfg.train.run_name, cfg.train.epochs, cfg.train.distill = "distilled", 1, -0.5
    with pytest.raises(UserError, match=r"train.distill=-0.5: a weight in \[0, 1\]"):
        train(cfg)  # before any teacher is fitted
    cfg.train.distill = 1.0
    train(cfg)
    assert seen
    for ex, y in seen:
        np.testing.assert_array_equal(y.numpy(), 1.0 - examples["label"][ex.numpy()])


def test_data_without_messages_trains_the_streams_it_has(tmp_path, capsys):
    # As pretraining skips objectives without data, training gives a stream without any item no
    # encoder: a log without messages has no text width, and its conversation encoder failed.
    from tests.event_factories import build_store, make_events

    events = make_events(n_users=40, seed=3)
    events = events[events["event_type"] != "message"]
    _, cfg = build_store(tmp_path, events, None, "w", "train.init=scratch", "train.epochs=1",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=t")
    r = train(cfg)
    model, _ = load_model(r.checkpoint)
    assert set(model.config.streams) == {"events", "food"} and "conversation" not in model.encoders
    assert "train: no conversation items in this data; the model reads" in capsys.readouterr().out
