"""The import direction of docs/ARCHITECTURE.md: pipeline's packages import only packages to
their left, the library never imports stages, and no stage module imports another but the
dispatcher (`cli.py`) and its launcher (`warm.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.code import ROOT, imported_names, module_file

# a package imports itself and the packages to its left only
LAYERS = ("core", "data", "encoders", "features", "recommenders", "training", "report")
SHARED = {"stages/params.py"}  # the stage helpers every stage module may import
DISPATCHER = "stages/cli.py"  # the command, which imports each stage module when it runs
LAUNCHER = "stages/warm.py"  # the console script: the dispatcher, in a warm fork or cold


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imported_files(path: Path) -> set[str]:
    """The project files ``path`` imports directly (parent packages included)."""
    out = set()
    for name in imported_names(path):
        parts = name.split(".")
        for i in range(len(parts)):
            found = module_file(".".join(parts[: i + 1]))
            if found is not None:
                out.add(str(found.relative_to(ROOT)))
    return out


def _layer(rel: str) -> str | None:
    parts = rel.split("/")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 else None


@pytest.mark.parametrize(
    "path", _modules("pipeline"), ids=lambda p: str(p.relative_to(ROOT / "pipeline"))
)
def test_pipeline_imports_only_to_the_left(path):
    rel = str(path.relative_to(ROOT))
    own = _layer(rel)
    assert own in LAYERS or rel == "pipeline/__init__.py", f"{rel} is in no package of {LAYERS}"
    imported = _imported_files(path) - {"pipeline/__init__.py"}
    assert not [f for f in imported if f.startswith("stages/")], f"{rel} imports stages"
    wrong = sorted(f for f in imported if _layer(f) and LAYERS.index(_layer(f)) > LAYERS.index(own))
    assert not wrong, f"{rel} ({own}) imports packages to its right: {wrong}"


@pytest.mark.parametrize("path", _modules("stages"), ids=lambda p: p.name)
def test_no_stage_module_imports_another(path):
    rel = str(path.relative_to(ROOT))
    stages = {f for f in _imported_files(path) if f.startswith("stages/")}
    stages -= {"stages/__init__.py", rel}
    if rel == LAUNCHER:
        assert stages == {DISPATCHER}, f"{rel} should import only {DISPATCHER}, not {stages}"
    elif rel != DISPATCHER:
        assert stages <= SHARED, f"{rel} imports stage modules {sorted(stages - SHARED)}"
