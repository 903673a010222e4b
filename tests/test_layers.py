"""Layers point down (docs/layout.md): common <- models <- features <- pipeline <- jobs.

Every import in the project's packages, module-level or inside a function, is read with `ast`
and checked against the layer of the importing file. The simulator is a data source: it
sees only the event contract and `common`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("common", "models", "features", "pipeline", "jobs")  # each imports only those before it
SIMULATOR = "pipeline.simulator"
SIMULATOR_MAY_IMPORT = ("common", "features.contract", SIMULATOR)


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved
    against `module` (the importing file's dotted name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join(parent + ([base] if base else []))
            # `from pipeline import tracking` imports pipeline.tracking
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(source: str, module: str) -> list[str]:
    """What `module` (e.g. 'features.dataset') imports against the layering rule."""
    layer = module.split(".")[0]
    if layer not in LAYERS:
        return []
    allowed = LAYERS[: LAYERS.index(layer) + 1]
    bad = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top not in LAYERS:
            continue  # the standard library and third-party packages
        if top not in allowed:
            bad.append(f"{module}:{line} imports {name} ({top} is above {layer})")
        elif _within(module, SIMULATOR) and not any(_within(name, p) for p in SIMULATOR_MAY_IMPORT):
            bad.append(f"{module}:{line} imports {name} (the simulator sees only the contract and common)")
    return bad


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(p for p in parts if p != "__init__") if parts[-1] == "__init__" else ".".join(parts), path


def test_every_layer_imports_only_layers_below_it():
    modules = list(_modules())
    assert len(modules) > 40 and {m.split(".")[0] for m, _ in modules} == set(LAYERS)
    bad = [v for module, path in modules for v in violations(path.read_text(), module)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_catches_one_upward_import_anywhere_in_a_file():
    assert violations("import numpy\nfrom features import contract\n", "features.build") == []
    assert violations("def f():\n    from pipeline.config import Config\n", "features.build") == [
        "features.build:2 imports pipeline.config.Config (pipeline is above features)"]
    assert violations("from features.store import STREAMS\n", "models.engagement")
    assert violations("from pipeline import tracking\n", "models.engagement")
    assert violations("import jobs.runner\n", "pipeline.cli")
    assert violations("from jobs.definitions import JOBS\n", "jobs.cli") == []
    # relative imports resolve to the same names
    assert violations("from ..store import STREAMS\n", "features.adapters.kddcup2015") == []
    assert violations("from ...pipeline import config\n", "features.adapters.kddcup2015") == [
        "features.adapters.kddcup2015:1 imports pipeline.config (pipeline is above features)"]


def test_the_simulator_sees_only_the_contract():
    assert violations("from features.contract import USER_ID\n", "pipeline.simulator.run") == []
    assert violations("from pipeline.simulator.catalog import CITIES\n", "pipeline.simulator.run") == []
    assert violations("from features.config import LabelConfig\n", "pipeline.simulator.truth")
    assert violations("from pipeline.paths import Paths\n", "pipeline.simulator.run")
