"""The [CLS] probe diagnostic (pipeline/diagnostics/probe.py): the probe's cross-validation, the
states it reads, and the facts it asks about."""

import numpy as np
import torch

from features import contract as C
from features.dataset import FeatureDataset
from features.store import load_arrays
from features.vocab import SENDER_IDS
from models.engagement import EngagementModel
from pipeline.diagnostics import probe as P


def test_the_probe_finds_a_linear_fact_and_not_a_coin_flip():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8)).astype(np.float32)
    groups = np.repeat(np.arange(60), 10)
    assert P.probe_auc(X, X[:, 0] + 0.3 * rng.normal(size=600) > 0.5, groups) > 0.95
    assert abs(P.probe_auc(X, rng.random(600) < 0.3, groups) - 0.5) < 0.1
    few = np.zeros(600, bool)
    few[:P.MIN_CASES - 1] = True
    assert np.isnan(P.probe_auc(X, few, groups))


def test_a_users_examples_are_never_on_both_sides_of_a_fold():
    # A fact that is the user's identity parity: learnable from a per-user code only if the
    # probe saw the same user in training; one-hot user columns therefore give chance.
    groups = np.repeat(np.arange(40), 8)
    X = np.eye(40, dtype=np.float32)[groups]
    assert abs(P.probe_auc(X, groups % 2 == 0, groups) - 0.5) < 0.15


def test_states_are_the_encoders_cls_in_the_order_asked(sim_store, one_thread):
    path, _, mcfg = sim_store
    torch.manual_seed(0)
    model = EngagementModel(mcfg).eval()
    data = FeatureDataset(path, mcfg)
    rows = np.random.default_rng(0).permutation(len(data.examples["label"]))[:37]
    got = P.cls_states(model, data, rows, batch_size=16)
    assert got.shape == (37, mcfg.d_model)
    with torch.inference_mode():
        for k in (0, 17, 36):  # alone in its batch: other padding, the same state
            alone = model.encoders["conversation"](data.subset(rows[[k]]).batch([0])["conversation"], items=False)[0]
            np.testing.assert_allclose(got[k], alone[0].numpy(), atol=1e-5)
        logits = P.cls_states(model, data, rows[:5], logit=True)
        assert logits.shape == (5, 1)
        np.testing.assert_allclose(logits[:, 0], model(data.subset(rows[:5]).batch(range(5)))[0].numpy(), atol=1e-5)


def test_wrote_last_7d_is_a_user_message_in_the_week_before_the_cutoff(sim_store):
    path, _, _ = sim_store
    a, _ = load_arrays(path, ("examples", "conversation"))
    ex, cv = a["examples"], a["conversation"]
    rows = np.arange(len(ex["as_of"]))
    got = P.store_facts([path], rows)["wrote_last_7d"]
    want = np.zeros(len(rows), bool)
    for r in rows:
        lo, hi = int(ex["conversation_start"][r]), int(ex["conversation_end"][r])
        ts, sender = cv["ts"][lo:hi].astype(np.int64), cv["sender"][lo:hi]
        want[r] = ((sender == SENDER_IDS[C.SENDER_USER]) & (ts > int(ex["as_of"][r]) - 7 * 86400)).any()
    assert want.any() and not want.all()
    assert np.array_equal(got, want)


def test_the_table_has_every_fact_and_encoder_and_the_simulators_announcements(sim_store, one_thread):
    path, cfg, mcfg = sim_store
    data = FeatureDataset(path, mcfg)
    rows = np.flatnonzero(data.examples["label"] >= 0)
    facts = P.store_facts([path], rows) | P.announced_facts(cfg, [path], rows)
    assert set(facts) == {"wrote_last_7d", "mentions_next_week", "announced_in_week"}
    assert all(len(v) == len(rows) and v.dtype == bool for v in facts.values())
    torch.manual_seed(0)
    table = P.probe_table({"a": EngagementModel(mcfg), "b": EngagementModel(mcfg)}, data, rows, facts)
    assert [fact for fact, _, _ in table] == list(facts)
    for fact, yes, aucs in table:
        assert yes == facts[fact].sum() and list(aucs) == ["a", "b", "its output"]
        assert all(np.isnan(v) or 0 <= v <= 1 for v in aucs.values())
    cfg.data.source = "files"  # another log: no simulator facts
    assert P.announced_facts(cfg, [path], rows) == {}


def test_what_is_missing_is_said_in_one_line(tmp_path, capsys, sim_store):
    assert P.main(["--config", "configs/test.yaml", f"workdir={tmp_path}/w"]) == 2  # no store
    err = capsys.readouterr().err
    assert err.startswith("error: no feature file") and err.count("\n") == 1
    path, cfg, _ = sim_store  # a store, and no run of this name
    assert P.main(["--config", "configs/test.yaml", f"workdir={cfg.workdir}", "train.run_name=never-trained"]) == 2
    err = capsys.readouterr().err
    assert "no trained model" in err and err.count("\n") == 1
