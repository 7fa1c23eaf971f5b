"""A stage run again on the same inputs writes the same bytes: no wall-clock time reaches a
DVC output, so a re-run leaves everything downstream up to date."""

from pathlib import Path

import pytest
from test_stages import invoke, tiny_params


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by its path relative to it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_bytes(first: Path, second: Path) -> None:
    """The two folders hold the same files with the same bytes (naming the ones that differ)."""
    a, b = folder_bytes(first), folder_bytes(second)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


@pytest.mark.parametrize("encoder", ["clip", "cnn_st"])
def test_weights_stage_writes_the_same_bytes_twice(encoder, tmp_path):
    smaller = {  # two steps of 16 pairs in each pretraining
        "pretrain_corpus.n_pairs": 40,
        "weights.batch_size": 16,
        "cnn_weights.batch_size": 16,
        "cnn_weights.holdout_pairs": 8,
    }
    params = tiny_params(tmp_path, **smaller)
    for run in ("first", "second"):
        invoke("weights", "--encoder", encoder, "--out", tmp_path / run, "--params", params)
    assert (tmp_path / "first" / "pretrain_history.json").is_file()
    assert_same_bytes(tmp_path / "first", tmp_path / "second")
