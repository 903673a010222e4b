"""The feature build's shards as tasks on a Dask distributed cluster (docs/scaling.md#dask).

`features.scheduler: tcp://host:8786` (or `--scheduler`) with `features.num_shards: N` and no
`features.shard`: validation runs once (with `data.stream_partitions: N`, each unit of the input
and then each partition as a task on the cluster), then one task per shard, each running the ordinary
`features` stage for its shard in a worker process, and waits for all of them. Workers need
the project installed and the same `workdir` (a shared filesystem); the message-vector cache
and the vocabularies are shared through it as in any sharded build. Without a scheduler nothing
here runs: the single-machine path needs no cluster.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from common.errors import UserError
from pipeline.config import Config
from pipeline.data.validate import ensure_validated

log = logging.getLogger(__name__)


def build_shard(cfg: Config, shard: int, validated: str | Path | None = None) -> str:
    """One shard of the build: what a Dask worker runs (the ordinary features stage).
    `validated`: the folder the caller has just validated into, so the shard does not fingerprint
    the raw input again (a full read of it per shard)."""
    from pipeline.data.features import features_stage

    return str(features_stage(replace(cfg, features=replace(cfg.features, shard=shard, scheduler="")),
                              validated=Path(validated) if validated else None))


def build_shards(cfg: Config) -> list[Path]:
    """The `features` stage as `python -m pipeline features` and the weekly retrain run it: with
    `features.scheduler`, every shard as a task on the cluster; with `features.shard`, that
    shard; else every shard of `features.num_shards` one after another in this process, each
    reading only its own partitions of a streamed validation (so memory follows the largest
    shard, not the log), or one unsharded build when num_shards is 1."""
    from pipeline.data.features import features_stage

    if cfg.features.scheduler:
        files = build_on_cluster(cfg)
    elif cfg.features.shard is not None or cfg.features.num_shards <= 1:
        return [features_stage(cfg)]  # (its shard arguments are checked before any work)
    else:
        vdir = ensure_validated(cfg)  # once, for every shard
        files = [Path(build_shard(cfg, i, vdir)) for i in range(cfg.features.num_shards)]
    _warn_on_few_users(files)
    return files


def _warn_on_few_users(files: list[Path]) -> None:
    """Each shard's summary holds its own users only: the whole build's split sizes, added up
    from the shards' manifests, are what the few-users warning is about."""
    import json

    from pipeline.data.features import few_users_warning

    users: dict[str, int] = {}
    for f in files:
        for name, s in json.loads(f.with_suffix(".json").read_text())["splits"].items():
            users[name] = users.get(name, 0) + s["users"]  # a user lives in one shard only
    if warning := few_users_warning(users):
        print(f"features ({len(files)} shards): {warning}")


CONNECT_TIMEOUT_S = 60


def client_of(cfg: Config):
    """A dask.distributed Client of `features.scheduler` (a context manager)."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise UserError("features.scheduler needs dask.distributed: `pip install 'dask[distributed]'` "
                        "(make install includes it)") from None
    try:
        return Client(cfg.features.scheduler, timeout=CONNECT_TIMEOUT_S)
    except OSError as e:  # distributed's timeout is an OSError, after CONNECT_TIMEOUT_S
        raise UserError(f"features.scheduler={cfg.features.scheduler}: no Dask scheduler answered within "
                        f"{CONNECT_TIMEOUT_S} s ({str(e).splitlines()[0][:120]}); start one (`dask scheduler`) "
                        "or fix the address (docs/scaling.md)") from None


def build_on_cluster(cfg: Config) -> list[Path]:
    """Every shard of `features.num_shards` as a task on the cluster at `features.scheduler`
    (and, with data.stream_partitions, the validation's units and partitions before them);
    returns the shard files in shard order."""
    n = cfg.features.num_shards
    if n < 2 or cfg.features.shard is not None:
        raise UserError(f"features.scheduler fans out the shards of one build: set features.num_shards >= 2 "
                        f"(now {n}) and leave features.shard unset (now {cfg.features.shard})")
    vdir = str(ensure_validated(cfg))  # once, before the shards: they only read the result
    with client_of(cfg) as client:
        log.info("features: %d shard tasks on %s (%d workers)", n, cfg.features.scheduler,
                 len(client.scheduler_info()["workers"]))
        futures = [client.submit(build_shard, cfg, i, vdir, key=f"features-shard-{i}-of-{n}", pure=False)
                   for i in range(n)]
        files = client.gather(futures)
    print(f"features: {n} shards ready on {cfg.features.scheduler} (built, or reused where up to date: the workers' "
          f"logs say which): {', '.join(Path(f).name for f in files)}")
    return [Path(f) for f in files]
