"""Multi-process extraction under torchrun (2 CPU processes, gloo) against one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tables import make_items

from pipeline.distributed import World, gather_rows
from pipeline.encoders.clip import ClipEncoder
from pipeline.features import read_feature_store

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


def _extract(tmp_path: Path, out: str, nproc: int) -> Path:
    """`lmmrec extract` on the test items, in one process or under torchrun with ``nproc``."""
    args = [
        "extract",
        "--feature-set",
        "clip-pretrained",
        "--items",
        str(tmp_path / "items.parquet"),
    ]
    args += ["--weights", str(tmp_path / "weights"), "--out", str(tmp_path / out)]
    launcher = [sys.executable, "-m", "stages.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "stages.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
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
