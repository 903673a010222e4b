"""The README and docs/ stay true to the repository: every target `make help` lists is
documented and none is invented, no placeholder is left unfilled, the README stays a front
door (at most 250 lines), every relative link resolves and every `python -m` module exists.
Pure file reads: no imports of the project, nothing run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
# The pages README and the code point at; each must exist (a missing one is a broken promise).
PAGES = ("design", "contract", "configuration", "models", "pretraining", "evaluation", "mlflow",
         "production", "scaling", "benchmarks", "privacy", "dependencies", "results", "layout",
         "testing", "mapping")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
PYTHON_M = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")


def _targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z_-]+):.*?## ", (ROOT / "Makefile").read_text(), re.M))


def _docs() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_docs_pages_exist_and_start_with_a_title_and_a_line_of_what_is_here():
    missing = [p for p in PAGES if not (DOCS / f"{p}.md").is_file()]
    assert not missing, f"docs/ lacks: {missing}"
    for path in DOCS.glob("*.md"):
        lines = _text(path).splitlines()
        assert lines and lines[0].startswith("# "), f"{_name(path)} does not start with '# Title'"
        assert len(lines) > 2 and lines[1] == "" and lines[2].strip(), \
            f"{_name(path)}: the title is not followed by a line saying what is here"


def test_every_make_target_is_documented_and_none_is_invented():
    targets = _targets()
    assert {"demo", "test", "test-full", "features", "pretrain", "train", "compare", "bench"} <= targets
    texts = {_name(p): _text(p) for p in _docs()}
    everything = "\n".join(texts.values())
    missing = sorted(t for t in targets if f"`make {t}`" not in everything)
    assert not missing, f"README.md and docs/ do not document: {missing}"
    readme_missing = sorted(t for t in targets if f"`make {t}`" not in texts["README.md"])
    assert not readme_missing, f"README.md's target list lacks: {readme_missing}"
    for name, text in texts.items():
        named = set(re.findall(r"`make ([a-z][a-z-]*)", text))
        assert not named - targets, f"{name} names targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize("path", _docs(), ids=_name)
def test_no_unfilled_placeholders(path):
    text = _text(path)
    assert not re.findall(r"<!-- [A-Z-]+ -->", text)
    assert "to be filled in" not in text


def test_the_readme_is_a_front_door():
    text = _text(README)
    assert len(text.splitlines()) <= README_MAX_LINES, \
        f"README.md has {len(text.splitlines())} lines; move detail to docs/ (at most {README_MAX_LINES})"
    # it says where the rest went, and stays honest about the comparison
    linked = {Path(t.split("#")[0]).as_posix() for t in LINK.findall(text)}
    assert {f"docs/{p}.md" for p in PAGES} <= linked, "README.md does not link every docs/ page"
    assert "does not beat gradient boosting" in text


def test_the_design_keeps_its_section_numbers():
    # code comments cite "docs/design.md §n"
    headings = re.findall(r"^## §(\d+) ", _text(DOCS / "design.md"), re.M)
    assert headings == [str(n) for n in range(1, 13)]


@pytest.mark.parametrize("path", _docs(), ids=_name)
def test_every_relative_link_resolves(path):
    broken = []
    for target in LINK.findall(_text(path)):
        if re.match(r"[a-z][a-z+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, ...; and anchors within the page
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{_name(path)} links to missing files: {broken}"


@pytest.mark.parametrize("path", _docs(), ids=_name)
def test_every_python_m_module_exists(path):
    missing = []
    for module in set(PYTHON_M.findall(_text(path))):
        base = ROOT.joinpath(*module.rstrip(".").split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            missing.append(module)
    assert not missing, f"{_name(path)} names `python -m` modules that do not exist: {sorted(missing)}"
