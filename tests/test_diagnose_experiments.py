"""The diagnose command on a real (tiny) store, its exit status, and the experiment grid."""

import math

import numpy as np
import pytest

import pipeline.diagnostics.diagnose as diagnose_module
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.diagnostics import CheckResult
from pipeline.diagnostics.diagnose import TRUNCATION_WARN, diagnose, exit_code, stream_checks
from pipeline.experiments import experiment_configs, own_pretraining

STREAMS = ("conversation", "food", "events")
MODEL_CHECKS = [
    "init_loss", "batch_independence", "padding_invariance", "train_eval_agreement",
    "grad_norm", "overfit_one_batch", "leaked_label",
]
DATA_CHECKS = [f"data: {s} {c}" for s in STREAMS for c in ("stream", "truncation")] + ["data: labels"]
TOKEN_CHECKS = [f"data: unseen {k}" for k in ("meals", "foods", "event types", "content")]


def test_diagnose_on_the_tiny_store_names_every_check_and_finds_it_healthy(sim_store, capsys, one_thread):
    _, cfg, _ = sim_store
    # 7 batches to learn from: with 3, the leaked-label check failed a sound model on 4 seeds of 6
    # with the real labels, and on 1 of 8 with coin-flip labels at the leak's level (learning.py).
    results = diagnose(cfg, n_batches=8, batch_size=16)
    out = capsys.readouterr().out
    assert [r.name for r in results] == DATA_CHECKS + TOKEN_CHECKS + MODEL_CHECKS
    by_name = {r.name: r for r in results}
    # A correct batch-first model passes every model check, on labels far from balanced
    # (~79% engaged): the init loss is compared with the output bias's start, not ln 2.
    for name in MODEL_CHECKS:
        assert by_name[name].verdict == "PASS", by_name[name]
    init = by_name["init_loss"].figures
    assert abs(init["prevalence"] - 0.5) > 0.2 and abs(init["loss"] - math.log(2)) > 0.1, init
    assert abs(init["start_prevalence"] - 0.789) < 0.01 and abs(init["loss"] - init["expected"]) < 0.03, init
    assert "expected of a model that knows nothing" in by_name["init_loss"].detail
    # Data: no stream mostly empty; truncation is a verdict of its own, WARN above the share.
    for s in STREAMS:
        assert by_name[f"data: {s} stream"].verdict == "PASS"
        cut = by_name[f"data: {s} truncation"]
        assert cut.passed and cut.warn == (cut.figures["cut"] > TRUNCATION_WARN), cut
        assert f"model.max_len_{s}" in cut.detail
    assert by_name["data: events truncation"].verdict == "WARN"  # test.yaml keeps max_len small
    assert by_name["data: labels"].verdict == "PASS"
    for r in results:
        assert f"{r.verdict}  {r.name}" in out
    assert "verdict: every check passed (warnings: " in out
    assert exit_code(results) == 0


def test_diagnose_flags_the_seed_bug_and_exits_1(sim_store, capsys, monkeypatch, one_thread):
    from tests.test_models import SeedBugEncoder, with_sequence_encoder

    _, cfg, _ = sim_store
    monkeypatch.setattr(diagnose_module, "EngagementModel", lambda mcfg: with_sequence_encoder(mcfg, SeedBugEncoder))
    results = diagnose(cfg, n_batches=2, batch_size=16, overfit_steps=20, leak_steps=20)
    by_name = {r.name: r for r in results}
    assert by_name["batch_independence"].verdict == "FAIL", by_name["batch_independence"]
    assert by_name["batch_independence"].figures["own_grad"] == 0.0  # [CLS] never sees an item
    assert "look at: " in capsys.readouterr().out
    assert exit_code(results) == 1


def test_tokens_no_training_window_holds_are_counted_per_split_and_warned(sim_store, monkeypatch):
    from features.dataset import load_examples
    from features.labels import window_items
    from features.store import SPLITS, load_arrays

    path, _, _ = sim_store
    examples, _, file_of = load_examples([path])
    arrays = load_arrays(path, ("events", "food"))[0]
    checks = diagnose_module.token_checks([path], examples, file_of, ["food", "events"])
    assert [r.name for r in checks] == TOKEN_CHECKS
    meals, types = checks[0], checks[2]  # (a tiny log's held-out users do log foods training never saw)
    assert meals.verdict == types.verdict == "PASS" and meals.figures["distinct"] == types.figures["distinct"] == 0
    # A new event type in the events only out-of-time windows hold: the held-out shares say where.
    split = examples["split"]
    start, end = examples["events_start"].astype(np.int64), examples["events_end"].astype(np.int64)
    windows = {g: np.unique(window_items(start[rows], end[rows] - start[rows]))
               for g, rows in (("oot", split == SPLITS.index("oot")), ("other", split != SPLITS.index("oot")))}
    only_oot = np.setdiff1d(windows["oot"], windows["other"])
    assert 0 < len(only_oot) < len(windows["oot"])
    arrays["events"]["type_id"][only_oot] = 99
    monkeypatch.setattr(diagnose_module, "load_arrays", lambda f, streams: (arrays, None))
    r = {c.name: c for c in diagnose_module.token_checks([path], examples, file_of, ["events"])}["data: unseen event types"]
    assert r.verdict == "WARN" and r.figures["distinct"] == 1 and r.figures["val"] == r.figures["test"] == 0
    assert r.figures["oot"] == pytest.approx(len(only_oot) / len(windows["oot"]))
    assert "0.00% of validation" in r.detail and "new since the training weeks" in r.detail


def test_stream_checks_give_truncation_and_empty_streams_their_own_verdicts():
    few = np.array([0] * 10 + [5] * 85 + [40] * 5)  # 5% longer than max_len
    empty, cut = stream_checks(few, "food", max_len=16)
    assert (empty.verdict, cut.verdict) == ("PASS", "PASS")
    assert cut.figures["cut"] == pytest.approx(0.05)
    many = np.array([0] * 60 + [5] * 20 + [40] * 20)  # 60% empty, 20% longer than max_len
    empty, cut = stream_checks(many, "food", max_len=16)
    assert (empty.verdict, cut.verdict) == ("FAIL", "WARN")
    assert "model.max_len_food=40 would keep 95%" in cut.detail


@pytest.mark.parametrize(
    ("results", "status"),
    [
        ([CheckResult("a", True, ""), CheckResult("b", True, "", warn=True)], 0),
        ([CheckResult("a", True, ""), CheckResult("b", False, "")], 1),
    ],
)
def test_cli_diagnose_exits_1_when_a_check_fails(monkeypatch, results, status):
    monkeypatch.setattr(diagnose_module, "diagnose", lambda cfg: results)
    assert main(["diagnose", "--config", "configs/test.yaml"]) == status


def test_cli_diagnose_exits_2_on_a_user_error(tmp_path, capsys):
    assert main(["diagnose", "--config", "configs/test.yaml", f"workdir={tmp_path}"]) == 2
    assert "no feature file" in capsys.readouterr().err


def test_experiment_grid_covers_label_fractions_ablations_and_pooling():
    configs = experiment_configs("configs/test.yaml", ["workdir=/tmp/unused"])
    fractions = {(c.train.init, c.train.label_fraction) for c in configs.values()}
    assert {(i, f) for i in ("pretrained", "scratch") for f in (0.05, 0.2, 1.0)} <= fractions
    streams = {tuple(c.model.streams) for c in configs.values()}
    assert {("food", "events"), ("conversation", "events"), ("conversation", "food")} <= streams
    assert {c.model.pooling for c in configs.values()} == {"cls", "mean"}
    from pipeline.training.train import run_name

    assert len({run_name(c) for c in configs.values()}) == len(configs)  # distinct MLflow runs
    # The future-objective and CoLES runs pretrain encoders of their own, each in its own folder.
    from pipeline.paths import Paths

    base = load_config("configs/test.yaml", ["workdir=/tmp/unused"])
    others = [c for c in configs.values() if not {"future", "coles"} & set(c.pretrain.objectives)]
    assert not any(own_pretraining(c, base) for c in others)  # they share make pretrain's
    for objective in ("future", "coles"):
        own = [c for c in configs.values() if objective in c.pretrain.objectives]
        assert all(own_pretraining(c, base) for c in own)
        assert {c.train.label_fraction for c in own} == {0.05, 0.2, 1.0}
        assert len({Paths.of(c).pretrain for c in own}) == 1
        assert not {Paths.of(c).pretrain for c in own} & {Paths.of(c).pretrain for c in others}
