"""Image-text alignment measures, and the `features neighbours` / `features compare` commands."""

import math

import numpy as np
import pytest
from tables import imageless_items
from typer.testing import CliRunner

from pipeline.data.schemas import ITEMS, write_table
from pipeline.features.alignment import alignment, separate_spaces
from pipeline.features.store import write_feature_store
from stages.cli import app

ANGLES = np.array([0.0, 0.1, 0.3, 1.5, 3.0])  # items 10..14 as 2-d unit vectors
META = {"encoder": "test", "arch": "none", "pretrained": "none", "weights_sha256": "0"}


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_hand_computed_case():
    """image = e1, e2, e3; text = e1, e2, (2 e1 + e3) / sqrt(5): cosines by hand."""
    image = np.eye(3, dtype=np.float32) * np.array([[2.0], [0.5], [3.0]], np.float32)  # scaled
    text = np.array([[1, 0, 0], [0, 1, 0], [2, 0, 1]], dtype=np.float32)  # not normalised
    out = alignment(image, text, ks=(1, 2))
    s5 = math.sqrt(5)
    assert out["n_items"] == 3
    assert out["matched_cos"] == pytest.approx((2 + 1 / s5) / 3)
    assert out["mismatched_cos"] == pytest.approx((2 / s5) / 6)  # one non-zero of six pairs
    assert out["gap"] == pytest.approx(out["matched_cos"] - out["mismatched_cos"])
    # image 0 prefers its own text (1 > 0.89); text 2 prefers image 0 (0.89) over image 2 (0.45)
    assert (out["i2t_r1"], out["i2t_r2"]) == (1.0, 1.0)
    assert out["t2i_r1"] == pytest.approx(2 / 3) and out["t2i_r2"] == 1.0


def test_identical_vectors_retrieve_perfectly():
    vectors = unit_rows(40, 16, 0)
    out = alignment(vectors, vectors)
    assert out["matched_cos"] == pytest.approx(1.0)
    assert out["i2t_r1"] == out["t2i_r1"] == out["i2t_r10"] == out["t2i_r10"] == 1.0
    assert out["gap"] > 0.8

    same = alignment(np.ones((3, 2)), np.full((3, 2), 5.0))  # every pair ties with the true one
    assert same["i2t_r1"] == same["t2i_r1"] == 1.0
    assert same["gap"] == pytest.approx(0.0, abs=1e-7)


def test_shuffled_pairing_retrieves_nothing_and_gap_sign_follows_the_pairing():
    image = unit_rows(60, 32, 1)
    derangement = np.roll(np.arange(60), 1)
    text = image[derangement]  # text i is image i-1's vector: every true pair is beaten
    out = alignment(image, text)
    assert out["i2t_r1"] == out["t2i_r1"] == 0.0
    assert out["i2t_r10"] < 0.5 and out["t2i_r10"] < 0.5
    assert out["gap"] < 0  # the one perfect pair per row sits among the mismatched pairs

    noisy = image + 0.3 * unit_rows(60, 32, 2)
    assert alignment(image, noisy)["gap"] > 0.5
    assert alignment(image, -image)["gap"] < 0


def test_mismatched_mean_and_recall_match_the_full_matrix():
    image, text = unit_rows(50, 8, 3), unit_rows(50, 8, 4) + 0.5 * unit_rows(50, 8, 3)
    unit_text = text / np.linalg.norm(text, axis=1, keepdims=True)
    sims = image.astype(np.float64) @ unit_text.T
    off_diagonal = sims[~np.eye(50, dtype=bool)].mean()
    expected = {}
    for direction, s in (("i2t", sims), ("t2i", sims.T)):
        beaten_by = (s > np.diag(s)[:, None]).sum(axis=1)
        expected |= {f"{direction}_r{k}": (beaten_by < k).mean() for k in (1, 5)}
    for block_elements in (1, 7 * 50, 1 << 24):  # one row, seven rows, all rows per block
        out = alignment(image, text, ks=(1, 5), block_elements=block_elements)
        assert out["mismatched_cos"] == pytest.approx(off_diagonal, abs=1e-6)
        assert out["matched_cos"] == pytest.approx(np.diag(sims).mean(), abs=1e-6)
        for key, value in expected.items():
            assert out[key] == pytest.approx(value)


def test_bad_input_is_named():
    good = unit_rows(4, 3, 0)
    with pytest.raises(ValueError, match=r"one shape \[N, D\]; got \(4, 3\) and \(4, 2\)"):
        alignment(good, good[:, :2])
    with pytest.raises(ValueError, match="at least 2 items"):
        alignment(good[:1], good[:1])
    with pytest.raises(ValueError, match=r"positive integers, got \[1, 0\]"):
        alignment(good, good, ks=(1, 0))
    bad = good.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        alignment(good, bad)


def test_separate_spaces():
    assert separate_spaces({}, 512, 512) is None
    assert separate_spaces({}, 4096, 384) == "image 4096-d vs text 384-d"
    assert separate_spaces({"aligned": False}, 384, 384) == "metadata says aligned: false"
    assert separate_spaces({"aligned": True}, 512, 512) is None


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """features/tiny/{same, cnn, split} and data/processed/tiny/items.parquet, ids 0..4."""
    root = tmp_path_factory.mktemp("project")
    ids = np.arange(5)
    image = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1).astype(np.float32)
    text = image[[4, 3, 2, 1, 0]]  # text: 0's nearest are 1, 2, 3, 4 counted from 4
    features = root / "features" / "tiny"
    write_feature_store(features / "same", ids, image, image, {**META, "normalized": True})
    write_feature_store(features / "swap", ids, image, text, {**META, "normalized": True})
    write_feature_store(
        features / "cnn", ids, unit_rows(5, 6, 0), unit_rows(5, 4, 1), {**META, "normalized": True}
    )
    write_feature_store(
        features / "split",
        ids,
        image * 3,
        text,
        {**META, "normalized": False, "aligned": False},
    )
    (features / ".same.tmp-0123abcd").mkdir()  # a leftover temporary is not a feature set
    items = imageless_items(ids)
    write_table(items, root / "data/processed/tiny/items.parquet", ITEMS, "items")
    return root


def cli(root, *args):
    return CliRunner().invoke(app, ["features", *map(str, args), "--root", str(root)])


def test_neighbours_lists_both_modalities_with_titles(project):
    result = cli(project, "neighbours", "tiny", "swap", 0, "-k", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("item 0: Title 0")
    assert lines[1] == "nearest by image (cosine):"
    assert [ln.split()[1] for ln in lines[2:5]] == ["1", "2", "3"]
    assert lines[2].split()[2] == f"{math.cos(0.1):.4f}" and lines[2].endswith("  Title 1")
    assert lines[5] == "nearest by text (cosine):"
    # item 0's text is image 4's vector: its text neighbours are 1 (angle 1.5), 2, 3
    assert [ln.split()[1] for ln in lines[6:9]] == ["1", "2", "3"]
    assert lines[6].split()[2] == f"{math.cos(1.5):.4f}"
    assert len(lines) == 9

    result = cli(project, "neighbours", "tiny", "split", 4, "-k", "10")
    assert "nearest by image (inner product):" in result.output
    assert len(result.output.splitlines()) == 1 + 2 * 5  # k is capped by the 4 other items


@pytest.mark.parametrize(
    "args, message",
    [
        (("nowhere", "same", 0), "unknown dataset 'nowhere':"),
        (("tiny", "clip", 0), "unknown feature set 'clip':"),
        (("tiny", "same", 99), "item 99 is not in"),
        (("tiny", "same", 0, "-k", "0"), "k = 0; use k >= 1"),
    ],
)
def test_neighbours_errors_name_what_exists(project, args, message):
    result = cli(project, "neighbours", *args)
    assert result.exit_code == 1
    assert message in result.output
    if "dataset" in message:
        assert "has ['tiny']" in result.output
    if "feature set" in message:
        assert "has ['cnn', 'same', 'split', 'swap']" in result.output
    if "item 99" in message:
        assert "5 items, ids 0..4" in result.output


def test_neighbours_needs_the_titles(project, tmp_path):
    (tmp_path / "features").symlink_to(project / "features")
    result = cli(tmp_path, "neighbours", "tiny", "same", 0)
    assert result.exit_code == 1 and "dvc repro preprocess" in result.output


def test_compare_tables_every_feature_set(project):
    result = cli(project, "compare", "tiny")
    assert result.exit_code == 0, result.output
    rows = {ln.split()[0]: ln for ln in result.output.splitlines()[2:]}
    assert list(rows) == ["cnn", "same", "split", "swap", "chance"]
    assert rows["cnn"].endswith("n/a (separate spaces: image 6-d vs text 4-d)")
    assert rows["split"].endswith("n/a (separate spaces: metadata says aligned: false)")
    off_diagonal = np.mean([np.cos(a - b) for a in ANGLES for b in ANGLES if a != b])
    assert rows["same"].split()[1:] == [
        "5", "1.0000", f"{off_diagonal:.4f}", f"{1 - off_diagonal:.4f}", *["1.0000"] * 4
    ]  # fmt: skip
    assert rows["swap"].split()[5] == "0.2000"  # i2t R@1: only item 2 keeps its own text
    assert "chance with 5 items: R@1 = 0.2000, R@10 = 1.0000" in result.output

    result = cli(project, "compare", "tiny", "swap", "cnn")
    assert result.exit_code == 0
    assert [ln.split()[0] for ln in result.output.splitlines()[2:4]] == ["swap", "cnn"]
    result = cli(project, "compare", "tiny", "clip", "same")
    assert result.exit_code == 1
    assert "unknown feature sets ['clip']" in result.output and "'swap']" in result.output
    result = cli(project, "compare", "nowhere")
    assert result.exit_code == 1 and "unknown dataset 'nowhere'" in result.output
