import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.params import ParamsError, build, require
from stages.schema import load_params, validate

ROOT = Path(__file__).parents[1]
PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text())


@dataclass(frozen=True)
class Knobs:
    lr: float = 1e-3
    epochs: int = 3
    topk: tuple[int, ...] = (10, 20)
    name: str = "x"
    flag: bool = False


def test_build_fills_defaults_and_coerces_ints_to_floats():
    cfg = build(Knobs, {"lr": 1, "topk": [5]}, "train")
    assert cfg == Knobs(lr=1.0, epochs=3, topk=(5,), name="x", flag=False)
    assert isinstance(cfg.lr, float)


def test_unknown_key_names_it_suggests_the_closest_and_lists_allowed():
    with pytest.raises(
        ParamsError, match=r"train\.epochz \(did you mean 'epochs'\?\); allowed in train: \['lr'"
    ):
        build(Knobs, {"epochz": 3}, "train")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"epochs": 2.5}, r"train\.epochs = 2\.5 should be an integer"),
        ({"epochs": True}, r"train\.epochs = True should be an integer"),
        ({"epochs": "1e3"}, r"train\.epochs = '1e3' should be an integer"),
        ({"lr": "fast"}, r"train\.lr = 'fast' should be a number"),
        ({"lr": "1e-3x"}, r"train\.lr = '1e-3x' should be a number"),
        ({"lr": "nan"}, r"train\.lr = 'nan' should be a number"),
        ({"topk": 10}, r"train\.topk = 10 should be a list"),
        ({"flag": "yes"}, r"train\.flag = 'yes' should be true or false"),
    ],
)
def test_bad_values_name_the_key(bad, match):
    with pytest.raises(ParamsError, match=match):
        build(Knobs, bad, "train")


def test_require_checks_allowed_values():
    params = {"dataset": "bbay", "a": {"b": 1}}
    assert require(params, "a.b") == 1
    with pytest.raises(ParamsError, match=r"dataset = 'bbay' is not allowed \(did you mean 'baby'"):
        require(params, "dataset", ["demo", "baby"])
    with pytest.raises(ParamsError, match="missing key 'a.c'"):
        require(params, "a.c")


def test_project_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params == PROJECT  # nothing to normalise: the mapping as written


def params_file(tmp_path: Path, change=None, name: str = "other.yaml") -> Path:
    """The project's params, changed in place by ``change``, written to ``tmp_path / name``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if change is not None:
        change(params)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params))
    return path


def cli_error(*args: object) -> str:
    """Run the CLI, expecting it to fail with one error line; return the output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    return result.output


def test_unknown_section_is_rejected_with_the_closest_name(tmp_path):
    path = params_file(tmp_path, lambda p: p.update(traing=p.pop("train")))
    out = tmp_path / "raw"
    error = cli_error("download", "--out", out, "--params", path)
    assert f"{path}: unknown top-level key(s) 'traing' (did you mean 'train'?)" in error
    assert not out.exists()  # the demo shop is never generated


def test_misspelt_model_name_is_rejected_before_any_stage_work(tmp_path):
    path = params_file(tmp_path, lambda p: p.update(models=["vbpr", "mmgcm"]))
    out = tmp_path / "raw"
    error = cli_error("download", "--out", out, "--params", path)
    assert "models[1]: 'mmgcm' is not a registered recommender (did you mean 'mmgcn'?)" in error
    assert not out.exists()


def test_models_and_id_models_follow_the_registry():
    with pytest.raises(ParamsError, match=r"models\[1\]: 'bpr' is ID-only: list it in id_models"):
        validate({**PROJECT, "models": ["vbpr", "bpr"]})
    with pytest.raises(ParamsError, match=r"id_models\[0\]: 'vbpr' reads item features"):
        validate({**PROJECT, "id_models": ["vbpr"]})
    with pytest.raises(ParamsError, match="lists a model twice"):
        validate({**PROJECT, "models": ["vbpr", "vbpr"]})


def test_floats_written_as_yaml_1_1_strings_are_read_as_floats(tmp_path):
    from pipeline.training.trainer import TrainConfig
    from stages.params import train_config

    def change(params):
        params["train"]["lr"] = "LR"
        params["recommenders"]["vbpr"]["reg_weight"] = "REG"

    path = params_file(tmp_path, change)
    text = (
        path.read_text()
        .replace("lr: LR", "lr: 1e-3")
        .replace("reg_weight: REG", "reg_weight: 5e-4")
    )
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"  # YAML 1.1 reads it as a string
    params = load_params(path)
    assert params["train"]["lr"] == 0.001 and isinstance(params["train"]["lr"], float)
    assert train_config(TrainConfig, params).lr == 0.001
    assert params["recommenders"]["vbpr"]["reg_weight"] == 0.0005


def test_messages_name_the_params_file_read(tmp_path):
    path = params_file(tmp_path, lambda p: p["train"].update(lr="fast"))
    error = cli_error("download", "--out", tmp_path / "raw", "--params", path)
    assert f"{path}: train.lr = 'fast' should be a number" in error
    assert "params.yaml" not in error


def test_a_bad_train_setting_is_rejected_before_the_data_are_read(tmp_path):
    path = params_file(tmp_path, lambda p: p["train"].update(batch_sise=64))
    missing = tmp_path / "no" / "interactions.parquet"
    args = ["train", "--model", "bpr", "--feature-set", "id", "--interactions", missing]
    error = cli_error(*args, "--out", tmp_path / "bpr", "--params", path)
    assert "train.batch_sise (did you mean 'batch_size'?)" in error
    assert "interactions.parquet" not in error
    assert not (tmp_path / "bpr").exists()


def _set(*keys_value):
    """A change that sets the nested key ``keys`` to ``value`` in the params mapping."""
    *keys, last, value = keys_value

    def change(params):
        for key in keys:
            params = params.setdefault(key, {})
        params[last] = value

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (_set("dataset", "bbay"), r"dataset = 'bbay' is not allowed \(did you mean 'baby'\?\)"),
        (_set("encoder", "clap"), r"encoder = 'clap' is not allowed \(did you mean 'clip'\?\)"),
        (_set("seeds", []), r"seeds = \[\]; list at least one training seed"),
        (_set("seeds", [1, 1]), r"seeds = \[1, 1\] repeats a seed"),
        (_set("seeds", [1, "2"]), r"seeds\[1\] = '2' should be an integer"),
        (_set("e2e_seeds", [9]), r"e2e_seeds \[9\] not in seeds \[2022, 2023\]: e2e warm-starts"),
        (_set("e2e_seeds", []), r"e2e_seeds = \[\]; list at least one"),
        (_set("train", "seed", 7), r"train\.seed cannot be set here: the training seeds are"),
        (_set("train", "valid_metric", "recall@30"), r"train: valid_metric = 'recall@30'"),
        (_set("preprocess", "seed", 7), r"preprocess\.seed cannot be set here"),
        (_set("eval", "topk", [10, 10]), r"eval: topk = \[10, 10\]; use distinct"),
        (_set("demo", "n_items", 0), r"demo: n_items = 0 must be >= 1"),
        (_set("clip", "arch", None), r"clip\.arch = None should be a string"),
        (_set("recommenders", "vbrp", {}), r"recommenders: 'vbrp' is not a registered .*'vbpr'"),
        (
            _set("recommenders", "vbpr", "embeding_size", 8),
            r"recommenders\.vbpr\.embeding_size \(did you mean 'embedding_size'",
        ),  # fmt: skip
        (
            _set("recommenders", "vbpr", "embedding_size", 0),
            r"recommenders\.vbpr: embedding_size = 0",
        ),  # fmt: skip
        (
            _set("recommenders", "mmgcn", "train", "batch_size", 0),
            r"recommenders\.mmgcn\.train: batch_size = 0",
        ),  # fmt: skip
        (
            _set("recommenders", "mmgcn", "train", "seed", 1),
            r"recommenders\.mmgcn\.train\.seed cannot be set",
        ),  # fmt: skip
        (_set("finetune", "vlmo", "lr", "fast"), r"finetune\.vlmo\.lr = 'fast' should be a number"),
        (_set("finetune", "vlmo", "lrr", 1.0), r"finetune\.vlmo\.lrr \(did you mean 'lr'\?\)"),
        (_set("e2e", "vlmo", "freeze_layers", -1), r"e2e\.vlmo: freeze_layers = -1"),
        (_set("e2e", "vlmo", "train", {}), r"e2e\.vlmo\.train"),
        (_set("e2e", "train", "patience", -1), r"e2e\.train: patience = -1"),
        (_set("e2e", "recommenders", "bpr", {}), r"e2e\.recommenders: 'bpr' is ID-only"),
        (
            _set("e2e", "recommenders", "lattice", "knn_k", "x"),
            r"e2e\.recommenders\.lattice\.knn_k = 'x' should be an integer",
        ),  # fmt: skip
        (
            _set("e2e", "recommenders", "lattice", "train", "max_epochs", 0),
            r"e2e\.recommenders\.lattice\.train: max_epochs = 0",
        ),  # fmt: skip
    ],
)
def test_every_section_and_override_is_checked(tmp_path, change, match):
    path = params_file(tmp_path, change)
    with pytest.raises(ParamsError, match=f"^{path}: .*{match}"):
        load_params(path)


def test_seeds_is_optional_and_a_list_of_distinct_integers(tmp_path):
    def three(p):
        p.update(seeds=[3, 1, 2], e2e_seeds=[1])

    params = load_params(params_file(tmp_path, three))
    assert params["seeds"] == [3, 1, 2] and params["e2e_seeds"] == [1]

    def one_seed(p):
        p.pop("seeds", None)
        p["e2e_seeds"] = [p["seed"]]  # e2e's seeds among the default [seed]

    assert "seeds" not in load_params(params_file(tmp_path, one_seed, name="no-seeds.yaml"))


def test_missing_file_section_or_key_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found: run from the project root or pass --params"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match=r"missing section 'eval'"):
        load_params(params_file(tmp_path, lambda p: p.pop("eval")))
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['seed'\]"):
        load_params(params_file(tmp_path, lambda p: p.pop("seed")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=f"{bad} is not valid YAML"):
        load_params(bad)


def test_checking_params_imports_no_encoder_or_statistics_library():
    # every stage checks the whole file first: open_clip and torchvision (~2.5 s together)
    # and scipy.stats (~0.7 s) would be paid by each of the ~50 demo stages, most of which
    # never encode an image and none of which but the report tests anything
    code = (
        "import sys; from stages.schema import load_params; load_params('params.yaml'); "
        "print(sorted(m for m in ('open_clip', 'torchvision', 'scipy.stats') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
