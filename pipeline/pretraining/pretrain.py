"""`make pretrain`: pretrain the stream encoders on unlabelled sequences of training users,
measure every objective on held-out (validation) users each epoch beside its baseline, and
save one checkpoint per encoder for `make train` (docs/design.md §6)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from common import stamps
from common.devices import autocast
from common.errors import UserError
from features.dataset import FeatureDataset, collate, model_config_for, streams_with_items
from features.store import build_id, feature_files, read_meta
from models.checkpoint import save_encoder
from models.encoders import ENCODERS
from pipeline import tracking
from pipeline.config import Config, save_config, to_dict
from pipeline.paths import Paths
from pipeline.pretraining.objectives import (
    COLES,
    FUTURE,
    OBJECTIVES,
    CoLES,
    FutureActivity,
    JointObjective,
)
from pipeline.training import loop

log = logging.getLogger(__name__)
LAST, DONE = "last.pt", "done.json"
# The held-out metric of each objective, as the progress bar names it
HELD_OUT = {"heldout_nsp_accuracy": "val_nsp_acc", "heldout_food_top10": "val_food_top10",
            "heldout_event_top1": "val_event_top1", "heldout_future_auc": "val_future_auc",
            "heldout_coles_top1": "val_coles_top1"}


@dataclass
class PretrainResult:
    run_id: str | None
    directory: Path
    checkpoints: dict[str, Path]
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str = ""  # of the run that wrote the encoders (done.json)
    skipped: bool = False


def latest_windows(data: FeatureDataset, idx: np.ndarray, per_user: int) -> np.ndarray:
    """The `per_user` latest examples of each user among `idx`: they see the most history."""
    users = data.user_key[idx]
    as_of = data.examples["as_of"][idx]
    order = np.lexsort((-as_of, users))
    users_sorted = users[order]
    first = np.r_[True, users_sorted[1:] != users_sorted[:-1]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    return np.sort(idx[order[rank < per_user]])


def run_fingerprint(cfg: Config, files: list[Path], world: int) -> str:
    """Identity of a pretraining run (done.json is reused and last.pt resumed only when it
    matches): the pretrain and model configs, the feature files, and the number of ranks,
    since batch_size is per rank and the data order is sharded over ranks."""
    d = to_dict(cfg)
    return stamps.fingerprint(d["pretrain"], d["model"], build_id(files), {"world_size": world})


def pretrain(cfg: Config) -> PretrainResult:
    with loop.distributed(cfg.train.device) as d:
        return _pretrain(cfg, d)


def _pretrain(cfg: Config, d: loop.Dist) -> PretrainResult:
    pc = cfg.pretrain
    device = loop.rank_device(d, cfg.train.device)
    files = feature_files(Paths.of(cfg).features)
    meta = read_meta(files[0])
    streams = [s for s in pc.objectives if s in OBJECTIVES]
    unknown = set(pc.objectives) - set(OBJECTIVES) - {FUTURE, COLES}
    if unknown:
        raise UserError(f"pretrain.objectives has {sorted(unknown)}; choose from {[*OBJECTIVES, FUTURE, COLES]}")
    # The future objective needs the days after each window in the event log: with supplied
    # labels (data.labels) the log may stop where the label's window starts (KDD Cup).
    # (model_config_for resolves future_days=-1 to the label's horizon, or to 0 with supplied labels.)
    sized = model_config_for(replace(cfg.model, future_days=-1), meta)
    days = sized.future_days if FUTURE in pc.objectives else 0
    if FUTURE in pc.objectives and not days and d.main:
        print("pretrain: labels are supplied (data.labels), so the log need not show the days after a window; "
              "skipping the future objective")
    mcfg = replace(sized, aggregates=False, future_days=days)  # encoders only
    out = Paths.of(cfg).pretrain
    data = FeatureDataset(files, mcfg, targets=True)
    kept = streams_with_items(data.examples, streams)
    empty, streams = [s for s in streams if s not in kept], kept
    if empty and d.main:
        print(f"pretrain: no {', '.join(empty)} items in this data; skipping those objectives")
    if not streams:
        raise UserError("pretrain: no objective has data; set pretrain.objectives")
    fingerprint = run_fingerprint(cfg, files, d.world)
    checkpoints = {s: out / f"{s}.pt" for s in streams}
    if (info := stamps.is_current(out / DONE, fingerprint)) is not None:
        if d.main:
            print(f"pretrain: encoders in {out} are up to date; reusing them")
        return PretrainResult(info["run_id"], out, checkpoints, info["metrics"], fingerprint, skipped=True)

    train_set = data.subset(latest_windows(data, data.select(["train"], labelled=False), pc.max_examples_per_user))
    held_out = data.subset(latest_windows(data, data.select(["val"], labelled=False), 1))
    loop.seed_everything(pc.seed)
    options = {"conversation": {"min_messages": pc.min_messages}, "events": {"mask_prob": pc.mask_prob_events}}
    parts = {s: OBJECTIVES[s](ENCODERS[s](mcfg), **options.get(s, {})) for s in streams}
    if days:
        parts[FUTURE] = FutureActivity({s: parts[s].encoder for s in streams}, mcfg.d_model, days)
    if COLES in pc.objectives:
        # CoLES rides on the encoders the streams' own objectives train (shared modules)
        coles = [s for s in pc.coles_streams if s in streams]
        if coles:
            parts[COLES] = CoLES({s: parts[s].encoder for s in coles}, pc.coles_splits, pc.coles_min_len)
        elif d.main:
            print(f"pretrain: none of pretrain.coles_streams {pc.coles_streams} is pretrained here; skipping CoLES")
    joint = JointObjective(parts, {s: float(pc.weights.get(s, 1.0)) for s in parts}).to(device)
    objectives = joint.objectives
    net = torch.nn.parallel.DistributedDataParallel(joint, find_unused_parameters=True) if d.enabled else joint
    loop.reseed_rank(d, pc.seed)  # each rank its own dropout masks; the weights are rank 0's
    optimizer = loop.make_optimizer(objectives, pc.lr, pc.weight_decay)
    per_epoch = loop.epoch_batches(pc.batching, train_set, pc.batch_size, d.world)
    scheduler = loop.make_scheduler(optimizer, pc.epochs * per_epoch, pc.warmup_frac)
    n_parts = loop.step_parts(pc.step_threads, mcfg, device, d.world)
    pool = ThreadPoolExecutor(n_parts, thread_name_prefix="pretrain-step") if n_parts > 1 else None

    def forward(part: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:  # a batch, or one part
        with autocast(device):
            return net(part, generator)

    state = {"epoch": 0, "batch": 0, "run_id": None, "fingerprint": fingerprint, "metrics": {}}
    last = out / LAST
    state, resumed = loop.resume(last, fingerprint, state, d.rank, objectives=objectives, optimizer=optimizer,
                                 scheduler=scheduler)
    if resumed and d.main:
        print(f"pretrain: resuming from {last} at epoch {state['epoch'] + 1}")
    out.mkdir(parents=True, exist_ok=True)
    if d.main:
        save_config(cfg, out)
    data_input = {"path": str(files[0]), "digest": meta.source_fingerprint}
    with tracking.stage_run(cfg, "pretrain", "pretrain-" + "+".join(parts), {"kind": "pretrain"},
                            resume_run_id=state["run_id"], data=data_input) as run_id:
        state["run_id"] = run_id
        while state["epoch"] < pc.epochs:
            epoch = state["epoch"]
            g = torch.Generator().manual_seed(pc.seed * 7919 + epoch * 131 + state["batch"] + d.rank * 1_000_003)
            sampler = loop.epoch_sampler(pc.batching, train_set, pc.seed, epoch, pc.batch_size, state["batch"], d.rank,
                                         d.world)
            batches = loop.prefetched(loop.loader(train_set, pc.batch_size, collate, sampler, pc.num_workers,
                                                  pin=device.type == "cuda", parts=n_parts))
            bar = tqdm(batches, total=per_epoch,
                       initial=state["batch"], desc=f"pretrain {epoch + 1}/{pc.epochs}", disable=not d.main, leave=False)
            running = {s: [] for s in parts}
            counts = {s: np.zeros(objectives[s].vocab, np.int64) for s in streams if s != "conversation"}
            objectives.train()
            shown = {name: f"{state['metrics'][k]:.3f}" for k, name in HELD_OUT.items() if k in state["metrics"]}
            seen, started = 0, time.perf_counter()
            with loop.threads_per_part(n_parts):  # held-out evaluation below runs on all of torch's threads
                for batch in bar:
                    if n_parts > 1:  # the batch's parts forward and backward on threads of their own
                        _, split = loop.split_step(forward, batch, pool, optimizer, objectives.parameters(),
                                                   pc.grad_clip, scheduler, g)
                    else:
                        batch = [loop.to_device(batch, device)]
                        loss, results = forward(batch[0], g)
                        loop.optimizer_step(loss, optimizer, objectives.parameters(), pc.grad_clip, scheduler)
                        split = [results]
                    size = [len(b["example"]) for b in batch]
                    share = [k / sum(size) for k in size]
                    for s in parts:
                        running[s].append(sum(w * r[s][0].item() for w, r in zip(share, split)))
                        for r in split:
                            if s in counts and r[s][1]["n"]:
                                counts[s] += np.bincount(r[s][1]["targets"].numpy(), minlength=len(counts[s]))
                    state["batch"] += 1
                    seen += sum(size)
                    bar.set_postfix({s: f"{np.mean(running[s][-50:]):.3f}" for s in parts} | shown)
            metrics = {f"train_loss_{s}": float(np.mean(v)) for s, v in running.items() if v}
            # the steps' throughput (loading included, evaluation not), all ranks; logged, not kept
            tracking.log_metrics({"epoch_windows_per_s": seen * d.world / max(time.perf_counter() - started, 1e-9)},
                                 step=epoch)
            metrics |= evaluate_objectives(objectives, held_out, pc.batch_size, counts, pc.seed)
            metrics = {k: float(v) for k, v in metrics.items()}
            tracking.log_metrics(metrics, step=epoch)
            state["metrics"] = metrics
            if d.main:
                tqdm.write(f"pretrain epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                for s in streams:
                    save_encoder(objectives[s].encoder, mcfg, checkpoints[s], meta={"epoch": epoch, **metrics})
            state["epoch"], state["batch"] = epoch + 1, 0
            rng = loop.rng_states(d)  # every rank: a collective under torchrun
            if d.main:
                loop.save_state(last, rng, objectives=objectives.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), **state)
        if pool is not None:
            pool.shutdown()
        if d.main:
            if run_id:
                tracking.log_artifacts(list(checkpoints.values()), "encoders")
            stamps.mark_done(out / DONE, fingerprint, run_id=run_id, metrics=state["metrics"])
            print_report(state["metrics"], out)
    return PretrainResult(run_id, out, checkpoints, state["metrics"], fingerprint)


@torch.no_grad()
def evaluate_objectives(objectives, data: FeatureDataset, batch_size: int, train_counts: dict, seed: int) -> dict:
    """Each objective on held-out users with a fixed corruption seed, beside its baseline:
    chance for negative sampling and CoLES's retrieval, the most frequent training targets for
    masked food/events."""
    objectives.eval()
    # A generator per objective, seeded by its name: an objective's held-out corruptions do not
    # depend on which other objectives run beside it, so its figures compare across runs.
    gens = {s: torch.Generator().manual_seed(seed + 1 + int(stamps.fingerprint(s), 16) % 100_003) for s in objectives}
    agg: dict = {s: {"n": 0, "correct": 0, "top1": 0, "top10": 0, "chance": 0.0, "scores": [], "targets": []}
                 for s in objectives}
    for batch in loop.loader(data, batch_size, collate):
        for s, obj in objectives.items():
            loss, st = obj(batch, gens[s])
            if not st["n"]:
                continue
            a = agg[s]
            a["n"] += st["n"]
            for k in ("correct", "top1", "top10", "chance"):
                a[k] += st.get(k, 0)
            if "targets" in st:
                a["targets"].append(st["targets"].numpy())
            if "scores" in st:
                a["scores"].append(st["scores"].numpy())
    objectives.train()
    out = {}
    for s, a in agg.items():
        if not a["n"]:
            continue
        if s == COLES:  # is a slice's nearest other slice its own user's?
            out["heldout_coles_top1"] = a["correct"] / a["n"]
            out["baseline_coles_top1"] = a["chance"] / a["n"]
            continue
        targets = np.concatenate(a["targets"])
        if s == FUTURE:  # every known (window, day); chance is 0.5
            scores = np.concatenate(a["scores"])
            out["heldout_future_auc"] = roc_auc_score(targets, scores) if len(np.unique(targets)) > 1 else float("nan")
            out["baseline_future_auc"] = 0.5
        elif s == "conversation":
            scores = np.concatenate(a["scores"])
            out["heldout_nsp_accuracy"] = a["correct"] / a["n"]
            out["heldout_nsp_auc"] = roc_auc_score(targets, scores) if len(np.unique(targets)) > 1 else float("nan")
            out["baseline_nsp_accuracy"] = max(targets.mean(), 1 - targets.mean())
        else:
            popular = np.argsort(-train_counts[s], kind="stable")
            name = "food" if s == "food" else "event"
            out[f"heldout_{name}_top1"] = a["top1"] / a["n"]
            out[f"baseline_{name}_top1"] = float(np.isin(targets, popular[:1]).mean())
            if s == "food":
                out["heldout_food_top10"] = a["top10"] / a["n"]
                out["baseline_food_top10"] = float(np.isin(targets, popular[:10]).mean())
    return out


def print_report(m: dict, out: Path) -> None:
    rows = [("negative sampling: accuracy", "heldout_nsp_accuracy", "baseline_nsp_accuracy"),
            ("masked food: top-1", "heldout_food_top1", "baseline_food_top1"),
            ("masked food: top-10", "heldout_food_top10", "baseline_food_top10"),
            ("masked events: top-1", "heldout_event_top1", "baseline_event_top1"),
            ("future activity: ROC-AUC", "heldout_future_auc", "baseline_future_auc"),
            ("CoLES: nearest slice same user", "heldout_coles_top1", "baseline_coles_top1")]
    print(f"pretrain: encoders saved to {out}\n  {'objective (held-out users)':<32}{'model':>8}{'baseline':>10}")
    for label, k, b in rows:
        if k in m:
            print(f"  {label:<32}{m[k]:>8.3f}{m[b]:>10.3f}")
