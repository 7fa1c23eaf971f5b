from dataclasses import dataclass

import pytest

from stages.params import ParamsError, build, load_params, require


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


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ParamsError, match=r"train\.epochz.*allowed in train: \['lr', 'epochs'"):
        build(Knobs, {"epochz": 3}, "train")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"epochs": 2.5}, r"train\.epochs = 2\.5 should be an integer"),
        ({"epochs": True}, r"train\.epochs = True should be an integer"),
        ({"lr": "fast"}, r"train\.lr = 'fast' should be a number"),
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
    with pytest.raises(ParamsError, match=r"dataset = 'bbay' is not allowed; allowed: \['baby'"):
        require(params, "dataset", ["demo", "baby"])
    with pytest.raises(ParamsError, match="missing key 'a.c'"):
        require(params, "a.c")


def test_project_params_file_is_valid(monkeypatch):
    from pathlib import Path

    params = load_params(Path(__file__).parents[1] / "params.yaml")
    assert params["dataset"] == "demo"
    assert params["eval"]["topk"] == [10, 20, 50]
