"""Multi-process extraction, fine-tuning and end-to-end training under torchrun (2 CPU
processes, gloo) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from graphs import clustered_table
from tables import make_items

from pipeline.core.distributed import World, gather_rows
from pipeline.encoders import load_encoder
from pipeline.encoders.clip import ClipEncoder
from pipeline.features.store import read_feature_store

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_cover_every_item_once_in_order(n, size):
    shards = [World(rank, size).shard(n) for rank in range(size)]
    covered = [i for s in shards for i in range(n)[s]]
    assert covered == list(range(n))
    lengths = [s.stop - s.start for s in shards]
    assert max(lengths) - min(lengths) <= 1


def test_one_process_gathers_to_itself():
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert gather_rows(rows, World(), 6) is rows


def _lmmrec(args: list[str], nproc: int) -> None:
    """Run `lmmrec <args>` in one process or under torchrun with ``nproc`` processes."""
    launcher = [sys.executable, "-m", "stages.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "stages.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _extract(tmp_path: Path, out: str, nproc: int) -> Path:
    """`lmmrec extract` on the test items, in one process or under torchrun with ``nproc``."""
    args = [
        "extract",
        "--feature-set",
        "clip-pretrained",
        "--items",
        str(tmp_path / "items.parquet"),
    ]
    _lmmrec([*args, "--weights", str(tmp_path / "weights"), "--out", str(tmp_path / out)], nproc)
    return tmp_path / out


def test_two_process_extract_matches_one_process(tmp_path):
    pq.write_table(make_items(23), tmp_path / "items.parquet")  # 23: unequal shards (12 + 11)
    torch.manual_seed(0)
    ClipEncoder.tiny().save(tmp_path / "weights")
    single = read_feature_store(_extract(tmp_path, "one", 1))
    double = read_feature_store(_extract(tmp_path, "two", 2))
    assert double.item_ids.tolist() == single.item_ids.tolist() == list(range(23))
    np.testing.assert_allclose(double.image, single.image, atol=1e-5)
    np.testing.assert_allclose(double.text, single.text, atol=1e-5)
    assert double.metadata["weights_sha256"] == single.metadata["weights_sha256"]


def _world_files(tmp_path: Path, **sections: dict) -> Path:
    """Test items, interactions, tiny CLIP weights and a params.yaml with ``sections``
    replacing the repository's; returns the params file."""
    pq.write_table(make_items(24), tmp_path / "items.parquet")
    pq.write_table(clustered_table(30, 24, 6, 3), tmp_path / "interactions.parquet")
    torch.manual_seed(0)
    ClipEncoder.tiny().save(tmp_path / "weights")
    params = {**yaml.safe_load((ROOT / "params.yaml").read_text()), **sections}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def _close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)


def test_two_process_e2e_matches_one_process(tmp_path):
    # two micro-batches a step: one process takes both, or each of two processes takes one
    train = {"max_epochs": 2, "batch_size": 32, "grad_accum": 2, "patience": 5,
             "valid_metric": "recall@10"}  # fmt: skip
    e2e = {"encoder_lr": 0.001, "freeze_layers": 1, "warm_start": False, "train": train}
    params = _world_files(tmp_path, e2e=e2e, eval={"topk": [5, 10, 20]})
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        args = ["e2e", "--model", "vbpr", "--items", str(tmp_path / "items.parquet"),
                "--interactions", str(tmp_path / "interactions.parquet"),
                "--weights", str(tmp_path / "weights"), "--out", str(out),
                "--params", str(params)]  # fmt: skip
        _lmmrec(args, nproc)
        runs[nproc] = out
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    for key in ("recall@10", "ndcg@10", "valid_recall@10"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert (one["best_epoch"], one["epochs"]) == (two["best_epoch"], two["epochs"])
    _close_states(*(torch.load(runs[n] / "model.pt", weights_only=True) for n in (1, 2)))
    encoders = [load_encoder(runs[n] / "encoder").state_dict() for n in (1, 2)]
    _close_states(*encoders)
    start = load_encoder(tmp_path / "weights").state_dict()
    assert not torch.equal(encoders[1]["model.visual.proj"], start["model.visual.proj"])


def test_two_process_finetune_matches_one_process(tmp_path):
    finetune = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 0.001, "warmup_steps": 1,
                "holdout": 0.2, "patience": 0}  # fmt: skip
    params = _world_files(tmp_path, finetune=finetune)
    states = []
    for nproc in (1, 2):
        out = tmp_path / f"ft{nproc}"
        args = ["finetune", "--items", str(tmp_path / "items.parquet"),
                "--weights", str(tmp_path / "weights"), "--out", str(out), "--metrics",
                str(tmp_path / f"ft{nproc}.json"), "--params", str(params)]  # fmt: skip
        _lmmrec(args, nproc)
        states.append(load_encoder(out).state_dict())
    _close_states(*states)
    start = load_encoder(tmp_path / "weights").state_dict()
    assert not torch.equal(states[1]["model.visual.proj"], start["model.visual.proj"])
