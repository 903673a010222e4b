"""Stage stamps: is a stage's output still what a rerun would write?

Every stage that may skip work (the simulator or adapter source, validation, the feature
build, pretraining, training, the jobs) fingerprints what its output depends on (inputs and
settings), writes a small JSON stamp beside the output when it finishes, and on the next run
reuses the output only when the stamp holds the same fingerprint:

    fp = fingerprint(settings, input_id)
    if (done := is_current(out / "done.json", fp)) is not None:
        return done                      # reuse
    ... do the work ...
    mark_done(out / "done.json", fp, run_id=...)

A stamp is written atomically and last, so a crash leaves either no stamp or the old one,
never a stamp that vouches for a half-written output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.files import write_text_atomic

FIELD = "fingerprint"


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A hex digest of `parts` (JSON-able; other values by str()), key order ignored."""
    blob = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp at `path`, or None when there is none or it is not a readable stamp."""
    try:
        stamp = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_current(path: str | Path, fp: str) -> dict[str, Any] | None:
    """The stamp at `path` when it was written for fingerprint `fp`, else None."""
    stamp = read_stamp(path)
    return stamp if stamp is not None and stamp.get(FIELD) == fp else None


def mark_done(path: str | Path, fp: str | None, **info: Any) -> dict[str, Any]:
    """Write the stamp `{"fingerprint": fp, **info}` to `path`, atomically; returns it."""
    stamp = {FIELD: fp, **info}
    write_text_atomic(json.dumps(stamp, indent=1, default=str), path)
    return stamp
