"""Pretraining objectives: corruption invariants, falling losses, checkpoints that load."""

import numpy as np
import pytest
import torch

from features.dataset import FeatureDataset, collate
from models.encoders import ConversationEncoder, EventEncoder, FoodEncoder
from models.engagement import EngagementModel
from pipeline.objectives import ConversationNegativeSampling, MaskedEvents, MaskedFood, derangement
from pipeline.pretrain import pretrain
from tests.model_factories import random_batch, tiny_config


def _conv_batch(lengths, T=10, E=4):
    """Message vectors that say which row and position they came from: (row, pos, 0, 0)."""
    B = len(lengths)
    emb = torch.zeros(B, T, E)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        emb[b, :n, 0] = b + 1
        emb[b, :n, 1] = torch.arange(n) + 1
        mask[b, :n] = False
    pos = torch.where(mask, 0, torch.tensor(lengths)[:, None] - torch.arange(T))
    ints = lambda v: torch.where(mask, 0, v)  # noqa: E731
    return {"embedding": emb, "sender": ints(torch.ones(B, T, dtype=torch.long)),
            "msg_no": ints(torch.arange(1, T + 1).repeat(B, 1)), "dt_bucket": ints(torch.full((B, T), 5)),
            "recency": ints(torch.full((B, T), 7)), "position": pos, "padding_mask": mask}


def test_derangement_has_no_fixed_points():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 50):
        for _ in range(20):
            p = derangement(n, g)
            assert sorted(p.tolist()) == list(range(n)) and (p != torch.arange(n)).all()


@pytest.mark.parametrize("lengths", [[6, 5], [8, 2, 7, 9, 3, 10]])
def test_negatives_are_never_self_pairs_and_split_marks_sit_after_k(lengths):
    cfg = tiny_config(text_dim=4)
    obj = ConversationNegativeSampling(ConversationEncoder(cfg), min_messages=4)
    conv = _conv_batch(lengths)
    seen_fake = 0
    for seed in range(60):
        out, split, target, used = obj.corrupt(conv, torch.Generator().manual_seed(seed))
        for b in range(len(lengths)):
            if not used[b]:
                assert split[b].eq(0).all()
                continue
            k = int((split[b] == 1).sum())
            valid = int((~out["padding_mask"][b]).sum())
            assert 1 <= k < valid and split[b, :k].eq(1).all() and split[b, k:valid].eq(2).all()
            assert split[b, valid:].eq(0).all()
            rows = out["embedding"][b, :valid, 0]
            assert rows[:k].eq(b + 1).all()  # before the cut: always the user's own messages
            if target[b] == 0:
                seen_fake += 1
                assert rows[k:].ne(b + 1).all()  # never the user's own continuation
                assert (out["msg_no"][b, :valid] == torch.arange(1, valid + 1)).all()  # numbering continues
                assert out["dt_bucket"][b, k] == conv["dt_bucket"][b, k]
                assert (out["position"][b, :valid] == torch.arange(valid, 0, -1)).all()
            else:
                assert torch.equal(rows, conv["embedding"][b, :valid, 0])
        assert out["recency"].eq(0).all()  # blanked for real and fake alike
    assert seen_fake > 10


def test_masking_never_hits_padding():
    cfg = tiny_config()
    batch = random_batch(cfg, B=13, T=7, seed=3)
    food = MaskedFood(FoodEncoder(cfg))
    ev = MaskedEvents(EventEncoder(cfg), mask_prob=0.5)
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        out, where, target = food.corrupt(batch["food"], g)
        assert (target > 0).all() and not batch["food"]["padding_mask"][where[:, 0], where[:, 1]].any()
        masked = out["food_ids"] == food.encoder.mask_id
        assert masked.sum() == len(where)  # one food per chosen meal, nothing else changed
        assert torch.equal(torch.where(masked, batch["food"]["food_ids"], out["food_ids"]), batch["food"]["food_ids"])
        out, pick = ev.corrupt(batch["events"], g)
        assert not (pick & batch["events"]["padding_mask"]).any()
        assert (out["type_id"][pick] == ev.encoder.mask_id).all() and (out["has_value"][pick] == 0).all()


@pytest.fixture
def store(sim_store):
    return sim_store


def test_each_objective_loss_falls_on_simulator_data(store):
    path, cfg, mcfg = store
    data = FeatureDataset(path, mcfg)
    batches = [collate([data[i] for i in range(j, min(j + 16, len(data)))]) for j in range(0, 64, 16)]
    for name, obj in {"conversation": ConversationNegativeSampling(ConversationEncoder(mcfg), 3),
                      "food": MaskedFood(FoodEncoder(mcfg)), "events": MaskedEvents(EventEncoder(mcfg))}.items():
        torch.manual_seed(0)
        opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
        losses = []
        for step in range(120):
            g = torch.Generator().manual_seed(step % 4)  # the same corruptions come round again
            loss, _ = obj(batches[step % 4][name], g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert np.mean(losses[-12:]) < 0.75 * np.mean(losses[:12]), (name, losses[:12], losses[-12:])


def test_pretrain_saves_encoders_that_load_into_the_engagement_model(store, tmp_path):
    path, cfg, mcfg = store
    cfg.pretrain.dir = str(tmp_path / "pre")
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = pretrain(cfg)
    assert set(result.checkpoints) == {"conversation", "food", "events"}
    for key in ("heldout_nsp_accuracy", "heldout_food_top10", "baseline_food_top10", "heldout_event_top1"):
        assert key in result.metrics
    model = EngagementModel(mcfg)
    batch = collate([FeatureDataset(path, mcfg)[i] for i in range(8)])
    for stream, ckpt in result.checkpoints.items():
        model.load_encoder(stream, ckpt, freeze=True)
        enc = {"conversation": ConversationEncoder, "food": FoodEncoder, "events": EventEncoder}[stream](mcfg)
        enc.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
        model.eval(), enc.eval()
        with torch.no_grad():
            assert torch.equal(model.encoders[stream](batch[stream])[0], enc(batch[stream])[0])
        assert not any(p.requires_grad for p in model.encoders[stream].parameters())
    again = pretrain(cfg)  # the same inputs: reused, not retrained
    assert again.skipped and again.run_id == result.run_id
