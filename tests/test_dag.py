"""dvc.yaml stays honest: each stage's code deps are exactly the project code its command runs.

What a command runs is ``pipeline.core.code.code_files`` of its stage module and of the
modules its registry lookups import (the model of ``--model``, the encoder family of the set
or of the params' ``encoder``, the dataset sources), the same reading that the trainer's
checkpoint fingerprint hashes. Every stage of dvc.yaml is expanded as DVC expands it (matrix
items, ``${encoder}``, ``${models}``, ... from params.yaml), once for each LMM the params may
name. A file that an expansion runs and no dep covers is missing; a dep is extra when it
holds no code its stage runs: a dep that names a matrix item or the encoder in every
expansion, any other in at least one (DVC gives the stages of a matrix one dep list). A
folder dep is allowed only when every code file and data folder under it is run.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.code import ROOT, code_files, runs_code
from pipeline.data.sources import SOURCES
from pipeline.encoders import ENCODERS
from pipeline.encoders.base import BASELINE
from pipeline.features.names import encoder_stage
from pipeline.recommenders import RECOMMENDERS

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
LMMS = [PARAMS["encoder"], *(e for e in ENCODERS.names() if e not in (PARAMS["encoder"], BASELINE))]
CODE = ("pipeline/", "stages/")  # deps that are project code; the rest are data
_VAR = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _lookup(name: str, context: Mapping[str, Any]) -> Any:
    value: Any = context
    for part in name.split("."):
        value = value[part]
    return value


def interpolate(text: Any, context: Mapping[str, Any]) -> Any:
    """``text`` with DVC's ``${name}`` values from ``context`` (a whole ``${list}`` stays one)."""
    if not isinstance(text, str):
        return text
    whole = _VAR.fullmatch(text.strip())
    if whole:
        return _lookup(whole.group(1), context)
    return _VAR.sub(lambda m: str(_lookup(m.group(1), context)), text)


def expand(stage: Mapping[str, Any], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stages DVC generates from one dvc.yaml entry: each with its ``item``, ``cmd`` and
    ``deps`` interpolated (a plain stage is one, with no item)."""
    matrix = {
        key: [interpolate(v, params) for v in interpolate(values, params)]
        for key, values in (stage.get("matrix") or {}).items()
    }
    items = [dict(zip(matrix, combo, strict=True)) for combo in itertools.product(*matrix.values())]
    out = []
    for item in items:
        context = {**params, "item": item}
        cmd = " ".join(interpolate(stage["cmd"], context).split())
        out.append(
            {"item": item, "cmd": cmd, "deps": [interpolate(d, context) for d in stage["deps"]]}
        )
    return out


def looked_up(cmd: str, params: Mapping[str, Any]) -> list[str]:
    """The registry modules the stage command ``cmd`` imports by name at run time."""
    argv = shlex.split(cmd)
    command = argv[argv.index("lmmrec") + 1]
    options = dict(zip(argv[2::2], argv[3::2], strict=False))
    modules = []
    if command in ("train", "e2e"):
        modules.append(RECOMMENDERS.module(options["--model"]))
    if command in ("e2e", "finetune"):
        modules.append(ENCODERS.module(params["encoder"]))
    if command == "weights":
        modules.append(ENCODERS.module(options.get("--encoder", params["encoder"])))
    if command == "extract":
        feature_set = options["--feature-set"]
        family = BASELINE if feature_set == BASELINE else encoder_stage(feature_set)[0]
        modules.append(ENCODERS.module(family))
    if command in ("download", "preprocess"):  # any source a dataset entry may name
        modules += [SOURCES.module(name) for name in SOURCES.names()]
    return modules


def stage_module(cmd: str) -> str:
    """``lmmrec <command> ...`` runs ``stages/<command>.py``."""
    argv = shlex.split(cmd)
    return f"stages.{argv[argv.index('lmmrec') + 1]}"


def _covered(path: str, deps: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _justified(dep: str, used: set[str], root: Path) -> bool:
    """Whether ``dep`` names run code: a run file or data folder, or a folder whose every code
    file (an ``__init__.py`` that is only a docstring runs none) and data folder is run."""
    dep = dep.rstrip("/")
    if dep in used:
        return True
    folder = root / dep
    if not folder.is_dir():
        return False
    files = [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts and runs_code(p)]
    data = [p for p in folder.rglob("*") if p.is_dir() and p.name != "__pycache__"
            and not (p / "__init__.py").exists()]  # fmt: skip
    inside = [str(p.relative_to(root)) for p in (*files, *data)]
    return bool(files) and all(p in used for p in inside)


def dep_problems(
    templates: Sequence[str],
    expansions: Sequence[tuple[Sequence[str], set[str]]],
    root: Path = ROOT,
) -> tuple[list[str], list[str]]:
    """(missing, extra) for one dvc.yaml stage: ``templates`` are its code deps as written,
    ``expansions`` each generated stage's interpolated deps (in template order) and the code
    files it runs. Missing: run by an expansion, covered by none of its deps. Extra: a dep
    with ``${...}`` unjustified in some expansion, any other unjustified in all of them."""
    missing = sorted({f for deps, used in expansions for f in used if not _covered(f, deps)})
    extra = []
    for i, template in enumerate(templates):
        justified = [_justified(deps[i], used, root) for deps, used in expansions]
        if not (all(justified) if "${" in template else any(justified)):
            extra.append(template)
    return missing, extra


def stage_problems(name: str) -> tuple[list[str], list[str]]:
    """``dep_problems`` of the dvc.yaml stage ``name``, over every LMM the params may name."""
    stage = DVC[name]
    keep = [i for i, d in enumerate(stage["deps"]) if d.startswith(CODE)]
    templates = [stage["deps"][i] for i in keep]
    expansions = []
    for encoder in LMMS:
        params = {**PARAMS, "encoder": encoder}
        for generated in expand(stage, params):
            modules = (stage_module(generated["cmd"]), *looked_up(generated["cmd"], params))
            used = {str(p) for p in code_files(*modules)}
            expansions.append(([generated["deps"][i] for i in keep], used))
    return dep_problems(templates, expansions)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_deps_are_the_code_it_runs(stage):
    missing, extra = stage_problems(stage)
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {missing}"
    assert not extra, f"{stage}: deps in dvc.yaml that it does not run: {extra}"


def test_registry_modules_are_named_after_their_entries():
    """dvc.yaml names a model's or family's file after it (``recommenders/${item.model}.py``)."""
    for registry in (RECOMMENDERS, ENCODERS, SOURCES):
        for name in registry.names():
            assert registry.module(name) == f"{registry.package}.{name}"


@pytest.fixture
def tree(tmp_path) -> Path:
    """A tiny project: pkg/ with a docstring-only __init__.py, a.py, b.py and data/."""
    (tmp_path / "pkg" / "data").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text('"""A package."""\n')
    for name in ("a", "b"):
        (tmp_path / "pkg" / f"{name}.py").write_text("x = 1\n")
    return tmp_path


def test_a_file_run_but_not_listed_is_missing(tree):
    used = {"pkg/a.py", "pkg/b.py"}
    assert dep_problems(["pkg/a.py"], [(["pkg/a.py"], used)], tree) == (["pkg/b.py"], [])


def test_a_listed_file_not_run_is_extra(tree):
    deps = ["pkg/a.py", "pkg/b.py"]
    assert dep_problems(deps, [(deps, {"pkg/a.py"})], tree) == ([], ["pkg/b.py"])


def test_a_folder_is_a_dep_only_when_all_its_code_and_data_run(tree):
    everything = {"pkg/a.py", "pkg/b.py", "pkg/data"}
    assert dep_problems(["pkg"], [(["pkg"], everything)], tree) == ([], [])
    assert dep_problems(["pkg"], [(["pkg"], everything - {"pkg/data"})], tree) == ([], ["pkg"])
    assert dep_problems(["pkg"], [(["pkg"], {"pkg/a.py"})], tree) == ([], ["pkg"])


def test_matrix_deps_per_item_and_shared(tree):
    templates = ["pkg/${item.m}.py", "pkg/data"]
    per_item = [
        (["pkg/a.py", "pkg/data"], {"pkg/a.py", "pkg/data"}),
        (["pkg/b.py", "pkg/data"], {"pkg/b.py"}),
    ]
    assert dep_problems(templates, per_item, tree) == ([], [])  # data: run by one item
    wrong = [(["pkg/a.py", "pkg/data"], {"pkg/b.py"}), (["pkg/b.py", "pkg/data"], {"pkg/b.py"})]
    assert dep_problems(templates, wrong, tree) == (["pkg/b.py"], ["pkg/${item.m}.py", "pkg/data"])


def test_the_real_stages_fail_on_a_dropped_or_an_added_dep(monkeypatch):
    """train without its model's file misses it; weights with a recommender gains an extra."""
    train = {**DVC["train"], "deps": [d for d in DVC["train"]["deps"] if "${item.model}" not in d]}
    weights = {**DVC["weights"], "deps": [*DVC["weights"]["deps"], "pipeline/recommenders/bpr.py"]}
    monkeypatch.setitem(DVC, "train", train)
    monkeypatch.setitem(DVC, "weights", weights)
    missing, _ = stage_problems("train")
    assert "pipeline/recommenders/vbpr.py" in missing
    _, extra = stage_problems("weights")
    assert extra == ["pipeline/recommenders/bpr.py"]


def test_bytecode_caches_do_not_change_a_folder_dep(tmp_path, monkeypatch):
    """A folder dep such as pipeline/data/demo holds `__pycache__/` once Python imports it
    without PYTHONDONTWRITEBYTECODE; the project's .dvcignore keeps that out of its hash, so
    `dvc status` stays clean after a `dvc repro` that imported the code."""
    from dvc.repo import Repo

    (tmp_path / ".dvcignore").write_text((ROOT / ".dvcignore").read_text())
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    repo = Repo.init(str(tmp_path), no_scm=True)
    repo.stage.add(name="use", cmd="echo ran > out.txt", deps=["pkg"], outs=["out.txt"])
    repo.reproduce("use")
    assert repo.status() == {}
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (package / "mod.pyc").write_bytes(b"\x00" * 16)
    assert repo.status() == {}
    (package / "other.py").write_text("Y = 2\n")  # real code still counts
    assert "use" in repo.status()
