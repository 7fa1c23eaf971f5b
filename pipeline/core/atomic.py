"""Write outputs so that an interrupted run never leaves a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it onto ``path`` on success.

    Works for files and folders. On error the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = _tmp_sibling(path)
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def replaced_folder(
    path: str | Path, outputs: Collection[str], write: bool = True
) -> Iterator[Path]:
    """Yield a new, empty folder to write the entries named ``outputs`` into; once the block
    succeeds it replaces the folder ``path`` as a whole, so a stage's outputs all come from one
    run. If the block fails it is removed and ``path`` stays exactly as it was.

    The old folder's hidden entries (DVC's ``.gitignore``) are copied over. A ``path`` with
    visible entries other than ``outputs`` is refused before the block runs, so a mistyped
    folder is never emptied. A process that writes nothing (``write`` false: not rank 0 under
    torchrun) gets ``path`` itself and changes nothing.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectoryError(f"{path} is a file or a link: give a folder for the outputs")
    foreign = sorted(e.name for e in _entries(path) if not _hidden(e) and e.name not in outputs)
    if foreign:
        raise FileExistsError(
            f"{path} holds {foreign[:5]}, which this stage does not write; its outputs replace "
            "the whole folder: give an empty or new folder, or one this stage wrote"
        )
    if not write:
        yield path
        return
    with atomic_path(path) as tmp:
        tmp.mkdir()
        yield tmp
        for entry in _entries(path):
            if _hidden(entry) and not (tmp / entry.name).exists():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _hidden(entry: Path) -> bool:
    return entry.name.startswith(".")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
