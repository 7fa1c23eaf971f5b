"""benchmarks/cost_table.py: its raw files go through the real preprocess, and its device
projections are the FLOP arithmetic the README states."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost_table  # noqa: E402
from synthetic import Size  # noqa: E402


def test_raw_files_preprocess_to_their_size(tmp_path: Path) -> None:
    """The synthetic raw Amazon-2014 files of a size are read whole by preprocess."""
    size = Size("baby", users=100, items=50, interactions=800)  # seed 0: already 5-core
    cost_table.write_raw(size, tmp_path / "raw", seed=0)
    result = cost_table.preprocess_worker("baby", tmp_path / "raw", tmp_path / "out", seed=0)
    assert result["review_lines"] == size.interactions
    assert result["kept"] == "100 users, 50 items, 800 interactions"


def test_projections_count_forward_and_backward() -> None:
    """Backward = 2 x forward; e2e trains the suffix on each step's items, then refreshes."""
    flops = {"extract": 10.0, "pair": 20.0, "prefix": 4.0, "suffix": 6.0, "holdout": 0.1}
    total = cost_table.projections(flops, n_items=100, e2e_items=250)
    assert total == {
        "extract": 1000.0,
        "finetune": 3 * 90 * 20.0 + 10 * 10.0,
        "e2e": 3 * 250 * 6.0 + 100 * 6.0,
        "prefix": 400.0,
    }
    assert cost_table.device_seconds(2e12, tflops=10, utilisation=0.5) == pytest.approx(0.4)
