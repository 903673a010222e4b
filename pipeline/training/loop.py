"""Pieces shared by pretraining and training: optimizer, warm-up + cosine schedule, a data
order that can resume mid-epoch, atomic checkpoints of the whole training state, and the
DistributedDataParallel plumbing (one process per rank under `torchrun`).

Exact resume: the data order of epoch e is a permutation drawn from a generator seeded
with (seed, e); dropout draws from torch's global RNG (a step split over threads: from
generators seeded from it, `parallel_backward`), whose state is checkpointed with the
model, optimizer and scheduler. Restarting from a checkpoint at step k of epoch e replays
steps k.. of the same permutation with the same RNG state, so an interrupted run ends with
the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler
from transformers import get_cosine_schedule_with_warmup

from common.devices import resolve_device
from common.errors import UserError
from common.files import atomic_path
from models.dropout import masks_from


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, foreach: bool = True) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings (as in BERT / nanoGPT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one multi-tensor kernel per update term instead of a Python loop over ~100 small
    # parameters (torch picks the loop on CPU); the demo's steps run ~15% faster with it.
    # (foreach=False: the loop, as before issue 13; the training-speed benchmark's "before".)
    return torch.optim.AdamW(groups, lr=lr, foreach=foreach)


def ema_of(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s weights: after each step,
    `ema.update_parameters(model)` moves every averaged weight by (1 - decay) towards the
    model's (one multi-tensor update); the first update copies them."""
    if not 0.0 < decay < 1.0:
        raise UserError(f"train.ema_decay={decay}; use a decay in (0, 1), e.g. 0.999, or 0 for none")
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay))


def make_scheduler(optimizer, total_steps: int, warmup_frac: float):
    warmup = max(1, int(round(warmup_frac * total_steps)))
    return get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, warmup + 1))


class EpochOrder(Sampler[int]):
    """Indices of one epoch in a seeded order, this rank's share only, starting at a batch.

    rank r of w ranks takes positions r, r+w, ... of the permutation (disjoint shards, the
    same number of batches on every rank so DDP's collective calls line up)."""

    def __init__(self, n: int, seed: int, epoch: int, batch_size: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).numpy()
        per_rank = n // world
        self.order = order[rank : per_rank * world : world][start_batch * batch_size :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


class LengthBatches(Sampler[list[int]]):
    """Batches of examples of similar length, in a seeded order that can resume mid-epoch.

    A batch is padded to its own longest stream (`collate`), so a batch of short histories
    mixed with one long one pays for the long one in every row. As in the length-grouped
    samplers of BERT-style training: the epoch's seeded permutation is cut into windows of
    `window` batches, each window is sorted by `lengths` and cut into batches, then the
    batches are shuffled (seeded). Every example is used once per epoch; rank r of w takes
    batches r, r+w, ... (the same count on every rank, as DDP needs), from `start_batch` on.
    """

    def __init__(self, lengths: np.ndarray, seed: int, epoch: int, batch_size: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1, window: int = 50):
        n = len(lengths)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).numpy()
        lengths = np.asarray(lengths)
        span = batch_size * window
        # Batches go out in groups of `world` neighbours in length, one per rank at the same
        # step, so the ranks' steps take about as long (DDP waits for the slowest); with one
        # rank a group is one batch and this is a plain shuffle of the batches.
        groups, spare = [], []
        for lo in range(0, n, span):
            chunk = order[lo : lo + span]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # longest first
            cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            whole = len(cut) // world * world
            groups += [cut[i : i + world] for i in range(0, whole, world)]
            spare += cut[whole:]
        spare.sort(key=lambda b: -lengths[b].max())  # a window's odd batches, paired by length too
        whole = len(spare) // world * world
        groups += [spare[i : i + world] for i in range(0, whole, world)]
        shuffle = torch.randperm(len(groups), generator=g).numpy()
        batches = [b for i in shuffle for b in groups[i]] + spare[whole:]
        per_rank = len(batches) // world
        self.batches = [b.tolist() for b in batches[rank : per_rank * world : world]][start_batch:]

    @staticmethod
    def per_rank(n: int, batch_size: int, world: int = 1, window: int = 50) -> int:
        """Batches of a whole epoch on each rank, the same every epoch: every window but the
        last holds `window` full batches."""
        full, rest = divmod(n, batch_size * window)
        return (full * window + -(-rest // batch_size)) // world

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return -(-(n // world) // batch_size)


BATCHING = ("length", "random")


def by_length(dataset, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's share of `dataset` (positions rank, rank+w, ...), longest first: the order
    for prediction, where batches then pad little (outputs do not depend on the order)."""
    mine = np.arange(rank, len(dataset), world)
    return mine[np.argsort(-dataset.length_key()[mine], kind="stable")].tolist()


def epoch_sampler(batching: str, dataset, seed: int, epoch: int, batch_size: int, start_batch: int = 0,
                  rank: int = 0, world: int = 1) -> Sampler:
    """The data order of one epoch: `LengthBatches` by the dataset's `length_key` ("length"),
    or a plain seeded permutation (`EpochOrder`, "random")."""
    if batching == "length":
        return LengthBatches(dataset.length_key(), seed, epoch, batch_size, start_batch, rank, world)
    if batching == "random":
        return EpochOrder(len(dataset), seed, epoch, batch_size, start_batch, rank, world)
    raise UserError(f"batching={batching!r}; use one of {', '.join(BATCHING)}")


def epoch_batches(batching: str, dataset, batch_size: int, world: int = 1) -> int:
    """Batches per epoch on each rank (the same every epoch) under `epoch_sampler`."""
    if batching == "length":
        return LengthBatches.per_rank(len(dataset), batch_size, world)
    return batches_per_epoch(len(dataset), batch_size, world)


def loader(dataset, batch_size: int, collate, sampler=None, num_workers: int = 0, pin: bool = False,
           parts: int = 1) -> DataLoader:
    """A DataLoader over `dataset`; `sampler` yields indices (batched by `batch_size`) or, a
    `LengthBatches`, whole batches. parts > 1 (a FeatureDataset): each item is a list of that
    many batches, the batch's examples dealt out in turn (`parallel_backward`)."""
    if num_workers and torch.multiprocessing.get_start_method() == "fork" and hasattr(dataset, "preload"):
        dataset.preload()  # read once here; the forked workers share it
    # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's
    # global RNG, so re-creating one after a resume would shift every later dropout mask.
    if callable(getattr(dataset, "batch", None)):  # a FeatureDataset fetches a whole batch at once
        batches = sampler if isinstance(sampler, LengthBatches) else \
            BatchSampler(range(len(dataset)) if sampler is None else sampler, batch_size, drop_last=False)
        dataset, collate, batching = _Batches(dataset, list(batches), parts), _whole, {"batch_size": None}
    elif isinstance(sampler, LengthBatches):
        batching = {"batch_sampler": sampler}
    else:
        batching = {"batch_size": batch_size, "sampler": sampler, "shuffle": False}
    return DataLoader(
        dataset, **batching, collate_fn=collate,
        num_workers=num_workers, pin_memory=pin, persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )


class _Batches(torch.utils.data.Dataset):
    """Whole batches as the items of a DataLoader (batch_size=None): item i is
    `dataset.batch(batches[i])`, one vectorised fetch (features/dataset.py), or with parts > 1
    the list of `dataset.batch(batches[i][j::parts])`: dealt in turn, the parts of a batch cut
    from one length-sorted window are about equally long, so their threads finish together."""

    def __init__(self, dataset, batches: list[list[int]], parts: int = 1):
        self.dataset, self.batches, self.parts = dataset, batches, parts

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict | list[dict]:
        b = self.batches[i]
        if self.parts == 1:
            return self.dataset.batch(b)
        return [self.dataset.batch(b[j :: self.parts]) for j in range(min(self.parts, len(b)))]


def _whole(batch: dict) -> dict:
    return batch


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters, grad_clip: float,
                   scheduler=None) -> None:
    """One update, the same for training, pretraining and the benchmarks: backward, gradient
    clipping, the optimizer step, then the schedule's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    update(optimizer, parameters, grad_clip, scheduler)


def update(optimizer: torch.optim.Optimizer, parameters, grad_clip: float, scheduler=None) -> None:
    """The update once the gradients are in: clipping, the optimizer step, the schedule's step."""
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def step_parts(requested: int, model_config, device: torch.device, world: int) -> int:
    """How many threads a training step's batch is split over (`parallel_backward`): `requested`
    on CPU in one process with at least that many torch threads, else 1. DDP all-reduces once
    per backward, CUDA runs a batch in parallel anyway, and a process held to fewer threads (torch
    .set_num_threads) keeps to them; dropout must be FastDropout without attention dropout (torch's
    own kernels draw from the global generator, whose draws two threads would interleave
    unpredictably)."""
    if (requested <= 1 or device.type != "cpu" or world > 1 or torch.get_num_threads() < requested
            or not model_config.fast_dropout or model_config.attention_dropout > 0):
        return 1
    return requested


@contextmanager
def threads_per_part(parts: int) -> Iterator[None]:
    """torch's intra-op threads shared out among `parts` threads of `parallel_backward` (one
    each on 2 cores), restored afterwards (validation and prediction run one batch on all)."""
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // parts))
    try:
        yield
    finally:
        torch.set_num_threads(total)


def parallel_backward(forward, parts: list[dict], pool, generator: torch.Generator | None = None,
                      ) -> tuple[torch.Tensor, list]:
    """Forward and backward of each part of one batch on a thread of `pool`, their losses
    weighted by their share of the batch's examples: the gradients of the whole batch's mean
    loss (up to losses averaged over something else than examples, such as the auxiliary
    loss's known days or a pretext task's masked items), summed into .grad (autograd
    accumulates under a lock, and a sum of two is the same in either order).
    `forward(part, generator) -> (loss, extra)`; each part gets a generator of its own for its
    random corruptions (pretraining's objectives) and another for its dropout masks, seeded
    from `generator` (None: torch's global one) before the threads start, so a step is the same
    whichever thread runs first, and a resumed run's RNG state gives the same draws. Returns the
    batch's loss (detached) and each part's `extra`. On 2 CPU cores two threads of one intra-op
    thread each ran a demo step about 1.3x as fast as one batch on both (the small ops of these
    encoders leave a core idle much of the time; docs/benchmarks.md)."""
    n = [len(p["example"]) for p in parts]
    seeds = torch.randint(0, 2**62, (len(parts), 2), generator=generator).tolist()

    def run(part: dict, weight: float, seed: list[int]) -> tuple[torch.Tensor, Any]:
        with masks_from(torch.Generator().manual_seed(seed[0])):
            loss, extra = forward(part, torch.Generator().manual_seed(seed[1]))
        (loss * weight).backward()
        return loss.detach() * weight, extra

    out = list(pool.map(run, parts, [k / sum(n) for k in n], seeds))
    return sum(loss for loss, _ in out), [extra for _, extra in out]


def split_step(forward, parts: list[dict], pool, optimizer: torch.optim.Optimizer, parameters, grad_clip: float,
               scheduler=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list]:
    """`optimizer_step` for a batch split over threads: `parallel_backward`, then `update`."""
    optimizer.zero_grad(set_to_none=True)
    out = parallel_backward(forward, parts, pool, generator)
    update(optimizer, parameters, grad_clip, scheduler)
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def rng_states(d: Dist) -> list[dict]:
    """Each rank's RNG state, in rank order: the CPU generator's and, with CUDA, its current
    device's. Every rank must call it (a collective under torchrun): a checkpoint keeps them
    all, so each rank resumes from its own."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: resumable on another count of GPUs
    if not d.enabled:
        return [mine]
    out: list = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def save_state(path: Path, rng: list[dict] | None = None, **state) -> None:
    """Atomically write a checkpoint (tensors, numbers, strings, dicts, lists only, so it
    loads with `torch.load(weights_only=True)`), with `rng`, every rank's RNG state
    (`rng_states`; default this process's)."""
    state["rng"] = rng if rng is not None else rng_states(Dist())
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(path: Path, fingerprint: str, state: dict, rank: int = 0, **parts) -> tuple[dict, bool]:
    """Continue a run from its checkpoint: when `path` holds this run's state (the same
    fingerprint), load each of `parts` (model, optimizer, scheduler: name -> object with
    `load_state_dict`), restore rank `rank`'s RNG state, and return the saved values of
    `state`'s keys and True; otherwise return `state` and False. Another run's checkpoint is
    left alone: loading it would also restore its RNG state."""
    if not path.exists():
        return state, False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        return state, False
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    if "rng" in saved:
        rng = saved["rng"][rank if rank < len(saved["rng"]) else 0]
    else:  # written before 2026-12-05: the CPU state and every GPU's (`cuda_rng`), one process
        rng = {"torch": saved["torch_rng"]}
        if torch.cuda.is_available() and torch.cuda.current_device() < len(saved.get("cuda_rng", [])):
            rng["cuda"] = saved["cuda_rng"][torch.cuda.current_device()]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return {k: saved[k] for k in state}, True


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and _wants_cuda(device_name)
        if use_cuda:  # NCCL's collectives run on the current device: one GPU per rank
            torch.cuda.set_device(local_rank)
        # Rank 0 alone evaluates and logs the model at the end while the others wait at the
        # last barrier: NCCL's default 10 minutes could abort them on a large validation set.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


@contextmanager
def distributed(device_name: str) -> Iterator[Dist]:
    """`init_distributed` for the length of a stage, then leave the process group cleanly.

    Ranks wait for each other at the end (rank 0 still writes checkpoints and logs after the
    last collective), then destroy the group: a rank whose interpreter exits with the gloo
    group still alive can abort ("terminate called without an active exception"). After an
    error there is no barrier, since the failed rank would never reach it; torchrun stops
    the others."""
    d = init_distributed(device_name)
    try:
        yield d
        if d.enabled:
            dist.barrier()
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def reseed_rank(d: Dist, seed: int) -> None:
    """After DDP has broadcast rank 0's weights: every other rank draws its own dropout masks
    (`seed` + its rank); rank 0 and a single process keep their stream as it is."""
    if d.rank:
        torch.manual_seed(seed + d.rank)


def _wants_cuda(device_name: str) -> bool:
    return device_name == "auto" or device_name.startswith("cuda")


def rank_device(d: Dist, device_name: str) -> torch.device:
    """This rank's device: under torchrun with device auto or cuda (cuda:N included), GPU
    `LOCAL_RANK` of its machine (every rank on one GPU would share it); otherwise
    `resolve_device`. A numbered GPU becomes the current device: the CUDA random state a
    checkpoint keeps (`rng_states`) is the current device's, and `cuda:1` in one process drew
    from GPU 1 while cuda:0's state was saved."""
    if d.enabled and _wants_cuda(device_name) and torch.cuda.is_available():
        device = torch.device("cuda", d.local_rank)
    else:
        device = resolve_device(device_name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def gather_arrays(d: Dist, *arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array over ranks (validation predictions); a no-op on one process."""
    if not d.enabled:
        return list(arrays)
    out = []
    for a in arrays:
        parts: list = [None] * d.world
        dist.all_gather_object(parts, a)
        out.append(np.concatenate(parts))
    return out


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's decision (e.g. early stopping) for every rank."""
    if not d.enabled:
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)  # gloo and NCCL alike (a CPU tensor fails on NCCL)
    return bool(box[0])


@torch.inference_mode()
def predict(model: nn.Module, data: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example ids, labels, p_engaged) for every example of a loader, in eval mode."""
    from common.devices import autocast

    was_training = model.training
    model.eval()
    ids, ys, ps = [], [], []
    for batch in data:
        batch = to_device(batch, device)
        with autocast(device):
            logits, _ = model(batch)
        ids.append(batch["example"].cpu().numpy())
        ys.append(batch["label"].cpu().numpy())
        ps.append(torch.sigmoid(logits.float()).cpu().numpy())
    model.train(was_training)
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(ids), np.concatenate(ys), np.concatenate(ps)


def prefetched(iterable):
    """The items of `iterable`, the next one fetched on a thread while the caller works on this
    one: a training step no longer waits for its batch to be gathered (a few ms of numpy each).
    Nothing random happens in a fetch, so steps and resumes are unchanged. On the demo, one
    epoch of `python -m pipeline train`, seven alternating pairs: median +5.9% examples/s
    (docs/benchmarks.md)."""
    it = iter(iterable)
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        fut = pool.submit(next, it, None)
        while (item := fut.result()) is not None:
            fut = pool.submit(next, it, None)
            yield item
