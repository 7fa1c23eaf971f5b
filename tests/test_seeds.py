"""Training seeds as a DVC axis: each seed its own run folder, the data split fixed."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tables import interactions_table

from pipeline.data.schemas import INTERACTIONS, seed_folder, write_table
from pipeline.training.trainer import MODEL_FILE, TrainConfig
from stages import train
from stages.params import train_config, training_seeds

ROOT = Path(__file__).parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def params(**changes) -> dict:
    loaded = yaml.safe_load((ROOT / "params.yaml").read_text())
    loaded["train"].update(max_epochs=2, batch_size=64, device="cpu")
    loaded["eval"]["topk"] = [10, 20]
    return {**loaded, **changes}


def test_the_training_seed_is_the_option_else_the_first_of_seeds():
    assert train_config(TrainConfig, params(seeds=[7, 8])).seed == 7
    assert train_config(TrainConfig, params(seeds=[7, 8]), seed=8).seed == 8
    without = params()
    without.pop("seeds")
    assert train_config(TrainConfig, without).seed == without["seed"]
    assert training_seeds(without) == [without["seed"]]


@pytest.fixture(scope="module")
def interactions(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    users, items, splits = [], [], []
    for u in range(40):
        users += [u] * 8
        items += rng.choice(30, 8, replace=False).tolist()
        splits += ["train"] * 6 + ["valid", "test"]
    path = tmp_path_factory.mktemp("seeds") / "interactions.parquet"
    write_table(interactions_table(users, items, splits), path, INTERACTIONS, "interactions")
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / MODEL_FILE, weights_only=True)


def test_each_seed_trains_its_own_run_and_a_seed_repeats_exactly(interactions, tmp_path):
    runs = {}
    for name, seed in (("a", 2022), ("b", 2023), ("c", 2022)):
        out = tmp_path / name / seed_folder(seed)
        train.run(params(), "bpr", "id", interactions, None, out, seed=seed)
        runs[name] = _weights(out)
    assert all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])


@pytest.mark.parametrize("stage", ["train", "train_id", "e2e"])
def test_training_stages_run_over_the_seeds_into_per_seed_folders(stage):
    spec = DVC[stage]
    assert spec["matrix"]["seed"] == ("${e2e_seeds}" if stage == "e2e" else "${seeds}")
    assert "--seed ${item.seed}" in spec["cmd"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"] + spec["metrics"]]
    assert all("/seed-${item.seed}/" in o for o in outs), outs
    # the global seed fixes the data split, not the run: a new seed must not re-run the others
    assert "seed" not in spec["params"] and "seeds" not in spec["params"]


def test_e2e_warm_starts_from_the_same_seed_s_run():
    assert "/${item.model}/seed-${item.seed}/model.pt" in DVC["e2e"]["cmd"]
