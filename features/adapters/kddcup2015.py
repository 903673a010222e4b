"""KDD Cup 2015 (XuetangX MOOC) daily activity -> the event contract: the generic mapping
(features/adapters/mapping.py) with the bundled configs/mappings/kddcup2015.yaml, the worked
example of wide daily counts (docs/mapping.md). That file says what becomes of each column."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from features.adapters.mapping import convert as convert_mapping
from features.adapters.mapping import load_mapping

MAPPING = Path(__file__).resolve().parents[2] / "configs" / "mappings" / "kddcup2015.yaml"


def convert(src: str | Path, out: str | Path, courses: list[str] | None = None) -> dict[str, Path]:
    """Write events.parquet, users.parquet and labels.parquet for the courses in `src`."""
    mapping = replace(load_mapping(MAPPING), input=str(src))
    if courses:
        mapping.events.files = [f"trainCourse{c}.csv" for c in courses]
    return convert_mapping(mapping, out)
