"""The data contracts catch damaged and mismatched tables where they are read, naming the file."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tables import imageless_items, interactions_table

from pipeline.data.interactions import InteractionData, load_interactions
from pipeline.data.schemas import INTERACTIONS, ITEMS, ContractError, read_table, write_table
from pipeline.features.store import read_feature_store, write_feature_store
from stages import recommend, train

ROOT = Path(__file__).parents[1]
N_USERS, N_ITEMS = 20, 12
META = {"encoder": "test", "arch": "none", "pretrained": "none", "weights_sha256": "0"}


def rows(n_users: int = N_USERS, n_items: int = N_ITEMS) -> tuple[list, list, list]:
    """Dense ids: user u has items u..u+4 (mod n_items), three train, one valid, one test."""
    users = [u for u in range(n_users) for _ in range(5)]
    items = [(u + j) % n_items for u in range(n_users) for j in range(5)]
    return users, items, ["train", "train", "train", "valid", "test"] * n_users


def write_raw(table: pa.Table, path: Path) -> Path:
    """Write ``table`` as it is, bypassing the contract (as a damaged or foreign file would be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["topk"] = [5, 10]
    params["train"].update(max_epochs=1, batch_size=64, device="cpu", valid_metric="recall@10")
    return params


def test_huge_user_id_is_rejected_before_training_allocates(tmp_path, params, monkeypatch):
    users, items, splits = rows()
    users[7] = 1_515_871_103  # what a damaged file decoded to: 388 GB of embeddings
    path = write_raw(interactions_table(users, items, splits), tmp_path / "interactions.parquet")

    def allocate(*args, **kwargs):
        pytest.fail("matrices were sized by the corrupt user id")

    monkeypatch.setattr(InteractionData, "from_arrays", classmethod(allocate))
    with pytest.raises(ContractError, match=r"user_id 1515871103 is impossible in 100 rows") as err:
        train.run(params, "bpr", "id", path, None, tmp_path / "out")
    assert str(path) in str(err.value) and "dvc repro preprocess" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_item_id_with_a_gap_is_rejected_for_an_id_only_model(tmp_path, params):
    users, items, splits = rows()
    items[7] = 40  # beyond the 12 items; 12..39 never used
    path = write_raw(interactions_table(users, items, splits), tmp_path / "interactions.parquet")
    with pytest.raises(ContractError, match=r"item_id runs 0\.\.40 but never uses 28") as err:
        train.run(params, "bpr", "id", path, None, tmp_path / "out")
    assert str(path) in str(err.value)


def test_item_id_beyond_the_items_table_is_rejected_for_an_id_only_model(tmp_path, params):
    users, items, splits = rows()
    items[7] = N_ITEMS  # dense 0..N_ITEMS in the interactions, but the items table stops short
    processed = tmp_path / "processed" / "tiny"
    interactions = interactions_table(users, items, splits)
    write_table(interactions, processed / "interactions.parquet", INTERACTIONS, "interactions")
    write_table(imageless_items(np.arange(N_ITEMS)), processed / "items.parquet", ITEMS, "items")
    models = tmp_path / "models"
    train.run(params, "bpr", "id", processed / "interactions.parquet", None, models / "tiny/id/bpr")
    roots = {"processed": tmp_path / "processed", "features": tmp_path / "f", "models": models}
    with pytest.raises(ContractError, match=rf"lacks \[{N_ITEMS}\]") as err:
        recommend.run(params, "tiny", "id", "bpr", 0, 5, False, None, **roots)
    assert str(processed / "items.parquet") in str(err.value)


def test_a_missing_split_is_rejected(tmp_path):
    users, items, splits = rows()
    splits = ["test" if s == "valid" else s for s in splits]  # no validation rows at all
    path = write_raw(interactions_table(users, items, splits), tmp_path / "interactions.parquet")
    with pytest.raises(ContractError, match=r"no rows in split \['valid'\]") as err:
        load_interactions(path)
    assert str(path) in str(err.value)


def test_a_truncated_parquet_file_names_the_file(tmp_path):
    path = tmp_path / "interactions.parquet"
    write_table(interactions_table(*rows()), path, INTERACTIONS, "interactions")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ContractError, match="damaged or truncated") as err:
        load_interactions(path)
    assert str(path) in str(err.value) and "dvc repro preprocess" in str(err.value)


def test_a_damaged_page_is_detected_by_its_checksum(tmp_path):
    path = tmp_path / "interactions.parquet"
    write_table(interactions_table(*rows()), path, INTERACTIONS, "interactions")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)  # user_id
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    damaged = bytearray(path.read_bytes())
    damaged[start + chunk.total_compressed_size - 1] ^= 0xFF  # the last byte of its last page
    path.write_bytes(bytes(damaged))
    with pytest.raises(ContractError, match="damaged or truncated") as err:
        load_interactions(path)
    assert str(path) in str(err.value)


def test_items_table_must_hold_each_id_once(tmp_path):
    path = write_raw(imageless_items(np.array([0, 1, 3])), tmp_path / "items.parquet")
    with pytest.raises(ContractError, match=r"item_id 3 is impossible in 3 rows") as err:
        read_table(path, ITEMS, "items")
    assert str(path) in str(err.value)
    path = write_raw(imageless_items(np.array([0, 1, 1, 2])), tmp_path / "items.parquet")
    with pytest.raises(ContractError, match=r"item_id repeats ids \[1\] \(1 in all\)"):
        read_table(path, ITEMS, "items")


def test_feature_store_must_cover_the_interactions_items(tmp_path):
    vectors = np.eye(N_ITEMS, dtype=np.float32)
    fs = tmp_path / "features" / "fs"
    write_feature_store(fs, np.arange(N_ITEMS), vectors, vectors, {**META, "normalized": True})
    assert len(read_feature_store(fs, N_ITEMS).item_ids) == N_ITEMS
    with pytest.raises(ContractError, match=rf"lacks \[{N_ITEMS}\]") as err:
        read_feature_store(fs, N_ITEMS + 1)
    assert str(fs / "items.parquet") in str(err.value) and "extract@fs" in str(err.value)
    (fs / "items.parquet").write_bytes((fs / "items.parquet").read_bytes()[:-100])
    with pytest.raises(ContractError, match="damaged or truncated") as err:
        read_feature_store(fs)
    assert str(fs / "items.parquet") in str(err.value)
