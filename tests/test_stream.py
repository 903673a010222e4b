"""Streaming validation (issue 17 part 1): batch by batch into user-shard partitions, with the
same rules, counts and rows as validating the whole table at once."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import contract as C
from features.config import DataConfig
from features.io import read_table, write_parquet_atomic
from features.stream import PARTITIONS, QUARANTINE, SUMMARY, partition_name, validate_to_partitions
from features.validate import validate_events
from features.vocab import Vocab, shard_of

NOW = pd.Timestamp("2026-06-01", tz="UTC")


def _rows(table) -> pd.DataFrame:
    """Rows as comparable text, in a canonical order (row order within one user and second
    is not part of the contract)."""
    df = table.to_pandas() if hasattr(table, "to_pandas") else table
    df = df.astype(str)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The test simulator's events (with its dirty rows) plus exact copies of 40 rows placed
    in other files: duplicates that only meet after batching."""
    from pipeline.simulator.config import SimConfig
    from pipeline.simulator.run import simulate

    events = simulate(SimConfig(users=30, weeks=4, truth_samples=1, dirty_fraction=0.01))["events"]
    d = tmp_path_factory.mktemp("raw")
    half = len(events) // 2
    events.iloc[:half].to_parquet(d / "a.parquet")
    pd.concat([events.iloc[half:], events.sample(40, random_state=0)]).to_parquet(d / "b.parquet")
    return d


def test_streaming_validation_equals_validating_everything_at_once(raw, tmp_path):
    data = DataConfig(events=str(raw))
    whole = validate_events(read_table(raw, provenance=True), data, None, NOW)
    report = validate_to_partitions(raw, data, tmp_path, num_partitions=3, now=NOW, batch_rows=500)
    for k in ("rows_in", "accepted", "duplicates", "quarantined", "reasons", "users", "event_types"):
        assert report[k] == whole.report[k], k
    assert report["duplicates"] >= 40 and report["quarantined"] > 0
    assert report["rows_in"] == report["accepted"] + report["duplicates"] + report["quarantined"]

    parts = [pq.read_table(tmp_path / PARTITIONS / partition_name(p, 3)) for p in range(3)]
    for p, t in enumerate(parts):  # each partition: only its shard's users, sorted by (user, ts)
        users = t[C.USER_ID].to_numpy(zero_copy_only=False)
        assert (shard_of(users, 3) == p).all()
        keys = list(zip(users, t[C.TS].to_pylist()))
        assert keys == sorted(keys)
    import pyarrow as pa

    pd.testing.assert_frame_equal(_rows(pa.concat_tables(parts)), _rows(whole.events))
    # The quarantine: the same rejected rows, every column (food_ids lists included), and files
    # that plain `pd.read_parquet` reads (pandas 3.1 could not read back an Arrow list dtype).
    quarantined = pd.concat([pd.read_parquet(f) for f in sorted((tmp_path / QUARANTINE).glob("*.parquet"))])
    assert quarantined[C.FOOD_IDS].map(lambda v: v is not None and len(v) > 0).any()
    cols = [c for c in whole.quarantine.columns if c in C.ALL_COLUMNS or c in ("source_file", "source_row", "reason")]
    pd.testing.assert_frame_equal(_rows(quarantined[cols]), _rows(whole.quarantine[cols]))
    write_parquet_atomic(whole.quarantine, tmp_path / "q.parquet")  # as the in-memory validation writes it
    pd.testing.assert_frame_equal(_rows(pd.read_parquet(tmp_path / "q.parquet")[cols]), _rows(whole.quarantine[cols]))

    # The global facts: vocabularies in the order an in-memory build appends them.
    summary = json.loads((tmp_path / SUMMARY).read_text())
    vocab = Vocab({"event_types": [], "meals": [], "foods": []})
    vocab.extend(whole.events)
    assert summary["first_seen"]["event_types"] == vocab.tokens["event_types"]
    assert summary["first_seen"]["meals"] == vocab.tokens["meals"]
    assert summary["first_seen"]["foods"] == vocab.tokens["foods"]
    assert summary["ts_min"] == str(whole.events[C.TS].to_pandas().min().to_pydatetime())


def test_the_data_path_keeps_freed_memory_where_malloc_is_glibc(raw, tmp_path):
    """The streamed validation sets glibc's mmap and trim thresholds in the process that runs it
    (common/memory.py). Their effect, in a fresh interpreter: a 4 MB array gets its own mmap
    (mallinfo2's mmapped bytes grow) before the call and comes from the heap after it."""
    import platform
    import subprocess
    import sys

    from common import memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert not memory.keep_freed_memory()
        return
    validate_to_partitions(raw, DataConfig(events=str(raw)), tmp_path, num_partitions=2, now=NOW)
    assert memory._done is True
    probe = """
import ctypes, numpy as np
from common.memory import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Mallinfo2
def grows():
    before = libc.mallinfo2().hblkhd; block = np.ones(4 << 20, np.uint8)
    return libc.mallinfo2().hblkhd - before
print(grows() > 0, keep_freed_memory(), grows() > 0)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]


def test_a_shard_without_users_still_gets_its_partition(raw, tmp_path):
    report = validate_to_partitions(raw, DataConfig(events=str(raw)), tmp_path, num_partitions=64, now=NOW)
    files = sorted((tmp_path / PARTITIONS).glob("*.parquet"))
    assert len(files) == 64 and sum(pq.read_metadata(f).num_rows for f in files) == report["accepted"]
    assert not list((tmp_path / PARTITIONS).glob(".*"))  # no temporary left behind
    assert np.isclose(report["users"], 30, atol=1)


@pytest.mark.parametrize("partitions,shards,reads_of", [
    (3, 3, lambda i: [i]),  # a shard per partition
    pytest.param(4, 2, lambda i: [i, i + 2], marks=pytest.mark.slow),  # a shard is two partitions
    pytest.param(2, 4, lambda i: [i % 2], marks=pytest.mark.slow),  # a shard is part of one partition
])  # the other shard counts run in `make test-full`
def test_shards_that_read_only_their_partitions_build_what_one_whole_build_does(
        sim_store_files, tiny_encoder, tmp_path, monkeypatch, partitions, shards, reads_of):
    import pipeline.data.features as F
    from pipeline.config import load_config
    from pipeline.data.features import features_stage
    from tests.test_scale import assert_same_examples

    whole_file, whole_cfg = sim_store_files  # validated in memory, built unsharded
    overrides = [f"workdir={tmp_path / 'w'}", f"data.stream_partitions={partitions}",
                 f"features.num_shards={shards}", f"features.text_encoder={tiny_encoder.name}"]
    reads = []
    real = F.pq.read_table
    monkeypatch.setattr(F.pq, "read_table", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    shard_files = []
    for i in range(shards):
        cfg = load_config("configs/test.yaml", [*overrides, f"features.shard={i}"])
        shard_files.append(features_stage(cfg, encoder=tiny_encoder))
    validated = tmp_path / "w" / "validated"
    assert not (validated / "events.parquet").exists() and (validated / PARTITIONS).is_dir()
    assert_same_examples(whole_file, shard_files, whole_cfg)
    events_read = [r for r in reads if f"validated/{PARTITIONS}/part-" in r]  # (.pPPP/: the validation)
    want = [str(validated / PARTITIONS / partition_name(p, partitions)) for i in range(shards) for p in reads_of(i)]
    assert events_read == want  # each shard its own partitions only


def test_shards_of_a_log_cut_by_data_until_still_read_only_their_partitions(sim_store_files, tiny_encoder, tmp_path,
                                                                            monkeypatch):
    """The scheduled jobs set data.until (the log as of a date): the summary's facts are cut there,
    so a shard still reads its own partitions and builds what one whole build cut there does."""
    import pipeline.data.features as F
    from pipeline.config import load_config
    from pipeline.data.features import features_stage
    from tests.test_scale import assert_same_examples

    _, base = sim_store_files
    raw = read_table(base.data.events)
    ts = pd.to_datetime(raw[C.TS], utc=True, errors="coerce").dropna()
    until = (ts.min() + (ts.max() - ts.min()) * 0.85).floor("D")
    common = [f"features.text_encoder={tiny_encoder.name}", f"data.until={until.isoformat()}",
              f"data.events={base.data.events}", f"data.users={base.data.users}", "data.foods=null",  # food ids numbered as first seen
              "data.source=files"]
    whole = features_stage(load_config("configs/test.yaml", [f"workdir={tmp_path / 'whole'}", *common]),
                           encoder=tiny_encoder)
    reads = []
    real = F.pq.read_table
    monkeypatch.setattr(F.pq, "read_table", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    shards = [features_stage(load_config("configs/test.yaml", [
        f"workdir={tmp_path / 'w'}", *common, "data.stream_partitions=3", "features.num_shards=3",
        f"features.shard={i}"]), encoder=tiny_encoder) for i in range(3)]
    validated = tmp_path / "w" / "validated"
    facts = json.loads((validated / SUMMARY).read_text())
    later = [t for pairs in facts["first_seen_us"].values() for t, us in pairs if us >= until.value // 1000]
    assert later  # tokens first seen after the cut, which the cut build must not number
    assert_same_examples(whole, shards, load_config("configs/test.yaml", [f"workdir={tmp_path / 'whole'}", *common]))
    events_read = [r for r in reads if f"validated/{PARTITIONS}/part-" in r]
    assert events_read == [str(validated / PARTITIONS / partition_name(p, 3)) for p in range(3)]


@pytest.mark.slow  # starts a Dask cluster of two worker processes (~20 s): `make test-full`
def test_a_local_dask_cluster_builds_the_shards_of_one_streamed_build(sim_store_files, tiny_encoder, tmp_path):
    from dask.distributed import LocalCluster

    from features.store import feature_files
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.paths import Paths
    from tests.test_scale import assert_same_examples

    whole_file, whole_cfg = sim_store_files
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        overrides = [f"workdir={tmp_path / 'w'}", "data.stream_partitions=2",
                     f"features.text_encoder={tiny_encoder.name}"]
        # The command a user runs: validation here, one task per shard on the cluster.
        assert main(["features", "--config", "configs/test.yaml", "--num-shards", "2", "--scheduler",
                     cluster.scheduler_address, *overrides]) == 0
    cfg = load_config("configs/test.yaml", overrides)
    shard_files = feature_files(Paths.of(cfg).features)
    assert [f.name for f in shard_files] == ["features-000-of-002.h5", "features-001-of-002.h5"]
    assert_same_examples(whole_file, shard_files, whole_cfg)


def test_a_scheduler_that_does_not_answer_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import socket

    from pipeline.cli import main
    from pipeline.data import fanout

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT_S", 1)
    rc = main(["features", "--config", "configs/test.yaml", f"workdir={tmp_path / 'w'}", "--num-shards", "2",
               "data.stream_partitions=2", "--scheduler", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no Dask scheduler answered within 1 s" in err, err
