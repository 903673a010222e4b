"""Sequence reversal (the tutorial task and report the project started from; docs/benchmarks.md) solved with our `SequenceEncoder`.

    python -m benchmarks.reverse [--lengths 100 200 500] [--categories 10] [--quick]

Task: N random tokens in [0, C) -> the same tokens reversed; accuracy per token on 1,000
held-out sequences. The seed report (1 layer, 1 head, 20 epochs of 50k sequences) got 100%
at length 100, 85.25% at 200 and 10.05% (chance) at 500.

Position handling — the choice that makes long lengths easy:
* sinusoids of the position *relative to the sequence centre*, c = i - (N-1)/2. Reversal maps
  c to -c, which flips the sign of every sin feature and keeps every cos feature, so the
  attention a query needs (key at -c) is one fixed sign-flip of Wq'Wk, the same at every
  length. With positions from the start the map is a rotation that depends on N.
* because that solution does not depend on N, each length is first trained `warm_steps` at a
  short length (`warm_length`) and then `steps` at its own length. Trained at 500 from
  scratch, 1-layer models sit at chance for hundreds of steps (the report's 10%): with
  uniform attention over 500 keys the signal towards the right key is 1/500 of the batch's.
[CLS] is prepended by SequenceEncoder as everywhere; predictions ignore it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models.config import ModelConfig
from models.sequence import SequenceEncoder

# The reference report's Table 1 (docs/benchmarks.md) (10 categories, 1 layer, 1 head): validation accuracy per length.
REPORT_ACCURACY = {100: 1.0, 200: 0.8525, 500: 0.1005, 1000: 0.0996}


class ReversalDataset(Dataset):
    """`size` random sequences of `seq_len` tokens in [0, num_categories); the label is the
    sequence flipped (the tutorial's ReverseDataset, with a seed)."""

    def __init__(self, num_categories: int, seq_len: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(num_categories, (size, seq_len), generator=g)  # (N, L)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[idx]  # (L,)
        return x, x.flip(0)  # (L,), (L,)


def random_batch(
    batch_size: int, seq_len: int, num_categories: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh training batch: x (B, L) long and its reversal (B, L) long."""
    x = torch.randint(num_categories, (batch_size, seq_len), generator=generator)  # (B, L)
    return x, x.flip(1)  # (B, L), (B, L)


def centered_sinusoids(seq_len: int, dim: int) -> torch.Tensor:
    """(L, D) sin/cos features (Vaswani et al. 2017) of c = i - (L-1)/2 (see module doc)."""
    c = torch.arange(seq_len, dtype=torch.float32) - (seq_len - 1) / 2  # (L,)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    angle = c[:, None] * freq[None, :]  # (L, D/2)
    pe = torch.zeros(seq_len, dim)  # (L, D)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe


class ReversalModel(nn.Module):
    """Token embedding + centred sinusoids -> SequenceEncoder -> per-token classifier."""

    def __init__(self, config: ModelConfig, num_categories: int):
        super().__init__()
        self.config = config
        self.num_categories = num_categories
        self.token_embedding = nn.Embedding(num_categories, config.d_model)
        self.encoder = SequenceEncoder(config)
        self.head = nn.Linear(config.d_model, num_categories)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pe = centered_sinusoids(x.shape[1], self.config.d_model).to(x.device)  # (L, D)
        return self.token_embedding(x) + pe  # (B, L, D)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L) long tokens, no padding; targets: optional (B, L) long.
        Returns logits (B, L, C) float32 (the [CLS] state is not used) and the mean
        cross-entropy (or None)."""
        _, items = self.encoder(self.embed(x))  # (B, L, D)
        logits = self.head(items)  # (B, L, C)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*L, C) vs (B*L,)
        return logits, loss

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B, heads, 1+L, 1+L) tensor per layer, [CLS] at index 0."""
        return self.encoder.attention_maps(self.embed(x))


@dataclasses.dataclass
class ReversalSettings:
    seq_len: int
    num_categories: int = 10
    d_model: int = 64
    n_heads: int = 1
    n_layers: int = 1
    batch_size: int = 32
    steps: int = 200  # at seq_len
    lr: float = 2e-3
    warm_length: int = 64  # first train at this length (skipped when seq_len <= it)
    warm_steps: int = 300
    warm_batch_size: int = 64
    warm_lr: float = 3e-3
    eval_size: int = 1000
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            d_ff=2 * self.d_model,
            dropout=0.0,
        )


@dataclasses.dataclass
class ReversalResult:
    settings: ReversalSettings
    accuracy: float
    steps: int
    wall_s: float
    model: ReversalModel


def _train_phase(
    model: ReversalModel,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    g: torch.Generator,
    log: Callable[[str], None] | None,
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        x, y = random_batch(batch_size, seq_len, model.num_categories, g)  # (B, L), (B, L)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"    length {seq_len:4d} step {step:4d}/{steps} loss {loss.item():.4f}")


@torch.no_grad()
def evaluate(model: ReversalModel, data: ReversalDataset, batch_size: int = 250) -> float:
    """Per-token accuracy on `data`."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.data[i : i + batch_size]  # (b, L)
        logits, _ = model(x)  # (b, L, C)
        correct += int((logits.argmax(-1) == x.flip(1)).sum())
    return correct / data.data.numel()


def train_reversal(
    settings: ReversalSettings,
    log: Callable[[str], None] | None = None,
    start_from: ReversalModel | None = None,
) -> ReversalResult:
    """Train on fresh random batches and measure accuracy on held-out sequences.

    Without `start_from`, a fresh model is first trained at `warm_length` when `seq_len` is
    longer (see the module doc); with it, a copy of that model is trained at `seq_len` only
    (`main` warms up once and shares the result between lengths)."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed + settings.seq_len)
    start = time.perf_counter()
    steps = settings.steps
    if start_from is not None:
        model = copy.deepcopy(start_from)
    else:
        model = ReversalModel(settings.model_config(), settings.num_categories)
        if settings.seq_len > settings.warm_length and settings.warm_steps > 0:
            _train_phase(model, settings.warm_length, settings.warm_steps,
                         settings.warm_batch_size, settings.warm_lr, g, log)  # fmt: skip
            steps += settings.warm_steps
    _train_phase(model, settings.seq_len, settings.steps, settings.batch_size, settings.lr, g, log)
    held_out = ReversalDataset(
        settings.num_categories, settings.seq_len, settings.eval_size, seed=settings.seed + 10_000
    )
    acc = evaluate(model, held_out)
    return ReversalResult(settings, acc, steps, time.perf_counter() - start, model)


def warm_up(settings: ReversalSettings, log: Callable[[str], None] | None = None) -> ReversalResult:
    """The short-length phase alone: `warm_steps` at `warm_length`."""
    short = dataclasses.replace(
        settings,
        seq_len=settings.warm_length,
        steps=settings.warm_steps,
        batch_size=settings.warm_batch_size,
        lr=settings.warm_lr,
    )
    return train_reversal(short, log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.reverse", description=__doc__.split("\n")[0]
    )
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--categories", type=int, default=10)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="steps at each target length")
    p.add_argument("--warm-steps", type=int, default=None, help="steps at the warm-up length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="lengths 16 and 100, a smaller budget")
    p.add_argument("--verbose", action="store_true", help="print the loss every 100 steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([16, 100] if args.quick else [100, 200, 500])
    base = ReversalSettings(
        seq_len=0,
        num_categories=args.categories,
        n_layers=args.layers,
        n_heads=args.heads,
        seed=args.seed,
    )
    if args.quick:
        base = dataclasses.replace(base, warm_steps=200, steps=100, eval_size=500)
    if args.steps is not None:
        base = dataclasses.replace(base, steps=args.steps)
    if args.warm_steps is not None:
        base = dataclasses.replace(base, warm_steps=args.warm_steps)
    log = (lambda m: print(m, flush=True)) if args.verbose else None
    b = base
    print(
        f"sequence reversal, {b.num_categories} categories, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)\n"
        f"model: SequenceEncoder d_model {b.d_model}, {b.n_layers} layer(s), {b.n_heads} "
        f"head(s), d_ff {2 * b.d_model}, dropout 0, centred sinusoid positions, [CLS] unused\n"
        f"training: fresh random batches, Adam + one-cycle, clip 1.0; held-out "
        f"{b.eval_size} sequences per length",
        flush=True,
    )
    warm = None
    if any(n > b.warm_length for n in lengths) and b.warm_steps > 0:
        print(f"warm-up: {b.warm_steps} steps at length {b.warm_length} (batch "
              f"{b.warm_batch_size}, lr {b.warm_lr:g}), shared by every length", flush=True)  # fmt: skip
        warm = warm_up(b, log)
        print(f"  -> accuracy at {b.warm_length}: {100 * warm.accuracy:.2f}%, "
              f"{warm.wall_s:.0f}s", flush=True)  # fmt: skip
    rows = []
    for n in lengths:
        s = dataclasses.replace(b, seq_len=n)
        start = warm.model if warm is not None else None
        steps = f"{b.warm_steps}+{s.steps}" if start is not None else str(s.steps)
        print(f"length {n}: {steps} steps (batch {s.batch_size}, lr {s.lr:g})", flush=True)
        r = train_reversal(s, log, start_from=start)
        ref = REPORT_ACCURACY.get(n) if b.num_categories == 10 else None
        ref_txt = f"{100 * ref:.2f}%" if ref is not None else "-"
        wall = f"{r.wall_s:.0f}s" + (" + warm-up" if start is not None else "")
        print(f"  -> accuracy {100 * r.accuracy:.2f}% (report: {ref_txt}), {wall}", flush=True)
        rows.append((n, ref_txt, f"{100 * r.accuracy:.2f}%", steps, wall))
    if warm is not None:
        rows.append((f"{b.warm_length}*", "-", f"{100 * warm.accuracy:.2f}%",
                     str(b.warm_steps), f"{warm.wall_s:.0f}s"))  # fmt: skip
    print(f"\n{'length':>6} | {'report (1L/1H)':>14} | {'ours':>8} | {'steps':>8} | wall")
    for n, ref_txt, ours, steps, wall in rows:
        print(f"{n!s:>6} | {ref_txt:>14} | {ours:>8} | {steps:>8} | {wall}")
    if warm is not None:
        print(f"* the shared warm-up at length {b.warm_length}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
