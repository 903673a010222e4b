"""Make sure the raw inputs a config names exist: run the simulator or convert files with a
mapping (features/adapters/mapping.py) on first use, and again when its settings, the
mapping or the mapped files changed; user files (data.source: files) are left alone."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from common import stamps
from common.errors import UserError
from features.adapters.mapping import Mapping, convert, input_files, load_mapping
from features.io import fingerprint
from pipeline.config import Config, save_config, to_dict
from pipeline.paths import Paths

log = logging.getLogger(__name__)
STAMP = "source.json"
SOURCES = ("files", "simulator", "mapping", "kddcup2015")


def ensure_raw(cfg: Config) -> None:
    source = cfg.data.source
    if source not in SOURCES:
        raise UserError(f"data.source={source!r}; choose one of {', '.join(SOURCES)}")
    if source == "files":
        return
    raw = Paths.of(cfg).raw
    if source == "simulator":
        _check_simulator_events(cfg, raw)
        settings = to_dict(cfg)["sim"]
    else:
        mapping = config_mapping(cfg)
        settings = {"mapping": asdict(mapping), "inputs": fingerprint(input_files(mapping))}
    fp = stamps.fingerprint(source, settings)
    if Path(cfg.data.events).exists() and stamps.is_current(raw / STAMP, fp) is not None:
        return
    if source == "simulator":
        simulate_raw(cfg, raw)
        return
    _check_data_paths(cfg, convert(mapping, raw))
    stamps.mark_done(raw / STAMP, fp, source=source, settings=settings)


def _check_simulator_events(cfg: Config, raw: Path) -> None:
    """The simulator writes <workdir>/raw/events.parquet; a config that reads its events from a
    file that is elsewhere and missing would simulate for nothing, then fail: refuse first."""
    written = raw / "events.parquet"
    given = Path(cfg.data.events) if cfg.data.events else None
    if given is None or (given.resolve() != written.resolve() and not given.exists()):
        raise UserError(f"data.source=simulator writes {written}, but data.events is {cfg.data.events!r}: "
                        "to read your own events set data.source=files (docs/contract.md); to simulate, "
                        "data.events=${workdir}/raw/events.parquet")


def simulate_raw(cfg: Config, out: Path, chunk_users: int | None = None) -> Path:
    """Simulate `cfg.sim` into `out` (all users at once, or `chunk_users` at a time) and stamp it
    with its settings, so the next stage (`ensure_raw`) takes these files as they are instead of
    simulating again: `make simulate` then `make validate` simulate once."""
    from pipeline.simulator.run import simulate_to_dir

    settings = to_dict(cfg)["sim"]
    simulate_to_dir(cfg.sim, out, chunk_users=chunk_users)
    save_config(cfg, out)
    stamps.mark_done(out / STAMP, stamps.fingerprint("simulator", settings), source="simulator", settings=settings)
    return out


def config_mapping(cfg: Config) -> Mapping:
    """The mapping a config converts with: data.mapping, or the bundled KDD Cup one; it reads
    data.adapter_input when that is set, else the mapping's own `input`."""
    from features.adapters.kddcup2015 import MAPPING

    path = MAPPING if cfg.data.source == "kddcup2015" else cfg.data.mapping
    if not path:
        raise UserError("data.source=mapping needs data.mapping: the path of a mapping YAML (docs/mapping.md)")
    mapping = load_mapping(path)
    return replace(mapping, input=cfg.data.adapter_input) if cfg.data.adapter_input else mapping


def _check_data_paths(cfg: Config, written: dict[str, Path]) -> None:
    """A converted table that the config does not read is a mapping wasted: say so."""
    for name, path in written.items():
        given = getattr(cfg.data, name)
        if not given or Path(given).resolve() != path.resolve():
            log.warning("the mapping wrote %s but data.%s is %s; set data.%s: ${workdir}/raw/%s to use it",
                        path, name, given, name, path.name)
