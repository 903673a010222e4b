"""`make train`: fine-tune the engagement model from pretrained encoders (or from scratch),
AdamW + warm-up/cosine, gradient clipping, early stopping on validation ROC-AUC, the best
checkpoint kept, exact resume after a kill, DDP under torchrun (docs/design.md §7, §11)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from common import stamps
from common.devices import autocast
from common.errors import UserError
from features.dataset import FeatureDataset, collate, model_config_for, streams_with_items
from features.store import SPLITS, build_id, feature_files, read_meta
from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.engagement import EngagementModel
from pipeline import serving, tracking
from pipeline.config import Config, save_config, to_dict
from pipeline.paths import Paths
from pipeline.training import calibration, distill, loop

log = logging.getLogger(__name__)
LAST, BEST, DONE, PREDICTIONS = "last.pt", "best.pt", "done.json", "predictions.parquet"


@dataclass
class TrainResult:
    run_id: str | None
    run_dir: Path
    checkpoint: Path
    best_epoch: int
    val_roc_auc: float
    skipped: bool = False


def run_name(cfg: Config) -> str:
    if cfg.train.run_name:
        return cfg.train.run_name
    streams = "all" if len(cfg.model.streams) == 3 else "+".join(cfg.model.streams)
    frozen = "-frozen" if cfg.train.freeze_encoders else ""
    hybrid = "+aggregates" if cfg.model.aggregates else ""
    return f"{cfg.train.init}{frozen}-{round(cfg.train.label_fraction * 100)}pct-{streams}{hybrid}-{cfg.model.pooling}"


def _fingerprint(cfg: Config, files: list[Path], world: int) -> str:
    """Identity of a training run: its config (minus bookkeeping), its feature build and the
    number of DDP ranks (train.batch_size is per rank: another world size is another run)."""
    d = to_dict(cfg)
    d["train"].pop("checkpoint_every_steps", None)
    d["train"].pop("num_workers", None)
    d["train"].pop("eval_batch_size", None)
    return stamps.fingerprint(d, build_id(files), world)


def build_model(cfg: Config, mcfg: ModelConfig, device: torch.device) -> EngagementModel:
    model = EngagementModel(mcfg)
    if cfg.train.init == "pretrained":
        pre = Paths.of(cfg).pretrain
        for stream in model.streams:
            ckpt = pre / f"{stream}.pt"
            if not ckpt.exists():
                raise UserError(
                    f"{ckpt}: no pretrained {stream} encoder; run `make pretrain CONFIG=...` first "
                    "or train from scratch with train.init=scratch"
                )
            model.load_encoder(stream, ckpt, freeze=cfg.train.freeze_encoders)
    elif cfg.train.init != "scratch":
        raise UserError(f"train.init={cfg.train.init!r}; use pretrained or scratch")
    return model.to(device)


def train(cfg: Config) -> TrainResult:
    with loop.distributed(cfg.train.device) as d:
        return _train(cfg, d)


def _train(cfg: Config, d: loop.Dist) -> TrainResult:
    tc = cfg.train
    device = loop.rank_device(d, tc.device)
    files = feature_files(Paths.of(cfg).features)
    name = run_name(cfg)
    run_dir = Paths.of(cfg).runs / name
    fingerprint = _fingerprint(cfg, files, d.world)
    if (info := stamps.is_current(run_dir / DONE, fingerprint)) is not None:
        if d.main:
            print(f"train: {name} is already trained on these features (val ROC-AUC {info['val_roc_auc']:.4f}); reusing {run_dir}")
        return TrainResult(info["run_id"], run_dir, run_dir / BEST, info["best_epoch"], info["val_roc_auc"], skipped=True)

    if tc.freeze_epochs and (tc.freeze_encoders or d.enabled):
        raise UserError(f"train.freeze_epochs={tc.freeze_epochs} needs encoders that train afterwards "
                        "(train.freeze_encoders=false) and one process (DDP fixes which parameters train)")
    meta = read_meta(files[0])
    mcfg = model_config_for(cfg.model, meta)
    data = FeatureDataset(files, mcfg, targets=True)
    mcfg = data.model  # with the hybrid's aggregate columns, saved with the model
    # A stream this data has no item of (no messages, as in KDD Cup: no text width either) gets
    # no encoder, as pretraining skips its objective; the model saved says which streams it reads.
    if (kept := streams_with_items(data.examples, mcfg.streams)) != list(mcfg.streams):
        empty = [s for s in mcfg.streams if s not in kept]
        if not kept:
            raise UserError(f"{files[0]}: no items in any of model.streams {list(mcfg.streams)}: nothing to read")
        if d.main:
            print(f"train: no {', '.join(empty)} items in this data; the model reads {', '.join(kept)} "
                  f"(model.streams={kept})")
        data.model = mcfg = replace(mcfg, streams=kept)
    train_idx = data.select(["train"], user_fraction=tc.label_fraction)
    val_idx = data.select(["val"])
    if not len(train_idx) or not len(val_idx):
        raise UserError(f"{files[0]}: {len(train_idx)} labelled train and {len(val_idx)} val examples; need both")
    # Day of program and message number past training's are read as its latest (saved with the model).
    data.model = mcfg = replace(mcfg, **data.subset(train_idx).trained_limits())
    train_set, val_set = data.subset(train_idx), data.subset(val_idx)

    targets = None  # with train.distill: soft targets per global example row (distill.py)
    if not 0.0 <= tc.distill <= 1.0:
        raise UserError(f"train.distill={tc.distill}: a weight in [0, 1] (0: the labels alone)")
    if tc.distill > 0:
        p = distill.teacher_probabilities(files, train_idx, tc.distill_from, tc.seed, Paths.of(cfg).features)
        targets = torch.from_numpy(distill.soft_targets(data.examples["label"], train_idx, p, tc.distill))

    loop.seed_everything(tc.seed)
    model = build_model(cfg, mcfg, device)
    model.set_output_bias(float(train_set.labels().mean() if targets is None else targets[train_idx].mean()))
    net = torch.nn.parallel.DistributedDataParallel(model) if d.enabled else model
    loop.reseed_rank(d, tc.seed)  # each rank its own dropout masks; the weights are rank 0's
    optimizer = loop.make_optimizer(model, tc.lr, tc.weight_decay)  # encoders included while frozen for a while
    per_epoch = loop.epoch_batches(tc.batching, train_set, tc.batch_size, d.world)
    scheduler = loop.make_scheduler(optimizer, tc.epochs * per_epoch, tc.warmup_frac)
    ema = loop.ema_of(model, tc.ema_decay) if tc.ema_decay else None
    parts = loop.step_parts(tc.step_threads, model.config, device, d.world)
    pool = ThreadPoolExecutor(parts, thread_name_prefix="train-step") if parts > 1 else None

    def forward(part: dict, _generator) -> tuple[torch.Tensor, None]:  # a batch, or one part of a split one
        y = part["label"] if targets is None else targets[part["example"].cpu()].to(part["label"].device)
        with autocast(device):
            return net(part, y)[1], None

    scored = ema.module if ema is not None else model  # what is validated, kept and shipped
    averaged = {"ema": ema} if ema is not None else {}

    state = {"epoch": 0, "batch": 0, "step": 0, "best_auc": -np.inf, "best_epoch": -1, "bad_epochs": 0,
             "history": [], "run_id": None, "fingerprint": fingerprint, "loss_sum": 0.0, "loss_n": 0}
    last = run_dir / LAST
    state, resumed = loop.resume(last, fingerprint, state, d.rank, model=model, optimizer=optimizer,
                                 scheduler=scheduler, **averaged)
    if resumed and d.main:
        print(f"train: resuming {name} at epoch {state['epoch'] + 1}, batch {state['batch']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if d.main:
        save_config(cfg, run_dir)

    def checkpoint() -> None:
        rng = loop.rng_states(d)  # every rank: a collective under torchrun
        if d.main:
            loop.save_state(last, rng, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), **{k: v.state_dict() for k, v in averaged.items()},
                            **state)

    data_input = {"path": str(files[0]), "digest": meta.source_fingerprint}
    tags = {"kind": "model", "init": tc.init, "label_fraction": str(tc.label_fraction),
            "streams": "+".join(model.streams), "pooling": cfg.model.pooling,
            "aggregates": str(cfg.model.aggregates), "world_size": str(d.world)}
    with tracking.stage_run(cfg, "train", name, tags, resume_run_id=state["run_id"], data=data_input) as run_id:
        state["run_id"] = run_id
        val_loader = loop.loader(val_set, tc.eval_batch_size, collate, sampler=loop.by_length(val_set, d.rank, d.world),
                                 num_workers=tc.num_workers)
        stop = False
        while state["epoch"] < tc.epochs and not stop:
            epoch = state["epoch"]
            sampler = loop.epoch_sampler(tc.batching, train_set, tc.seed, epoch, tc.batch_size, state["batch"], d.rank,
                                         d.world)
            batches = loop.prefetched(loop.loader(train_set, tc.batch_size, collate, sampler, tc.num_workers,
                                                  pin=device.type == "cuda", parts=parts))
            bar = tqdm(batches, desc=f"train {epoch + 1}/{tc.epochs}", initial=state["batch"], total=per_epoch,
                       disable=not d.main, leave=False)
            for stream in model.streams if tc.freeze_epochs else []:  # AdamW skips parameters without a gradient
                (model.freeze_encoder if epoch < tc.freeze_epochs else model.unfreeze_encoder)(stream)
            net.train()
            recent: list[float] = []
            seen, started = 0, time.perf_counter()
            with loop.threads_per_part(parts):  # validation below runs on all of torch's threads
                for batch in bar:
                    if parts > 1:  # the batch's parts forward and backward on threads of their own
                        loss, _ = loop.split_step(forward, batch, pool, optimizer, model.parameters(), tc.grad_clip,
                                                  scheduler)
                        size = sum(len(b["label"]) for b in batch)
                    else:
                        batch = loop.to_device(batch, device)
                        loss, _ = forward(batch, None)
                        loop.optimizer_step(loss, optimizer, model.parameters(), tc.grad_clip, scheduler)
                        size = len(batch["label"])
                    if ema is not None:
                        ema.update_parameters(model)
                    recent = (recent + [loss.item()])[-50:]
                    state["loss_sum"] += recent[-1]
                    state["loss_n"] += 1
                    state["batch"] += 1
                    state["step"] += 1
                    seen += size
                    bar.set_postfix(loss=f"{np.mean(recent):.4f}", best_val_auc=f"{state['best_auc']:.4f}")
                    if tc.checkpoint_every_steps and state["step"] % tc.checkpoint_every_steps == 0:
                        checkpoint()
            # The training steps' throughput (loading included, validation not), all ranks.
            examples_per_s = seen * d.world / max(time.perf_counter() - started, 1e-9)
            _, y, p = loop.predict(scored, val_loader, device)
            _, y, p = loop.gather_arrays(d, _, y, p)
            auc = float(roc_auc_score(y, p)) if len(np.unique(y)) > 1 else float("nan")
            # epoch_* per epoch; evaluate logs the best model's val_/test_/oot_ metrics
            metrics = {"train_loss": state["loss_sum"] / max(state["loss_n"], 1), "epoch_val_roc_auc": auc,
                       "epoch_val_log_loss": float(log_loss(y, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1])),
                       "lr": scheduler.get_last_lr()[0]}
            tracking.log_metrics(metrics | {"epoch_examples_per_s": examples_per_s}, step=epoch)
            state["history"].append(metrics)
            # Early stopping on val ROC-AUC; a single-class val split has none: use -log loss.
            score = auc if np.isfinite(auc) else -metrics["epoch_val_log_loss"]
            if score > state["best_auc"] or state["best_epoch"] < 0:
                state.update(best_auc=score, best_epoch=epoch, bad_epochs=0)
                if d.main:
                    save_model(run_dir / BEST, scored, mcfg, to_dict(cfg), epoch, auc)
            else:
                state["bad_epochs"] += 1
            if d.main:
                tqdm.write(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}  val ROC-AUC {auc:.4f}"
                           f"  (best {state['best_auc']:.4f} @ {state['best_epoch'] + 1})")
            stop = loop.broadcast_flag(d, state["bad_epochs"] >= tc.patience)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_n=0)
            checkpoint()
        if pool is not None:
            pool.shutdown()
        result = TrainResult(run_id, run_dir, run_dir / BEST, state["best_epoch"], state["best_auc"])
        if d.main:
            _finish(cfg, result, data, mcfg, device, fingerprint)
    return result


def _finish(cfg: Config, result: TrainResult, data: FeatureDataset, mcfg, device, fingerprint: str) -> None:
    """Platt scaling of the best model on validation (saved with it), then its predictions
    on every labelled split, logged with the model."""
    model, ckpt = load_model(result.checkpoint, device)
    scale, bias = 1.0, 0.0
    if cfg.train.calibrate:
        # Fitted on the raw logits: a best.pt calibrated by an interrupted _finish starts over.
        model.config = replace(model.config, calibration_scale=1.0, calibration_bias=0.0)
        val = data.subset(data.select(["val"]))
        _, y, p = loop.predict(model, loop.loader(val, cfg.train.eval_batch_size, collate, loop.by_length(val)), device)
        scale, bias = calibration.fit_platt(p, y)
        model.config = replace(model.config, calibration_scale=scale, calibration_bias=bias)
        save_model(result.checkpoint, model, model.config, ckpt["config"], ckpt["epoch"], ckpt["val_roc_auc"])
    idx = data.select(["val", "test", "oot"])
    subset = data.subset(idx)
    ids, y, p = loop.predict(model, loop.loader(subset, cfg.train.eval_batch_size, collate, loop.by_length(subset)), device)
    pd.DataFrame({"example": ids, "split": [SPLITS[s] for s in data.examples["split"][ids]],
                  "label": y.astype(np.int8), "p_engaged": p}).to_parquet(result.run_dir / PREDICTIONS)
    if result.run_id:
        tracking.log_artifacts([result.checkpoint], "model")
        tracking.log_artifacts([result.run_dir / PREDICTIONS])
        # The MLflow model (pipeline/serving.py): load by alias, serve, score raw events anywhere.
        info = serving.log_engagement_model(result.checkpoint, cfg, data.meta.vocab)
        mlflow.set_tag(serving.LOGGED_MODEL_TAG, info.model_id)
        tracking.log_metrics({"best_epoch": result.best_epoch, "best_val_roc_auc": result.val_roc_auc,
                              "calibration_scale": scale, "calibration_bias": bias})
    stamps.mark_done(result.run_dir / DONE, fingerprint, run_id=result.run_id, best_epoch=result.best_epoch,
                     val_roc_auc=result.val_roc_auc, build_id=build_id(data.files))  # evaluate checks build_id
    print(f"train: {result.run_dir.name} best val ROC-AUC {result.val_roc_auc:.4f} at epoch "
          f"{result.best_epoch + 1}, calibrated on val as {scale:.3f} z {bias:+.3f}; model {result.checkpoint}")
