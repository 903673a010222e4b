"""Atomic file writes: a reader never sees a half-written file, whatever crashes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process umask. There is no getter: set it and restore it; a file another thread
    creates in between gets the stricter 077, never a looser mode."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary path beside `final`; rename it over `final` only if the block
    succeeds. A crash never leaves a half-written file where a reader would take it.
    The file gets the mode a plain open() would give it (0666 less the umask), not
    mkstemp's 0600: other users' tools (coaches' dashboards) read the score files."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
