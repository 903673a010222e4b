"""Pretraining objectives (DESIGN.md §6). Each takes its encoder as a constructor argument
(the encoders know nothing of how they are trained), corrupts a collated stream dict, and
returns `(loss, stats)` where stats hold the numbers held-out evaluation aggregates.

Shapes: B batch, T items, M foods per meal, D model width, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import ConversationEncoder, EventEncoder, FoodEncoder


def derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A uniformly random cyclic permutation (Sattolo): perm[i] != i for every i, n >= 2."""
    perm = torch.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(torch.randint(0, i, (1,), generator=g))
        perm[i], perm[j] = perm[j].clone(), perm[i].clone()
    return perm


class ConversationNegativeSampling(nn.Module):
    """Cut each conversation at a random message k; with probability 1/2 replace everything
    after k by the continuation of another user's conversation (never the user's own);
    predict "real continuation" from [CLS] with BCE.

    Nothing but content can give a swap away: the spliced items continue the message
    numbers and positions, the first spliced item keeps the original's dt bucket, recency
    is blanked for every row (real or not), and both kinds get the same split marks."""

    def __init__(self, encoder: ConversationEncoder, min_messages: int = 4):
        super().__init__()
        self.encoder = encoder
        self.min_messages = min_messages
        self.head = nn.Linear(encoder.norm.normalized_shape[0], 1)

    def corrupt(self, conv: dict, g: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (new stream dict, split (B, T) long 0 none/1 before/2 after, target (B,)
        float 1 = real, used (B,) bool rows long enough to take part)."""
        lengths = (~conv["padding_mask"]).sum(1)  # (B,)
        used = lengths >= self.min_messages
        rows = torch.nonzero(used).flatten()
        out = {k: v.clone() for k, v in conv.items()}
        B, T = conv["padding_mask"].shape
        split = torch.zeros(B, T, dtype=torch.long)
        target = torch.ones(B)
        fake = torch.zeros(B, dtype=torch.bool)
        if len(rows) >= 2:
            fake[rows] = torch.rand(len(rows), generator=g) < 0.5
            donor = torch.full((B,), -1, dtype=torch.long)
            donor[rows] = rows[derangement(len(rows), g)]
        for b in rows.tolist():
            n = int(lengths[b])
            k = int(torch.randint(1, n, (1,), generator=g))  # keep items [0, k), >= 1 on each side
            split[b, :k], split[b, k:n] = 1, 2
            if not fake[b]:
                continue
            d = int(donor[b])
            nd = int(lengths[d])
            kd = int(torch.randint(1, nd, (1,), generator=g))  # donor's continuation starts here
            m = min(T - k, nd - kd)  # continuation length that fits
            for key in ("embedding", "sender", "dt_bucket"):
                out[key][b, k : k + m] = conv[key][d, kd : kd + m]
                out[key][b, k + m :] = 0
            out["dt_bucket"][b, k] = conv["dt_bucket"][b, k]  # the gap at the cut stays the original's
            n_new = k + m
            out["msg_no"][b, k:n_new] = conv["msg_no"][b, k - 1] + torch.arange(1, m + 1)
            out["msg_no"][b, n_new:] = 0
            out["padding_mask"][b] = torch.arange(T) >= n_new
            out["position"][b] = torch.where(out["padding_mask"][b], 0, n_new - torch.arange(T))
            split[b, k:n_new], split[b, n_new:] = 2, 0  # marks follow the new length
            target[b] = 0.0
        out["recency"] = torch.zeros_like(out["recency"])  # would date the donor's messages
        return out, split, target, used

    def forward(self, conv: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        conv, split, target, used = self.corrupt({k: v.cpu() for k, v in conv.items()}, g)
        device = self.head.weight.device
        conv = {k: v.to(device) for k, v in conv.items()}
        cls, _ = self.encoder(conv, split=split.to(device))  # (B, D)
        logits = self.head(cls).squeeze(-1)[used.to(device)]  # (B,) -> (n_used,)
        target = target.to(device)[used.to(device)]
        if not len(target):
            return logits.sum() * 0.0, {"n": 0}
        loss = F.binary_cross_entropy_with_logits(logits, target)
        correct = ((logits > 0).float() == target).sum().item()
        return loss, {"n": len(target), "correct": correct, "scores": torch.sigmoid(logits).detach().cpu(),
                      "targets": target.cpu()}


class _TiedHead(nn.Module):
    """BERT's prediction head: transform, then logits against a tied embedding table."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.transform(h) @ table.T + self.bias  # (N, D) @ (D, V) -> (N, V)


def _topk_hits(logits: torch.Tensor, target: torch.Tensor, ks=(1, 10)) -> dict:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    return {f"top{k}": (top[:, :k] == target[:, None]).any(1).sum().item() for k in ks}


class MaskedFood(nn.Module):
    """Mask one food of some meals (never padding) and predict it over the food vocabulary,
    with the output tied to the encoder's food embedding."""

    def __init__(self, encoder: FoodEncoder, mask_prob: float = 0.15):
        super().__init__()
        self.encoder = encoder
        self.mask_prob = mask_prob
        self.vocab = encoder.mask_id  # real ids are < mask_id; the [MASK] row is not a target
        self.head = _TiedHead(encoder.norm.normalized_shape[0], self.vocab)

    def corrupt(self, food: dict, g: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Returns (new stream dict, (N, 2) long (b, t) of masked meals, (N,) target ids)."""
        ids = food["food_ids"]  # (B, T, M)
        n_foods = (ids > 0).sum(-1)  # (B, T)
        valid = (~food["padding_mask"]) & (n_foods > 0)  # (B, T)
        pick = valid & (torch.rand(valid.shape, generator=g) < self.mask_prob)
        first_valid = valid & (valid.cumsum(1) == 1)  # every row with a meal masks at least one
        pick |= first_valid & ~pick.any(1, keepdim=True)
        where = torch.nonzero(pick)  # (N, 2)
        slot = (torch.rand(len(where), generator=g) * n_foods[pick]).long()  # a non-pad food slot
        # foods are left-aligned in a meal, so slot j < n_foods is never padding
        target = ids[where[:, 0], where[:, 1], slot]
        out = dict(food)
        out["food_ids"] = ids.clone()
        out["food_ids"][where[:, 0], where[:, 1], slot] = self.encoder.mask_id
        return out, where, target

    def forward(self, food: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        food_c, where, target = self.corrupt({k: v.cpu() for k, v in food.items()}, g)
        device = self.head.bias.device
        _, items = self.encoder({k: v.to(device) for k, v in food_c.items()})  # (B, T, D)
        h = items[where[:, 0].to(device), where[:, 1].to(device)]  # (N, D)
        table = self.encoder.food_embedding.weight[: self.vocab]  # (V, D) without [MASK]
        logits = self.head(h, table)  # (N, V)
        target = target.to(device)
        if not len(target):
            return logits.sum() * 0.0, {"n": 0}
        loss = F.cross_entropy(logits, target)
        return loss, {"n": len(target), **_topk_hits(logits.detach(), target), "targets": target.cpu()}


class MaskedEvents(nn.Module):
    """Mask a share of event types (and the fields that would give the type away: content
    and value) and predict them, output tied to the encoder's type embedding."""

    def __init__(self, encoder: EventEncoder, mask_prob: float = 0.15):
        super().__init__()
        self.encoder = encoder
        self.mask_prob = mask_prob
        self.vocab = encoder.mask_id
        self.head = _TiedHead(encoder.norm.normalized_shape[0], self.vocab)

    def corrupt(self, ev: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        valid = ~ev["padding_mask"]  # (B, T)
        pick = valid & (torch.rand(valid.shape, generator=g) < self.mask_prob)
        out = {k: v.clone() for k, v in ev.items()}
        out["type_id"][pick] = self.encoder.mask_id
        out["content"][pick] = 1  # "none"
        for k in ("value", "value_delta", "has_value"):
            out[k][pick] = 0.0
        return out, pick

    def forward(self, ev: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        ev_c, pick = self.corrupt({k: v.cpu() for k, v in ev.items()}, g)
        device = self.head.bias.device
        _, items = self.encoder({k: v.to(device) for k, v in ev_c.items()})  # (B, T, D)
        pick = pick.to(device)
        h = items[pick]  # (N, D)
        target = ev["type_id"].to(device)[pick]  # (N,)
        if not len(target):
            return h.sum() * 0.0, {"n": 0}
        logits = self.head(h, self.encoder.type_embedding.weight[: self.vocab])  # (N, V)
        loss = F.cross_entropy(logits, target)
        return loss, {"n": len(target), **_topk_hits(logits.detach(), target, ks=(1,)), "targets": target.cpu()}


class JointObjective(nn.Module):
    """Several objectives trained together: one forward (so DistributedDataParallel sees one
    module) returning the weighted sum of their losses and each one's stats."""

    def __init__(self, objectives: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        results = {s: obj(batch[s], g) for s, obj in self.objectives.items()}
        loss = sum(self.weights.get(s, 1.0) * r[0] for s, r in results.items())
        return loss, results


OBJECTIVES = {"conversation": ConversationNegativeSampling, "food": MaskedFood, "events": MaskedEvents}
