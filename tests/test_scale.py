"""Scale-out paths (docs/design.md §11): training and pretraining through torchrun with two CPU
processes on gloo, a feature build split into user shards that equals the unsharded build,
and the GPU path (bf16 autocast on CUDA only, never on CPU).

Each torchrun test takes about 30 s on two busy cores (two interpreters importing torch,
transformers and MLflow), under the ~60 s at which a test is marked `slow`."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.devices import autocast, resolve_device
from common.errors import UserError
from features import validate as V
from features.dataset import FeatureDataset, collate, model_config_for
from features.store import STREAMS, feature_files, load_arrays, read_meta
from features.text_vectors import TextEncoder
from features.vocab import pseudonyms, shard_of
from models.engagement import EngagementModel
from models.synthetic import random_batch, tiny_config
from pipeline.config import load_config
from pipeline.data.features import features_stage
from pipeline.paths import Paths
from pipeline.pretraining.pretrain import latest_windows
from pipeline.training import loop
from pipeline.training.train import BEST, LAST, PREDICTIONS

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Loaded (via PYTHONPATH) into each torchrun worker. At exit it records whether the process
# group was still alive: a gloo group left for interpreter shutdown can abort the rank
# ("terminate called without an active exception", pytorch/pytorch#190489), which CI hit
# once. With SCALE_READ_LOG it also records the store and example id of every item that rank
# reads (item by item or a whole batch at once), so the test can see which examples each process
# trained on (and leave out other stores' reads, such as the logged model's check of its input
# example, which builds and scores a store of its own).
PROBE = textwrap.dedent("""
    import atexit
    import os

    def _record_exit():
        import sys
        dist = sys.modules.get("torch.distributed")
        alive = bool(dist is not None and dist.is_available() and dist.is_initialized())
        with open(os.path.join(os.environ["SCALE_EXIT_LOG"], f"rank{os.environ['RANK']}.txt"), "w") as f:
            f.write(f"group alive at exit: {alive}\\n")

    if os.environ.get("RANK") is not None and os.environ.get("SCALE_EXIT_LOG"):
        atexit.register(_record_exit)  # registered first, so it runs after every other handler

    if os.environ.get("RANK") is not None and os.environ.get("SCALE_READ_LOG"):
        from features import dataset as _dataset

        _log = open(os.path.join(os.environ["SCALE_READ_LOG"], f"rank{os.environ['RANK']}.txt"), "a", buffering=1)
        _getitem = _dataset.FeatureDataset.__getitem__

        def _logged_getitem(self, i):
            item = _getitem(self, i)
            _log.write(f"{self.files[0]}\\t{item['example']}\\n")
            return item

        _dataset.FeatureDataset.__getitem__ = _logged_getitem
        _batch = _dataset.FeatureDataset.batch  # the loaders' path: a whole batch at once

        def _logged_batch(self, positions):
            batch = _batch(self, positions)
            _log.write("".join(f"{self.files[0]}\\t{e}\\n" for e in batch["example"].tolist()))
            return batch

        _dataset.FeatureDataset.batch = _logged_batch
""")


def reads_of(log: Path, store: Path) -> np.ndarray:
    """The example ids a rank read from `store`, in order (the probe's log above)."""
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    return np.array([int(e) for path, e in rows if Path(path) == Path(store)], dtype=np.int64)


# -- data order ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 11, 57])
def test_epoch_order_gives_ranks_disjoint_shares_covering_the_epoch(n):
    for epoch in (0, 1):
        ranks = [loop.EpochOrder(n, seed=3, epoch=epoch, batch_size=4, rank=r, world=WORLD).order for r in range(WORLD)]
        assert len({len(o) for o in ranks}) == 1  # the same number of batches on every rank
        assert not set(ranks[0]) & set(ranks[1])
        union = set(np.concatenate(ranks).tolist())
        assert union <= set(range(n)) and n - len(union) <= WORLD - 1
        whole = loop.EpochOrder(n, seed=3, epoch=epoch, batch_size=4).order
        assert np.array_equal(np.sort(np.concatenate(ranks)), np.sort(whole[: len(union)]))
        resumed = loop.EpochOrder(n, seed=3, epoch=epoch, batch_size=4, start_batch=1, rank=1, world=WORLD).order
        assert np.array_equal(resumed, ranks[1][4:])  # a resume replays the rest of this rank's share
        assert loop.batches_per_epoch(n, 4, WORLD) == -(-len(ranks[0]) // 4)


def flat(sampler) -> np.ndarray:
    """The indices a sampler yields in order, whether one by one or batch by batch."""
    return np.concatenate([np.atleast_1d(np.asarray(x, np.int64)) for x in sampler] or [np.zeros(0, np.int64)])


@pytest.mark.parametrize("n", [1, 10, 11, 57, 300])
def test_length_batches_give_ranks_disjoint_batches_of_similar_length(n):
    lengths = np.random.default_rng(n).integers(0, 128, n)
    for epoch in (0, 1):
        whole = loop.LengthBatches(lengths, seed=3, epoch=epoch, batch_size=4, window=5)
        assert np.array_equal(np.sort(flat(whole)), np.arange(n))  # every example once per epoch
        assert loop.LengthBatches.per_rank(n, 4, window=5) == len(whole) == sum(-(-min(20, n - lo) // 4) for lo in range(0, n, 20))
        ranks = [loop.LengthBatches(lengths, 3, epoch, 4, 0, r, WORLD, window=5) for r in range(WORLD)]
        assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(whole) // WORLD
        assert loop.LengthBatches.per_rank(n, 4, WORLD, window=5) == len(ranks[0])
        assert not set(flat(ranks[0])) & set(flat(ranks[1]))
        resumed = loop.LengthBatches(lengths, 3, epoch, 4, 1, 1, WORLD, window=5)
        assert resumed.batches == ranks[1].batches[1:]  # a resume replays the rest of this rank's share
        again = loop.LengthBatches(lengths, 3, epoch, 4, window=5)
        assert again.batches == whole.batches  # seeded
    if n >= 57:
        e0, e1 = (loop.LengthBatches(lengths, 3, e, 4, window=5).batches for e in (0, 1))
        assert e0 != e1  # a new order every epoch
        random = flat(loop.EpochOrder(n, 3, 0, 4))
        def padded(batches):
            return sum(len(b) * lengths[b].max() for b in batches)
        assert padded([np.asarray(b) for b in e0]) < 0.8 * padded([random[i:i + 4] for i in range(0, n, 4)])
        # DDP waits for the slowest rank: the ranks' batches of one step are neighbours in length.
        r0, r1 = (loop.LengthBatches(lengths, 3, 0, 4, 0, r, WORLD, window=5).batches for r in range(WORLD))
        gap = np.mean([abs(lengths[a].max() - lengths[b].max()) for a, b in zip(r0, r1)])
        shuffled = np.random.default_rng(0).permutation(len(r1))
        assert gap < 0.6 * np.mean([abs(lengths[a].max() - lengths[r1[j]].max()) for a, j in zip(r0, shuffled)])
        with pytest.raises(UserError, match="batching"):
            loop.epoch_sampler("sorted", np.zeros(3), 0, 0, 4)


# -- torchrun + DDP -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_workdir(sim_store_files, tmp_path_factory):
    """A fresh workdir holding a copy of the tiny simulator store (built with the tiny
    encoder), plus a folder with the read probe."""
    path, _ = sim_store_files
    root = tmp_path_factory.mktemp("ddp")
    shutil.copytree(path.parent, root / "w" / "features")
    (root / "probe").mkdir()
    (root / "probe" / "sitecustomize.py").write_text(PROBE)
    return root


def torchrun(stage: str, root: Path, db: Path, *overrides: str, read_log: Path | None = None):
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    exit_log = root / f"exit-{stage}"
    exit_log.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALE_EXIT_LOG": str(exit_log),
           "PYTHONPATH": os.pathsep.join([str(root / "probe"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    if read_log is not None:
        read_log.mkdir()
        env["SCALE_READ_LOG"] = str(read_log)
    cmd = [*launcher, "--standalone", f"--nproc_per_node={WORLD}", "-m", "pipeline", stage,
           "--config", "configs/test.yaml", f"workdir={root / 'w'}", f"tracking.uri=sqlite:///{db}", *overrides]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    for r in range(WORLD):  # every rank left the process group before its interpreter shut down
        assert (exit_log / f"rank{r}.txt").read_text() == "group alive at exit: False\n", r
    return run


def only_run(db: Path):
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 created none
    return client, runs[0]


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_torchrun_trains_on_disjoint_shards_with_one_run_and_one_checkpoint(ddp_workdir, tiny_encoder_dir):
    root, db, reads = ddp_workdir, ddp_workdir / "train.db", ddp_workdir / "reads"
    epochs, bs = 4, 8
    torchrun("train", root, db, "train.init=scratch", f"train.epochs={epochs}", f"train.batch_size={bs}",
             "train.lr=3e-3", "train.patience=100", "train.run_name=ddp", f"features.text_encoder={tiny_encoder_dir}",
             read_log=reads)

    # Each rank read exactly its share of the epoch order of the training examples, epoch by epoch.
    cfg = load_config("configs/test.yaml", [f"workdir={root / 'w'}"])
    files = feature_files(Paths.of(cfg).features)
    data = FeatureDataset(files, model_config_for(cfg.model, read_meta(files[0])))
    train_idx = data.select(["train"])
    train_set = data.subset(train_idx)
    n = len(train_idx)
    read = {r: reads_of(reads / f"rank{r}.txt", files[0]) for r in range(WORLD)}
    orders = {(r, e): train_idx[flat(loop.epoch_sampler(cfg.train.batching, train_set, cfg.train.seed, e, bs, 0, r,
                                                        WORLD))] for r in range(WORLD) for e in range(epochs)}
    for r in range(WORLD):
        expected = np.concatenate([orders[r, e] for e in range(epochs)])
        assert np.array_equal(read[r][np.isin(read[r], train_idx)], expected)
    for e in range(epochs):
        shares = [set(orders[r, e].tolist()) for r in range(WORLD)]
        assert not shares[0] & shares[1] and len(shares[0] | shares[1]) >= n - (WORLD - 1) * bs

    # One MLflow run (rank 0's), loss falling over epochs, one checkpoint of each kind.
    client, run = only_run(db)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == str(WORLD)
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == epochs and losses[-1] < losses[0]
    run_dir = Paths.of(cfg).runs / "ddp"
    assert sorted(Paths.of(cfg).runs.rglob("*.pt")) == [run_dir / BEST, run_dir / LAST]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/best.pt"]
    state = torch.load(run_dir / LAST, weights_only=True)
    # Steps count one rank's batches: each process trained on half of every epoch.
    assert state["step"] == epochs * loop.epoch_batches(cfg.train.batching, train_set, bs, WORLD) \
        < epochs * loop.epoch_batches(cfg.train.batching, train_set, bs)
    assert state["run_id"] == run.info.run_id

    # Validation ROC-AUC was computed on predictions gathered from both ranks: it equals the
    # ROC-AUC of the best model on the whole validation split, scored afterwards in one process
    # (rank 0's half alone would give another figure).
    preds = pd.read_parquet(run_dir / PREDICTIONS)
    val = preds[preds.split == "val"]
    assert len(val) == len(data.select(["val"]))
    whole_val_auc = roc_auc_score(val.label, val.p_engaged)
    assert run.data.metrics["best_val_roc_auc"] == pytest.approx(whole_val_auc, abs=1e-6)
    half = val[val.example.isin(data.select(["val"])[0::WORLD])]
    assert roc_auc_score(half.label, half.p_engaged) != pytest.approx(whole_val_auc, abs=1e-6)


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_torchrun_pretrains_with_one_run_and_one_set_of_encoders(ddp_workdir, tiny_encoder_dir):
    root, db, reads = ddp_workdir, ddp_workdir / "pretrain.db", ddp_workdir / "pretrain-reads"
    epochs = 3
    torchrun("pretrain", root, db, f"pretrain.epochs={epochs}", f"features.text_encoder={tiny_encoder_dir}",
             read_log=reads)
    client, run = only_run(db)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "pretrain"
    assert {"heldout_nsp_accuracy", "heldout_food_top1", "heldout_event_top1"} <= set(run.data.metrics)

    # Each rank read exactly its share of the epoch order of the pretraining windows, epoch by epoch.
    cfg = load_config("configs/test.yaml", [f"workdir={root / 'w'}", f"pretrain.epochs={epochs}"])
    files = feature_files(Paths.of(cfg).features)
    data = FeatureDataset(files, model_config_for(cfg.model, read_meta(files[0])))
    pc = cfg.pretrain
    windows = latest_windows(data, data.select(["train"], labelled=False), pc.max_examples_per_user)
    for r in range(WORLD):
        read = reads_of(reads / f"rank{r}.txt", files[0])
        window_set = data.subset(windows)
        expected = np.concatenate([windows[flat(loop.epoch_sampler(pc.batching, window_set, pc.seed, e, pc.batch_size,
                                                                   0, r, WORLD))] for e in range(epochs)])
        assert np.array_equal(read[np.isin(read, windows)], expected)
    # The masked-prediction losses fall over the epochs (rank 0 logs its own share's mean).
    for name in ("train_loss_food", "train_loss_events"):
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
        assert len(history) == epochs and history[-1] < history[0], (name, history)
    out = root / "w" / "pretrain"
    assert sorted(p.name for p in out.glob("*.pt")) == ["conversation.pt", "events.pt", "food.pt", "last.pt"]
    arts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "encoders"))
    assert arts == ["encoders/conversation.pt", "encoders/events.pt", "encoders/food.pt"]
    cfg = load_config("configs/test.yaml", [f"workdir={root / 'w'}"])
    model = EngagementModel(model_config_for(cfg.model, read_meta(feature_files(Paths.of(cfg).features)[0])))
    for s in STREAMS:
        model.load_encoder(s, out / f"{s}.pt")  # the encoders rank 0 saved load into the model


# -- sharded feature build ----------------------------------------------------------------


def _keyed(data: FeatureDataset) -> dict:
    keys = list(zip(data.user_key.tolist(), data.examples["as_of"].tolist()))
    assert len(set(keys)) == len(keys)
    return {k: i for i, k in enumerate(keys)}


def test_three_shards_hold_exactly_the_examples_and_tensors_of_one_build(sim_store_files, tiny_encoder, tmp_path):
    path, sim_cfg = sim_store_files
    validated = Paths.of(sim_cfg).validated  # the same validated events for every build
    common = ["data.source=files", f"data.events={validated}", f"data.foods={sim_cfg.data.foods}"]
    whole_cfg = load_config("configs/test.yaml", [f"workdir={tmp_path / 'whole'}", *common])
    whole_file = features_stage(whole_cfg, encoder=tiny_encoder)
    shard_cfgs = [load_config("configs/test.yaml", [f"workdir={tmp_path / 'sharded'}", *common,
                                                    f"features.shard={i}", "features.num_shards=3"]) for i in range(3)]
    shard_files = [features_stage(c, encoder=tiny_encoder) for c in shard_cfgs]
    assert feature_files(Paths.of(shard_cfgs[0]).features) == shard_files  # training reads the shard set
    assert [f.name for f in shard_files] == [f"features-{i:03d}-of-003.h5" for i in range(3)]
    partial = load_config("configs/test.yaml", [f"workdir={tmp_path / 'partial'}"])
    Paths.of(partial).features.mkdir(parents=True)
    for f in shard_files[:2]:
        shutil.copy(f, Paths.of(partial).features / f.name)
    with pytest.raises(UserError, match="missing: features-002-of-003.h5"):
        feature_files(Paths.of(partial).features)  # never trains on part of a shard set

    # Each user lands in exactly one shard: the one its hashed id names.
    raw_ids = np.unique(pq.read_table(validated / V.EVENTS, columns=["user_id"])["user_id"].to_numpy(zero_copy_only=False))
    expected_shard = dict(zip(pseudonyms(raw_ids, whole_cfg.features.pseudonym_key).tolist(), shard_of(raw_ids, 3)))
    whole_users = set(load_arrays(whole_file, ("users",))[0]["users"]["key"].tolist())
    seen = []
    for i, f in enumerate(shard_files):
        meta = read_meta(f)
        assert (meta.shard, meta.num_shards) == (i, 3)
        keys = load_arrays(f, ("users",))[0]["users"]["key"].tolist()
        assert keys and all(expected_shard[k] == i for k in keys)
        seen += keys
    assert len(seen) == len(set(seen)) and set(seen) == whole_users

    assert_same_examples(whole_file, shard_files, whole_cfg)


def assert_same_examples(whole_file, shard_files, cfg) -> None:
    """A shard set holds exactly the examples and tensors of one unsharded build."""
    # Global facts agree, so one model config fits every shard.
    metas = [read_meta(f) for f in [whole_file, *shard_files]]
    assert all(m.sizes() == metas[0].sizes() and m.vocab == metas[0].vocab for m in metas)
    assert all(m.extra["calendar"] == metas[0].extra["calendar"] for m in metas)

    mcfg = model_config_for(cfg.model, metas[0])
    whole, sharded = FeatureDataset(whole_file, mcfg), FeatureDataset(shard_files, mcfg)
    kw, ks = _keyed(whole), _keyed(sharded)
    assert kw.keys() == ks.keys() and len(kw) > 100
    order = sorted(kw)
    iw, is_ = np.array([kw[k] for k in order]), np.array([ks[k] for k in order])
    for field in ("label", "split"):
        assert np.array_equal(whole.examples[field][iw], sharded.examples[field][is_]), field
    for lo in range(0, len(order), 32):
        a = collate([whole[int(i)] for i in iw[lo : lo + 32]])
        b = collate([sharded[int(i)] for i in is_[lo : lo + 32]])
        for k in ("label", "presence"):
            assert torch.equal(a[k], b[k]), k
        for s in STREAMS:
            assert a[s].keys() == b[s].keys()
            for k, t in a[s].items():
                if k == "embedding":  # encoded in other batches: equal up to float16 rounding
                    torch.testing.assert_close(t, b[s][k], atol=1e-3, rtol=1e-3)
                else:
                    assert torch.equal(t, b[s][k]), (s, k)


# -- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps", ""])
def test_a_device_that_is_not_cpu_or_cuda_is_one_line_of_advice(name):
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_device_auto_is_cuda_only_when_one_is_visible():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible"):
            resolve_device("cuda:0")


def test_cpu_autocast_never_enables_bf16():
    device = torch.device("cpu")
    model = EngagementModel(tiny_config()).eval()
    batch = random_batch(model.config, B=5, T=6)
    with autocast(device):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
        assert (torch.randn(4, 8) @ torch.randn(8, 3)).dtype == torch.float32
        logits, loss = model(batch, batch["label"])
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32


def test_logits_and_soft_targets_stay_fp32_under_bf16_autocast():
    # CPU's bf16 autocast stands in for CUDA's: rounded to bf16 (steps of 1/256 near 0.87), two
    # distillation targets 0.001 apart would give the same loss.
    model = EngagementModel(tiny_config()).eval()
    batch = random_batch(model.config, B=5, T=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss_a = model(batch, torch.full((5,), 0.8655))
        _, loss_b = model(batch, torch.full((5,), 0.8665))
    assert logits.dtype == torch.float32 and loss_a.dtype == torch.float32
    assert loss_a != loss_b


@pytest.mark.gpu
@needs_cuda
def test_a_training_step_runs_under_bf16_autocast_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = EngagementModel(tiny_config()).to(device)
    optimizer = loop.make_optimizer(model, 1e-3, 0.01)
    batch = loop.to_device(random_batch(model.config, B=13, T=7), device)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    model.head[-1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with autocast(device):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        logits, loss = model(batch, batch["label"])
    assert seen == [torch.bfloat16]  # the head's Linear ran in bf16 ...
    assert logits.shape == (13,) and logits.dtype == torch.float32  # ... its logits come back fp32 (soft targets kept)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the loss is computed in fp32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.gpu
@needs_cuda
def test_messages_encode_on_cuda_like_on_cpu(tiny_encoder_dir, tmp_path):
    from features.text_vectors import embed_messages

    cpu, gpu = TextEncoder.load(str(tiny_encoder_dir), "cpu"), TextEncoder.load(str(tiny_encoder_dir), "cuda")
    assert gpu.device.type == "cuda"
    texts = ["hi", "logged my lunch today, feeling good", "ok", "weigh-in done", "hi", "a much longer message " * 5]
    want = cpu.encode(texts, batch_size=2, progress=False)
    got = gpu.encode(texts, batch_size=2, progress=False)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)  # bf16 on CUDA
    unsorted = gpu.encode(texts, batch_size=2, sort=False, progress=False)
    np.testing.assert_allclose(unsorted, got, atol=5e-2, rtol=5e-2)  # input order either way
    vectors, stats = embed_messages(texts, gpu, tmp_path / "cache", "k", batch_size=2)
    assert stats["unique"] == 5 and vectors.shape == (6, gpu.dim) and np.array_equal(vectors[0], vectors[4])


@pytest.mark.gpu
@needs_cuda
def test_train_and_pretrain_stages_run_on_cuda(sim_store_files, tmp_path):
    from pipeline.pretraining.pretrain import pretrain
    from pipeline.training.train import train

    path, _ = sim_store_files
    shutil.copytree(path.parent, tmp_path / "w" / "features")
    cfg = load_config("configs/test.yaml", [f"workdir={tmp_path / 'w'}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                            "train.device=cuda", "train.epochs=1"])
    pre = pretrain(cfg)
    assert set(pre.checkpoints) == set(STREAMS) and all(p.exists() for p in pre.checkpoints.values())
    result = train(cfg)  # fine-tunes the encoders just pretrained, pinned batches, bf16 autocast
    assert np.isfinite(result.val_roc_auc) and result.checkpoint.exists()
