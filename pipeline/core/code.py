"""The project's code a module runs, read from its imports: what a stage's DVC deps must name
and what the trainer's checkpoint fingerprint hashes.

Importing ``a.b.c`` runs ``a/__init__.py``, ``a/b/__init__.py`` and ``a/b/c.py``, and then
whatever those import, at the top or inside a function (a function's import runs when it is
called, which a static reading cannot rule out); imports under ``if TYPE_CHECKING:`` never run.
An ``__init__.py`` holding only its docstring runs no code and is left out. A registry's lookup
(``get_recommender("vbpr")``) imports a module by name at run time, which no import statement
shows: name the looked-up modules beside the module that looks them up. A module that reads a
folder of data beside itself (``Path(__file__).parent / "clip_configs"``) adds that folder.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: pipeline/ and stages/ live here
PACKAGES = ("pipeline", "stages")  # the top-level packages that are the project's own code


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of the project module ``name`` (a module or a package's ``__init__.py``), or
    None for a name that is not one (a class or function imported from a module, another
    distribution's module)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _type_checking(node: ast.AST) -> bool:
    """Whether ``node`` is ``if TYPE_CHECKING:`` (its body never runs)."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node``, except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        for kept in child.orelse if _type_checking(child) else [child]:
            yield kept
            yield from _nodes(kept)


def imported_names(path: Path) -> list[str]:
    """The dotted names the module at ``path`` imports that may be modules, in order: for
    ``from a.b import c`` both ``a.b`` and ``a.b.c``; none under ``if TYPE_CHECKING:``."""
    names = []
    for node in _nodes(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _data_folders(path: Path) -> list[Path]:
    """The folders next to the module at ``path`` that it names as
    ``Path(__file__).parent / "<folder>"``."""
    found = []
    for node in ast.walk(_tree(path)):
        if not (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant)
            and isinstance(node.right.value, str)
            and isinstance(node.left, ast.Attribute)
            and node.left.attr == "parent"
            and isinstance(node.left.value, ast.Call)
            and any(
                isinstance(arg, ast.Name) and arg.id == "__file__" for arg in node.left.value.args
            )
        ):
            continue
        folder = path.parent / node.right.value
        if folder.is_dir():
            found.append(folder)
    return found


def runs_code(path: Path) -> bool:
    """False for an ``__init__.py`` whose body is its docstring alone."""
    body = _tree(path).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return path.name != "__init__.py" or bool(body)


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def code_files(*modules: str, root: Path = ROOT) -> list[Path]:
    """The project files importing ``modules`` runs, transitively, and the data folders they
    read beside themselves; sorted, relative to ``root``. Registry lookups are not imports:
    name the looked-up modules among ``modules`` (see the module docstring)."""
    seen: set[Path] = set()
    found: set[Path] = set()
    todo = [parent for name in modules for parent in _with_parents(name)]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        if runs_code(path):
            found.add(path)
        found.update(_data_folders(path))
        todo += [parent for name in imported_names(path) for parent in _with_parents(name)]
    return sorted(p.relative_to(root) for p in found)
