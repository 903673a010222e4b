"""Make sure the raw inputs a config names exist: run the simulator or a public-data
adapter on first use (and again when its settings changed); user files are left alone."""

from __future__ import annotations

import logging
from pathlib import Path

from common import stamps
from common.errors import UserError
from pipeline.config import Config, save_config, to_dict
from pipeline.paths import Paths

log = logging.getLogger(__name__)
STAMP = "source.json"
SOURCES = ("files", "simulator", "kddcup2015")


def ensure_raw(cfg: Config) -> None:
    source = cfg.data.source
    if source not in SOURCES:
        raise UserError(f"data.source={source!r}; choose one of {', '.join(SOURCES)}")
    if source == "files":
        return
    raw = Paths.of(cfg).raw
    settings = to_dict(cfg)["sim"] if source == "simulator" else {"input": cfg.data.adapter_input}
    fp = stamps.fingerprint(source, settings)
    if Path(cfg.data.events).exists() and stamps.is_current(raw / STAMP, fp) is not None:
        return
    if source == "simulator":
        from pipeline.simulator.run import simulate_to_dir

        simulate_to_dir(cfg.sim, raw)
        save_config(cfg, raw)
    else:
        from features.adapters.kddcup2015 import convert

        convert(cfg.data.adapter_input, raw)
    stamps.mark_done(raw / STAMP, fp, source=source, settings=settings)
