"""Make sure the raw inputs a config names exist: run the simulator or a public-data
adapter on first use (and again when its settings changed); user files are left alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Config, to_dict
from pipeline.errors import UserError
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
    stamp = {"source": source, "settings": settings}
    stamp_path = raw / STAMP
    if Path(cfg.data.events).exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return
    if source == "simulator":
        from pipeline.simulator.run import simulate_to_dir

        simulate_to_dir(cfg.sim, raw, cfg=cfg)
    else:
        from features.adapters.kddcup2015 import convert

        convert(cfg.data.adapter_input, raw)
    stamp_path.write_text(json.dumps(stamp))
