"""dvc.yaml stays honest: every stage depends on all the library code its command imports."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    for path in (
        ROOT / (name.replace(".", "/") + ".py"),
        ROOT / name.replace(".", "/") / "__init__.py",
    ):
        if path.exists():
            return path
    return None


def _imports(path: Path, seen: set[Path]) -> set[Path]:
    """Every project file ``path`` imports, directly or not (lazy imports and the modules a
    package's registry discovers included)."""
    if path in seen:
        return seen
    seen.add(path)
    if path.name == "__init__.py":  # registries import every module of their package
        for module in sorted(path.parent.glob("*.py")):
            _imports(module, seen)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            target = _module_file(name) if name.split(".")[0] in ("pipeline", "stages") else None
            if target is not None:
                _imports(target, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_deps_cover_the_code_it_imports(stage):
    command = DVC[stage]["cmd"].split()
    module = command[command.index("lmmrec") + 1]
    declared = [d.rstrip("/") for d in DVC[stage]["deps"]]
    used = _imports(ROOT / "stages" / f"{module}.py", set())
    package_inits = {ROOT / "pipeline/__init__.py", ROOT / "stages/__init__.py"}

    def covered(path: Path) -> bool:
        rel = str(path.relative_to(ROOT))
        return any(rel == d or rel.startswith(d + "/") for d in declared)

    missing = sorted(str(p.relative_to(ROOT)) for p in used - package_inits if not covered(p))
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {missing}"
