"""The README stays true to the Makefile: every target `make help` lists is documented,
and the README names no target that does not exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z_-]+):.*?## ", (ROOT / "Makefile").read_text(), re.M))


def test_every_make_target_is_in_the_readme_and_none_is_invented():
    readme = (ROOT / "README.md").read_text()
    targets = _targets()
    assert {"demo", "test", "features", "pretrain", "train", "compare", "bench"} <= targets
    missing = sorted(t for t in targets if f"`make {t}`" not in readme)
    assert not missing, f"README does not document: {missing}"
    named = set(re.findall(r"`make ([a-z][a-z-]*)", readme))
    assert not named - targets, f"README names targets the Makefile lacks: {sorted(named - targets)}"


def test_readme_has_no_unfilled_placeholders():
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"<!-- [A-Z-]+ -->", readme)
    assert "to be filled in" not in readme
