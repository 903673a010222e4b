"""Pretraining objectives (docs/design.md §6). Each takes its encoder as a constructor argument
(the encoders know nothing of how they are trained), takes a whole collated batch
(features/dataset.py), corrupts its own stream of it, and returns `(loss, stats)` where
stats hold the numbers held-out evaluation aggregates.

Shapes: B batch, T items, M foods per meal, D model width, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import ConversationEncoder, EventEncoder, FoodEncoder


class ConversationNegativeSampling(nn.Module):
    """Cut each conversation at a random message k; with probability 1/2 replace everything
    after k by the continuation of another user's conversation (never the user's own, even
    when a user has several windows in the batch); predict "real continuation" from [CLS]
    with BCE.

    Only content (message vectors and senders) can give a swap away. A fake keeps the
    original's length n and timeline: exactly n - k donor messages replace messages k..n-1,
    and padding, positions, message numbers and dt buckets stay the original's; recency is
    blanked for every row (real or not), and both kinds get the same split marks. The cut k
    is drawn before the coin, and only among cuts some other user in the batch can continue
    (its conversation has n - k messages after a cut of its own), so a row's length and cut
    say nothing about its target; a row no other user can continue takes no part."""

    stream = "conversation"

    def __init__(self, encoder: ConversationEncoder, min_messages: int = 4):
        super().__init__()
        self.encoder = encoder
        self.min_messages = min_messages
        self.head = nn.Linear(encoder.norm.normalized_shape[0], 1)

    def corrupt(self, conv: dict, user: torch.Tensor, g: torch.Generator
                ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """conv: the conversation stream dict; user (B,) long, equal for rows of one user.
        Returns (new stream dict, split (B, T) long 0 none/1 before/2 after, target (B,)
        float 1 = real, used (B,) bool rows that take part)."""
        lengths = (~conv["padding_mask"]).sum(1)  # (B,)
        B, T = conv["padding_mask"].shape
        out = {k: v.clone() for k, v in conv.items()}
        split = torch.zeros(B, T, dtype=torch.long)
        target = torch.ones(B)
        used = torch.zeros(B, dtype=torch.bool)
        for b in torch.nonzero(lengths >= self.min_messages).flatten().tolist():
            n = int(lengths[b])
            others = user != user[b]  # (B,) rows that may donate
            # the longest continuation another user offers: a donor keeps >= 1 message before its cut
            longest = int(lengths[others].max()) - 1 if others.any() else 0
            lo = max(1, n - longest)  # smallest cut whose continuation (n - k items) is on offer
            if lo > n - 1:
                continue  # no cut could be faked: the row would always be real
            k = lo + int(torch.randint(0, n - lo, (1,), generator=g))  # keep [0, k), >= 1 on each side
            used[b] = True
            split[b, :k], split[b, k:n] = 1, 2
            if float(torch.rand(1, generator=g)) < 0.5:
                continue  # real
            m = n - k  # the continuation's length: the original's, so nothing but content changes
            donors = torch.nonzero(others & (lengths >= m + 1)).flatten()
            d = int(donors[torch.randint(0, len(donors), (1,), generator=g)])
            kd = 1 + int(torch.randint(0, int(lengths[d]) - m, (1,), generator=g))  # kd in [1, nd - m]
            for key in ("embedding", "sender"):  # a message is its vector and its author
                out[key][b, k:n] = conv[key][d, kd : kd + m]
            target[b] = 0.0
        for key in ("recency", "mention_first", "mention_last"):  # each would date the donor's messages
            out[key] = torch.zeros_like(out[key])
        return out, split, target, used

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch: a collated batch (features/dataset.py); uses its conversation stream and
        `user` (B,) long."""
        conv, split, target, used = self.corrupt({k: v.cpu() for k, v in batch[self.stream].items()},
                                                 batch["user"].cpu(), g)
        device = self.head.weight.device
        conv = {k: v.to(device) for k, v in conv.items()}
        cls, _ = self.encoder(conv, split=split.to(device), items=False)  # (B, D)
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


def rows_per_user(where: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) long (b, t) pairs in row-major order (`torch.nonzero`'s) -> the (B, R) item
    indices of each row (R = the most pairs of a row, at least 1; the rest filled with 0), the
    encoder's `items` argument, and the (N,) column of each pair in it: the states of the pairs
    are `states[where[:, 0], column]`."""
    counts = torch.bincount(where[:, 0], minlength=B)  # (B,)
    column = torch.arange(len(where)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # (N,)
    rows = torch.zeros(B, max(1, int(counts.max()) if len(where) else 1), dtype=torch.long)  # (B, R)
    rows[where[:, 0], column] = where[:, 1]
    return rows, column


def item_states(encoder: nn.Module, stream: dict, where: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The encoder's states of the items at `where` ((N, 2) (b, t) pairs in row-major order) of
    `stream` (a stream dict on the CPU), (N, D) on `device`: its last layer computes only those
    items and [CLS] (`rows_per_user`)."""
    rows, column = rows_per_user(where, stream["padding_mask"].shape[0])  # (B, R), (N,)
    _, items = encoder({k: v.to(device) for k, v in stream.items()}, items=rows.to(device))  # (B, R, D)
    return items[where[:, 0].to(device), column.to(device)]  # (N, D)


class MaskedFood(nn.Module):
    """Mask one food of some meals (never padding) and predict it over the food vocabulary,
    with the output tied to the encoder's food embedding."""

    stream = "food"

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

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch: a collated batch (features/dataset.py); uses its food stream."""
        food_c, where, target = self.corrupt({k: v.cpu() for k, v in batch[self.stream].items()}, g)
        device = self.head.bias.device
        h = item_states(self.encoder, food_c, where, device)  # (N, D)
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

    stream = "events"

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

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch: a collated batch (features/dataset.py); uses its event stream."""
        ev = batch[self.stream]
        ev_c, pick = self.corrupt({k: v.cpu() for k, v in ev.items()}, g)
        device = self.head.bias.device
        where = torch.nonzero(pick)  # (N, 2) (b, t), in the order of ev["type_id"][pick]
        h = item_states(self.encoder, ev_c, where, device)  # (N, D)
        target = ev["type_id"].to(device)[pick.to(device)]  # (N,)
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
        results = {s: obj(batch, g) for s, obj in self.objectives.items()}
        loss = sum(self.weights.get(s, 1.0) * r[0] for s, r in results.items())
        return loss, results


class FutureActivity(nn.Module):
    """The future-window objective (PinnerFormer's dense all-action loss, adapted): from the
    [CLS] states of the stream encoders, predict the user's own activity on each of the next
    `days` days after the window (multi-label BCE). Self-supervised: the targets come from the
    events after the window (`batch["future"]`, features/aggregates.py: future_activity), so
    every window of every training user takes part, labelled or not; days after the end of
    the data are -1 and masked out, never guessed. The encoders are the other objectives'
    (shared modules); the head is one linear layer over their concatenated states."""

    def __init__(self, encoders: dict[str, nn.Module], d_model: int, days: int):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = nn.Linear(d_model * len(encoders), days)

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch: a collated batch with `future` (B, days) float, -1 = unknown."""
        device = self.head.weight.device
        states = [enc({k: v.to(device) for k, v in batch[s].items()}, items=False)[0] for s, enc in self.encoders.items()]
        logits = self.head(torch.cat(states, dim=-1))  # (B, S*D) -> (B, days)
        target = batch["future"].to(device)
        known = target >= 0
        if not known.any():
            return logits.sum() * 0.0, {"n": 0}
        loss = F.binary_cross_entropy_with_logits(logits[known], target[known])
        return loss, {"n": int(known.sum()), "scores": torch.sigmoid(logits[known]).detach().cpu(),
                      "targets": target[known].cpu()}


def random_slices(stream: dict, splits: int, min_len: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """CoLES's augmentation (ptls `SampleSlices`): `splits` random contiguous sub-sequences of
    every row with at least `min_len` items, each of a length drawn uniformly from
    [min_len, n] and a uniform start. Positions are renumbered inside the slice (1 = its most
    recent item, as in a window); every other field is the item's own.

    Args: stream, a stream dict (B, T) with items oldest first and padding after;
    Returns: (slices, row): a stream dict of N = splits * (rows used) slices, padded to their
        longest, and row (N,) long, the batch row each slice came from.
    """
    lengths = (~stream["padding_mask"]).sum(1)  # (B,)
    rows = torch.nonzero(lengths >= min_len).flatten().repeat_interleave(splits)  # (N,)
    n = lengths[rows]  # (N,)
    size = min_len + (torch.rand(len(rows), generator=g) * (n - min_len + 1)).long()  # (N,) in [min_len, n]
    start = (torch.rand(len(rows), generator=g) * (n - size + 1)).long()  # (N,) in [0, n - size]
    T = max(1, int(size.max())) if len(rows) else 1
    step = torch.arange(T)  # (T,)
    valid = step[None, :] < size[:, None]  # (N, T)
    at = (start[:, None] + step[None, :]).clamp(max=stream["padding_mask"].shape[1] - 1)  # (N, T)
    out = {}
    for k, v in stream.items():
        if k == "padding_mask":
            continue
        x = v[rows[:, None], at]  # (N, T, ...)
        keep = valid.view(*valid.shape, *([1] * (x.ndim - 2)))
        out[k] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    out["position"] = torch.where(valid, size[:, None] - step[None, :], 0)  # (N, T), 1 = most recent
    out["padding_mask"] = ~valid
    return out, rows


class CoLES(nn.Module):
    """Contrastive learning of event sequences (Babaev et al. 2022; pytorch-lifestream's
    `CoLESModule`): random slices of one user's stream are positives, slices of the other
    users in the batch negatives. The [CLS] state of each slice is L2-normalised; the loss is
    ptls's default, a margin contrastive loss (positive pairs pulled to distance 0, each
    slice's `negatives` nearest negatives pushed beyond `margin`), averaged over pairs. One
    loss per stream encoder given; rows of one user (several windows in a batch) are one
    class. Held-out: how often a slice's nearest other slice is its own user's (chance:
    (splits - 1) / (N - 1))."""

    def __init__(self, encoders: dict[str, nn.Module], splits: int = 3, min_len: int = 4,
                 margin: float = 0.5, negatives: int = 5):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.splits, self.min_len, self.margin, self.negatives = splits, min_len, margin, negatives

    def pair_loss(self, z: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """z (N, D) normalised; label (N,). Returns (loss, nearest-is-positive count, N)."""
        # Squared distances of unit vectors from their dot products: smooth where slices
        # coincide (a row of exactly min_len items gives identical slices), unlike cdist's sqrt.
        z = z.float()  # under bf16 autocast the distances of near pairs would round to about 0.008
        with torch.autocast(z.device.type, enabled=False):
            d2 = (2.0 - 2.0 * z @ z.T).clamp_min(0.0)  # (N, N)
        same = label[:, None] == label[None, :]  # (N, N)
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        pos = same & ~eye
        neg_d2 = d2.masked_fill(same, float("inf"))  # (N, N)
        hard = neg_d2.topk(min(self.negatives, len(z)), dim=1, largest=False).values  # (N, k) nearest others
        hard = hard[hard.isfinite()]  # a row with fewer than k negatives has inf beyond them
        push = F.relu(self.margin - hard.clamp_min(1e-12).sqrt()).pow(2)
        loss = torch.cat([d2[pos], push]).mean()
        nearest = d2.detach().masked_fill(eye, float("inf")).argmin(1)  # (N,)
        return loss, int(same[torch.arange(len(z)), nearest].sum()), len(z)

    def forward(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch: a collated batch (features/dataset.py); uses `user` and the encoders' streams."""
        losses, hits, n, chance = [], 0, 0, []
        for s, enc in self.encoders.items():
            slices, rows = random_slices({k: v.cpu() for k, v in batch[s].items()}, self.splits, self.min_len, g)
            label = batch["user"].cpu()[rows]  # (N,)
            if len(label) < 2 or len(label.unique()) < 2:
                continue
            device = next(enc.parameters()).device
            cls, _ = enc({k: v.to(device) for k, v in slices.items()}, items=False)  # (N, D)
            loss, h, m = self.pair_loss(F.normalize(cls, dim=-1), label.to(device))
            losses.append(loss)
            hits, n = hits + h, n + m
            chance.append((self.splits - 1) / (m - 1) * m)
        if not losses:
            p = next(self.parameters())
            return p.sum() * 0.0, {"n": 0}
        return torch.stack(losses).mean(), {"n": n, "correct": hits, "chance": sum(chance)}


OBJECTIVES = {"conversation": ConversationNegativeSampling, "food": MaskedFood, "events": MaskedEvents}
FUTURE = "future"  # pretrain.objectives may name it beside the streams
COLES = "coles"  # likewise: CoLES on the streams of pretrain.coles_streams
