"""Pretraining objectives on hand-made batches and on simulator data: negative sampling
that only content can give away, masking that never hits padding, tied output layers, and
held-out metrics that beat their baselines."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from features.dataset import FeatureDataset, collate
from models.encoders import ConversationEncoder, EventEncoder, FoodEncoder
from models.synthetic import random_batch, tiny_config
from pipeline.pretraining.objectives import (
    ConversationNegativeSampling,
    MaskedEvents,
    MaskedFood,
    rows_per_user,
)
from pipeline.pretraining.pretrain import evaluate_objectives, latest_windows


def _conv_batch(lengths, users=None, T=10, E=4, first_msg_no=1, max_msg_no=40):
    """A collated-like batch whose message vectors say where they came from: (row + 1,
    position + 1, 0, 0); message numbers count from `first_msg_no`, capped like the store's."""
    B = len(lengths)
    emb = torch.zeros(B, T, E)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        emb[b, :n, 0] = b + 1
        emb[b, :n, 1] = torch.arange(n) + 1
        mask[b, :n] = False
    pos = torch.where(mask, 0, torch.tensor(lengths)[:, None] - torch.arange(T))
    ints = lambda v: torch.where(mask, 0, v)  # noqa: E731
    msg_no = torch.clamp(torch.arange(first_msg_no, first_msg_no + T), max=max_msg_no).repeat(B, 1)
    conv = {"embedding": emb, "sender": ints(torch.randint(1, 3, (B, T), generator=torch.Generator().manual_seed(0))),
            "msg_no": ints(msg_no), "dt_bucket": ints((torch.arange(T) % 7 + 2).repeat(B, 1)),
            "recency": ints(torch.full((B, T), 7)), "position": pos, "padding_mask": mask,
            "mention_first": ints(torch.full((B, T), 1)), "mention_last": ints(torch.full((B, T), 1))}
    user = torch.arange(B) if users is None else torch.tensor(users)
    return {"conversation": conv, "user": user}


def _fit(obj, steps: int, batch_of) -> list[dict]:
    """`steps` AdamW steps (lr 3e-3) of `obj` on `batch_of(step)`, with corruptions from a
    generator seeded by the step; returns each step's stats."""
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    stats = []
    for step in range(steps):
        loss, st = obj(batch_of(step), torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.append(st)
    return stats


def _ns_of(mcfg):
    return ConversationNegativeSampling(ConversationEncoder(mcfg), min_messages=4)


def _ns(E=4, **cfg):
    return ConversationNegativeSampling(ConversationEncoder(tiny_config(text_dim=E, **cfg)), min_messages=4)


@pytest.mark.parametrize("lengths,users", [([6, 5], [0, 1]), ([8, 2, 7, 9, 3, 10], [4, 4, 5, 6, 5, 7])])
def test_negatives_never_come_from_the_same_user_and_split_marks_sit_after_k(lengths, users):
    obj = _ns()
    batch = _conv_batch(lengths, users)
    conv, user = batch["conversation"], batch["user"]
    seen_fake = 0
    for seed in range(60):
        out, split, target, used = obj.corrupt(conv, user, torch.Generator().manual_seed(seed))
        for b in range(len(lengths)):
            if not used[b]:
                assert split[b].eq(0).all() and target[b] == 1
                continue
            n = lengths[b]
            k = int((split[b] == 1).sum())
            assert 1 <= k < n and split[b, :k].eq(1).all() and split[b, k:n].eq(2).all()
            assert split[b, n:].eq(0).all()
            source = out["embedding"][b, :n, 0].long() - 1  # the row each message came from
            assert source[:k].eq(b).all()  # before the cut: always the user's own messages
            if target[b] == 0:
                seen_fake += 1
                assert (user[source[k:]] != user[b]).all()  # never the user's own continuation
            else:
                assert torch.equal(out["embedding"][b], conv["embedding"][b])
        assert all(out[k].eq(0).all() for k in ("recency", "mention_first", "mention_last"))  # blanked for real and fake alike
    assert seen_fake > 10


def test_two_windows_of_one_user_are_never_each_others_negatives():
    obj = _ns()
    # Rows 0 and 1 are one user (overlapping windows), rows 2 and 3 two others.
    batch = _conv_batch([9, 10, 8, 10], users=[3, 3, 8, 9])
    fakes = {0: 0, 1: 0}
    for seed in range(100):
        out, split, target, used = obj.corrupt(batch["conversation"], batch["user"], torch.Generator().manual_seed(seed))
        for b in (0, 1):
            k = int((split[b] == 1).sum())
            donors = set(out["embedding"][b, k:10, 0].long().sub(1).tolist()) - {-1}
            if target[b] == 0:
                fakes[b] += 1
                assert donors <= {2, 3}, (seed, b, donors)
    assert min(fakes.values()) > 20

    # Two windows of one user alone: no continuation can be faked, so neither row takes part
    # (a row that could only ever be real would teach the head that its length means real).
    alone = _conv_batch([9, 10], users=[3, 3])
    for seed in range(20):
        _, split, target, used = obj.corrupt(alone["conversation"], alone["user"], torch.Generator().manual_seed(seed))
        assert not used.any() and split.eq(0).all()
    # Two different users: each is the other's only donor.
    pair = _conv_batch([9, 10], users=[3, 4])
    seen = 0
    for seed in range(40):
        out, split, target, used = obj.corrupt(pair["conversation"], pair["user"], torch.Generator().manual_seed(seed))
        assert used.all()
        for b in torch.nonzero(target == 0).flatten().tolist():
            k = int((split[b] == 1).sum())
            seen += 1
            assert out["embedding"][b, k : [9, 10][b], 0].eq(2 - b).all()
    assert seen > 10


def test_fakes_keep_the_original_length_and_timeline():
    """Only content may change: a fake has exactly n - k donor messages, one contiguous run
    of another user's conversation after a cut of its own, and the original's padding,
    positions, message numbers and dt buckets."""
    obj = _ns()
    batch = _conv_batch([10] * 6)  # every row full length
    conv = batch["conversation"]
    fakes = 0
    for seed in range(40):
        out, split, target, used = obj.corrupt(conv, batch["user"], torch.Generator().manual_seed(seed))
        assert used.all()
        for key in ("padding_mask", "position", "msg_no", "dt_bucket"):
            assert torch.equal(out[key], conv[key]), key
        for b in torch.nonzero(target == 0).flatten().tolist():
            fakes += 1
            k = int((split[b] == 1).sum())
            assert (split[b] > 0).sum() == 10
            donor = out["embedding"][b, k:, 0]
            assert donor.eq(donor[0]).all() and donor[0] != b + 1  # one other row
            at = out["embedding"][b, k:, 1]  # the donor's positions, 1-based
            assert at[0] >= 2 and (at.diff() == 1).all()  # a contiguous continuation after its own cut
    assert fakes > 50


def test_length_and_cut_say_nothing_about_the_target():
    """Over many batches of mixed lengths, the visible length (max position) and the cut k
    are independent of real/fake: a chi-square test of target x (length, k) finds nothing."""
    obj = _ns()
    g = torch.Generator().manual_seed(0)
    cells: dict = {}
    for _ in range(300):
        lengths = torch.randint(1, 11, (12,), generator=g).tolist()
        batch = _conv_batch(lengths)
        out, split, target, used = obj.corrupt(batch["conversation"], batch["user"], g)
        n, k = out["position"].max(1).values, (split == 1).sum(1)
        for b in torch.nonzero(used).flatten().tolist():
            cell = cells.setdefault((int(n[b]), int(k[b])), [0, 0])
            cell[int(target[b])] += 1
    table = np.array([c for c in cells.values() if sum(c) >= 10]).T  # (2 targets, cells)
    assert table.sum() > 2000 and 0.45 < table[0].sum() / table.sum() < 0.55
    assert chi2_contingency(table).pvalue > 1e-3, table


def test_message_numbers_stay_within_the_cap():
    """Long-tenure users' message numbers sit at the store's cap (features.max_msg_no); a
    fake must not count past it (the embedding has no row there)."""
    obj = _ns(max_msg_no=40)
    batch = _conv_batch([10] * 4, first_msg_no=35, max_msg_no=40)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out, *_ = obj.corrupt(batch["conversation"], batch["user"], g)
        assert out["msg_no"].max() <= 40 and torch.equal(out["msg_no"], batch["conversation"]["msg_no"])
        loss, stats = obj(batch, g)  # the encoder looks every message number up
        assert torch.isfinite(loss) and stats["n"] == 4


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


@pytest.mark.parametrize("objective,table,ids", [(MaskedFood, "food_embedding", "food_ids"),
                                                 (MaskedEvents, "type_embedding", "type_id")])
def test_masked_prediction_is_tied_to_the_input_embedding(objective, table, ids):
    cfg = tiny_config(n_foods=60, n_event_types=20)
    obj = objective({"food_ids": FoodEncoder, "type_id": EventEncoder}[ids](cfg))
    weight = getattr(obj.encoder, table).weight  # (V + 1, D), the last row is [MASK]
    V = obj.vocab
    own = [n for n, p in obj.named_parameters() if not n.startswith("encoder.") and p.ndim == 2 and V in p.shape]
    assert not own, f"the head has a (V, D) output matrix of its own: {own}"
    batch = random_batch(cfg, B=8, T=6, seed=1)
    batch[obj.stream][ids] = batch[obj.stream][ids].clamp(max=V // 2)  # ids above V // 2 never appear as inputs
    loss, stats = obj(batch, torch.Generator().manual_seed(0))
    assert stats["n"] > 0
    loss.backward()
    unseen = weight.grad[V // 2 + 1 : V]  # reachable only through the output layer
    assert (unseen.abs().sum(1) > 0).all()


def test_negative_sampling_learns_from_content_on_held_out_users():
    """When message vectors carry the writer (a direction per user), the objective learns to
    spot another user's continuation on users it never saw, with fresh corruptions every step
    (nothing to memorise); length and cut carry no signal (test above)."""
    E, T = 8, 10

    def users(B, g):
        u = torch.nn.functional.normalize(torch.randn(B, 1, E, generator=g), dim=-1)  # (B, 1, E)
        batch = _conv_batch(torch.randint(5, T + 1, (B,), generator=g).tolist(), T=T, E=E)
        conv = batch["conversation"]
        conv["embedding"] = (3.0 * u + 0.3 * torch.randn(B, T, E, generator=g)) * (~conv["padding_mask"])[..., None]
        return batch

    torch.manual_seed(0)
    obj = _ns(E=E, d_model=16, n_layers=1, d_ff=32, dropout=0.0)
    held_out = [users(64, torch.Generator().manual_seed(10_000 + i)) for i in range(2)]

    def accuracy() -> tuple[float, float]:
        obj.eval()
        g, correct, n, losses = torch.Generator().manual_seed(7), 0, 0, []
        with torch.no_grad():
            for batch in held_out:
                loss, st = obj(batch, g)
                correct, n, losses = correct + st["correct"], n + st["n"], losses + [loss.item()]
        obj.train()
        return correct / n, float(np.mean(losses))

    before = accuracy()
    data = torch.Generator().manual_seed(0)
    _fit(obj, 60, lambda step: users(32, data))
    after = accuracy()
    assert after[0] > 0.65 and after[1] < 0.62, (before, after)  # chance: 0.5 and ln 2 = 0.693


def test_masked_objectives_beat_their_baselines_on_held_out_users(sim_store):
    """Trained with fresh corruptions every step on training users, measured by the stage's
    own evaluation on validation and test users beside the popularity baselines."""
    path, _, mcfg = sim_store
    data = FeatureDataset(path, mcfg)
    train = latest_windows(data, data.select(["train"], labelled=False), 4)
    held_out = data.subset(latest_windows(data, data.select(["val", "test"], labelled=False), 4))
    batches = [collate([data[int(i)] for i in train[j : j + 16]]) for j in range(0, len(train), 16)]
    torch.manual_seed(0)  # the weights' init too, not only the steps: the same in any test order
    objectives = torch.nn.ModuleDict({"food": MaskedFood(FoodEncoder(mcfg)), "events": MaskedEvents(EventEncoder(mcfg))})
    counts = {}
    for name, obj in objectives.items():
        torch.manual_seed(0)
        counts[name] = np.zeros(obj.vocab, np.int64)
        for stats in _fit(obj, 120, lambda step: batches[step % len(batches)]):
            counts[name] += np.bincount(stats["targets"].numpy(), minlength=obj.vocab)
    runs = [evaluate_objectives(objectives, held_out, 32, counts, seed) for seed in range(4)]
    m = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    assert m["heldout_food_top10"] > m["baseline_food_top10"] + 0.03, m
    assert m["heldout_event_top1"] > m["baseline_event_top1"] + 0.05, m


def test_the_future_objective_learns_next_weeks_days_and_never_reads_unknown_ones(sim_store):
    from pipeline.pretraining.objectives import FutureActivity

    path, _, mcfg = sim_store
    assert mcfg.future_days == 7
    data = FeatureDataset(path, mcfg, targets=True)
    train = latest_windows(data, data.select(["train"], labelled=False), 4)
    held_out = data.subset(latest_windows(data, data.select(["val", "test"], labelled=False), 4))
    batches = [collate([data[int(i)] for i in train[j : j + 16]]) for j in range(0, len(train), 16)]
    torch.manual_seed(0)
    enc = {"events": EventEncoder(mcfg).eval(), "food": FoodEncoder(mcfg).eval()}
    obj = torch.nn.ModuleDict({"future": FutureActivity(enc, mcfg.d_model, 7)})
    # Days after the end of the log are -1: left out of the loss, whatever they would have been.
    b = batches[0]
    unknown = torch.rand(b["future"].shape, generator=torch.Generator().manual_seed(0)) < 0.3
    loss, stats = obj["future"](b | {"future": torch.where(unknown, -1.0, b["future"])}, torch.Generator())
    logits = obj["future"].head(torch.cat([e(b[s])[0] for s, e in enc.items()], -1))
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[~unknown], b["future"][~unknown])
    assert stats["n"] == int((~unknown).sum()) and torch.allclose(loss, want)
    assert obj["future"](b | {"future": torch.full_like(b["future"], -1.0)}, torch.Generator())[1]["n"] == 0
    obj.train()
    _fit(obj["future"], 80, lambda step: batches[step % len(batches)])  # (it draws nothing from the generator)
    m = evaluate_objectives(obj, held_out, 32, {}, 0)
    assert m["heldout_future_auc"] > 0.7 and m["baseline_future_auc"] == 0.5, m


def test_coles_slices_are_contiguous_pieces_of_their_own_row_renumbered_as_windows():
    from pipeline.pretraining.objectives import random_slices

    lengths = [10, 3, 0, 7, 4]
    batch = _conv_batch(lengths, T=10)  # embedding[b, i] = (b + 1, i + 1, 0, 0)
    conv = batch["conversation"]
    slices, rows = random_slices(conv, 3, 4, torch.Generator().manual_seed(0))
    assert rows.tolist() == [0, 0, 0, 3, 3, 3, 4, 4, 4]  # rows with >= 4 items, 3 slices each
    size = (~slices["padding_mask"]).sum(1)
    for j, b in enumerate(rows.tolist()):
        n, k = lengths[b], int(size[j])
        assert 4 <= k <= n
        emb = slices["embedding"][j]
        assert (emb[:k, 0] == b + 1).all()  # its own row's items
        first = int(emb[0, 1]) - 1
        assert emb[:k, 1].tolist() == list(range(first + 1, first + k + 1))  # contiguous, in order
        assert slices["position"][j, :k].tolist() == list(range(k, 0, -1))  # 1 = the slice's latest
        assert slices["sender"][j, :k].tolist() == conv["sender"][b, first : first + k].tolist()
        assert (emb[k:] == 0).all() and (slices["position"][j, k:] == 0).all() and (slices["sender"][j, k:] == 0).all()
    assert random_slices(conv, 2, 11, torch.Generator())[1].numel() == 0  # nobody long enough


def test_coles_learns_to_find_a_users_other_slices_on_held_out_users():
    """When a user's events share a signature (two event types of their own), slices of one
    user end up nearer each other than any other user's, on users never trained on."""
    from pipeline.pretraining.objectives import CoLES

    cfg = tiny_config(d_model=16, n_layers=1, d_ff=32, dropout=0.0, n_event_types=40)

    def users(B, g):
        batch = random_batch(cfg, B=B, T=12, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        ev = batch["events"]
        own = torch.randint(2, 40, (B, 2), generator=g)  # (B, 2) each user's two types
        pick = own.gather(1, torch.randint(0, 2, ev["type_id"].shape, generator=g))  # (B, T)
        ev["type_id"] = torch.where(ev["padding_mask"], 0, pick)
        batch["user"] = torch.arange(B)
        return batch

    torch.manual_seed(0)
    obj = CoLES({"events": EventEncoder(cfg)}, splits=3, min_len=4)
    held_out = [users(32, torch.Generator().manual_seed(10_000 + i)) for i in range(2)]

    def retrieval() -> tuple[float, float]:
        obj.eval()
        g, hit, n, chance = torch.Generator().manual_seed(7), 0, 0, 0.0
        with torch.no_grad():
            for batch in held_out:
                _, st = obj(batch, g)
                hit, n, chance = hit + st["correct"], n + st["n"], chance + st["chance"]
        obj.train()
        return hit / n, chance / n

    before, chance = retrieval()
    data = torch.Generator().manual_seed(0)
    _fit(obj, 80, lambda step: users(32, data))
    after, _ = retrieval()
    assert chance < 0.05 and after > 0.6 and after > before + 0.2, (before, after, chance)


def test_coles_counts_windows_of_one_user_as_one_class():
    from pipeline.pretraining.objectives import CoLES

    obj = CoLES({"events": EventEncoder(tiny_config())}, splits=2)
    z = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    # rows 0-1 and 2-3 are two windows each of users 5 and 9: all four slices of a user are positives
    label = torch.tensor([5, 5, 5, 5, 9, 9])
    loss, _, _ = obj.pair_loss(z, label)
    dist = torch.cdist(z, z)
    pos = [dist[i, j] ** 2 for i in range(6) for j in range(6) if i != j and label[i] == label[j]]
    neg = [torch.relu(0.5 - dist[i, j]) ** 2 for i in range(6) for j in range(6) if label[i] != label[j]]
    # every row has 2 or 4 negatives (< 5): all of them are the hard ones
    assert torch.allclose(loss, torch.stack(pos + neg).mean(), atol=1e-6)


def test_an_objectives_held_out_figures_do_not_depend_on_the_others_beside_it(sim_store):
    from pipeline.pretraining.objectives import CoLES

    path, _, mcfg = sim_store
    data = FeatureDataset(path, mcfg)
    held_out = data.subset(latest_windows(data, data.select(["val", "test"], labelled=False), 2))
    torch.manual_seed(0)
    nsp, events = _ns_of(mcfg), MaskedEvents(EventEncoder(mcfg))
    counts = {"events": np.ones(events.vocab, np.int64)}
    alone = evaluate_objectives(torch.nn.ModuleDict({"conversation": nsp}), held_out, 16, counts, 0)
    crowd = evaluate_objectives(torch.nn.ModuleDict({"coles": CoLES({"events": events.encoder}), "conversation": nsp,
                                                     "events": events}), held_out, 16, counts, 0)
    assert alone["heldout_nsp_accuracy"] == crowd["heldout_nsp_accuracy"]
    assert alone["baseline_nsp_accuracy"] == crowd["baseline_nsp_accuracy"]  # the same corruptions
    assert "heldout_coles_top1" in crowd and "heldout_event_top1" in crowd


def test_rows_per_user_lays_the_masked_items_out_per_row_and_finds_each_again():
    # A masked objective asks its encoder for the states of its masked items only
    # (`items=rows`); rows_per_user turns the masked (b, t) pairs into those rows, and each
    # pair must find its own item's state again at (b, column).
    g = torch.Generator().manual_seed(0)
    for pick in (torch.rand(9, 11, generator=g) < 0.2, torch.zeros(4, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)):
        where = torch.nonzero(pick)
        rows, column = rows_per_user(where, pick.shape[0])
        assert rows.shape == (pick.shape[0], max(1, int(pick.sum(1).max())))
        assert torch.equal(rows[where[:, 0], column], where[:, 1])
        states = torch.randn(*pick.shape, 4)  # (B, T, D) every item's state
        picked = states[torch.arange(pick.shape[0])[:, None], rows]  # (B, R, D) what the encoder returns
        assert torch.equal(picked[where[:, 0], column], states[pick])
