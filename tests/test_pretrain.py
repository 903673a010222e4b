"""`make pretrain` on a tiny simulator store: checkpoints that load into the engagement
model. The objectives themselves are tested in tests/test_objectives.py."""

import numpy as np
import torch

from features.dataset import FeatureDataset, collate, user_numbers
from models.encoders import ConversationEncoder, EventEncoder, FoodEncoder
from models.engagement import EngagementModel
from pipeline.pretrain import pretrain


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


def test_pretrain_saves_encoders_that_load_into_the_engagement_model(sim_store, tmp_path):
    path, cfg, mcfg = sim_store
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
