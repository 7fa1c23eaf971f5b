"""The recommend command's library side: top-k from a trained model, as the evaluator ranks."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from tables import imageless_items, interactions_table

from pipeline.data.interactions import load_interactions
from pipeline.data.schemas import INTERACTIONS, ITEMS, seed_folder, write_table
from pipeline.features.store import write_feature_store
from pipeline.training.evaluation import metrics_from_hits, recommend
from pipeline.training.recommend import RECOMMENDATIONS, load_model
from stages import recommend as stage
from stages import train
from stages.params import model_settings

ROOT = Path(__file__).parents[1]
N_USERS, N_ITEMS = 60, 45


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny processed dataset `tiny`, a feature set `fs`, trained bpr (id) and vbpr (fs)."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(3)
    users, items, splits = [], [], []
    for u in range(N_USERS):
        users += [u] * 8
        items += rng.choice(np.arange(u % 3, N_ITEMS, 3), 8, replace=False).tolist()
        splits += ["train"] * 6 + ["valid", "test"]
    processed = root / "processed" / "tiny"
    interactions = interactions_table(users, items, splits)
    write_table(interactions, processed / "interactions.parquet", INTERACTIONS, "interactions")
    ids = np.arange(N_ITEMS)
    item_table = imageless_items(ids, "Title of item {}")
    write_table(item_table, processed / "items.parquet", ITEMS, "items")
    image = np.eye(3, dtype=np.float32)[ids % 3]
    text = rng.normal(size=(N_ITEMS, 4)).astype(np.float32)
    meta = {"encoder": "test", "arch": "none", "pretrained": "none", "weights_sha256": "0"}
    write_feature_store(root / "features/tiny/fs", ids, image, text, {**meta, "normalized": False})

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["topk"] = [10, 20]
    params["train"].update(max_epochs=4, batch_size=64, lr=0.01, device="cpu")
    params["recommenders"]["vbpr"]["embedding_size"] = 8
    interactions_file = processed / "interactions.parquet"
    for model, fs in (("bpr", "id"), ("vbpr", "fs")):
        features = None if fs == "id" else root / "features/tiny/fs"
        out = root / "models/tiny" / fs / model / seed_folder(2022)
        train.run(params, model, fs, interactions_file, features, out, seed=2022)
    return {
        "params": params,
        "roots": {
            "processed": root / "processed",
            "features": root / "features",
            "models": root / "models",
        },
        "data": load_interactions(interactions_file),
        "root": root,
    }


def run(
    world, model="bpr", fs="id", user=None, k=10, all_users=False, out=None, seed=None, **changes
):
    params = {**world["params"], "seeds": [2022, 2023], **changes}
    return stage.run(params, "tiny", fs, model, user, k, all_users, out, seed, **world["roots"])


@pytest.mark.parametrize("model, fs", [("bpr", "id"), ("vbpr", "fs")])
def test_all_users_get_k_unseen_items_ranked_like_the_evaluator(world, model, fs, tmp_path):
    out = tmp_path / "recs.parquet"
    returned = run(world, model, fs, k=20, all_users=True, out=out)
    recs = pq.read_table(out)
    assert recs.schema.equals(RECOMMENDATIONS) and recs.equals(returned)
    data = world["data"]
    users = recs.column("user_id").to_numpy().reshape(N_USERS, 20)
    items = recs.column("item_id").to_numpy().reshape(N_USERS, 20)
    scores = recs.column("score").to_numpy().reshape(N_USERS, 20)
    assert (users == np.arange(N_USERS)[:, None]).all()  # k rows per user, in user order
    assert (recs.column("rank").to_numpy().reshape(N_USERS, 20) == np.arange(1, 21)).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    for u in range(N_USERS):
        assert not set(items[u]) & set(data.items_of("train", u))
        assert len(set(items[u])) == 20

    # the recall of these lists on test is the trainer's per-user test recall
    per_user = pq.read_table(
        world["root"] / "models/tiny" / fs / model / "seed-2022/per_user.parquet"
    )
    test_users = per_user.column("user_id").to_numpy()
    hits = np.array([[i in set(data.items_of("test", u)) for i in items[u]] for u in test_users])
    n_relevant = np.array([len(data.items_of("test", u)) for u in test_users])
    mine = metrics_from_hits(hits, n_relevant, (10, 20))
    for name in ("recall@10", "recall@20", "ndcg@20"):
        np.testing.assert_array_equal(mine[name], per_user.column(name).to_numpy())

    model_obj = load_model(
        model,
        model_settings(world["params"]["recommenders"], model)[0],
        fs,
        data,
        world["root"] / "models/tiny" / fs / model / "seed-2022/model.pt",
        world["root"] / "features/tiny" / fs,
        2022,
    )
    ranked = recommend(model_obj.score, data, np.arange(N_USERS), 20)
    np.testing.assert_array_equal(items, ranked)


def test_one_user_prints_history_and_titled_top_k(world, capsys):
    data = world["data"]
    recs = run(world, "vbpr", "fs", user=7, k=5)
    assert recs.num_rows == 5 and set(recs.column("user_id").to_pylist()) == {7}
    printed = capsys.readouterr().out
    assert printed.startswith("user 7: 6 train items\n")
    for item in data.items_of("train", 7):
        assert f"Title of item {item}\n" in printed
    assert "top-5 by vbpr on fs (train items masked):" in printed
    first = recs.column("item_id")[0].as_py()
    assert f"  1. {first:>7}  " in printed and f"Title of item {first}" in printed


def test_clear_errors(world, tmp_path):
    with pytest.raises(ValueError, match=r"user 60 is unknown: tiny has user ids 0\.\.59"):
        run(world, user=60)
    with pytest.raises(ValueError, match="give either --user U or --all"):
        run(world)
    with pytest.raises(ValueError, match="give --out"):
        run(world, all_users=True)
    with pytest.raises(ValueError, match=r"k = 50; use 1\.\.39"):
        run(world, user=0, k=50)
    with pytest.raises(
        FileNotFoundError, match=r"train it first with `dvc repro train_id@lightgcn-2022`"
    ):
        run(world, "lightgcn", user=0)
    with pytest.raises(FileNotFoundError, match=r"`dvc repro train@vbpr-other-2022`"):
        run(world, "vbpr", "other", user=0)
    with pytest.raises(FileNotFoundError, match=r"bpr/seed-2023/model.pt not found"):
        run(world, "bpr", user=0, seed=2023)
    with pytest.raises(ValueError, match=r"--seed 7: the pipeline trains seeds \[2022, 2023\]"):
        run(world, "bpr", user=0, seed=7)
    with pytest.raises(ValueError, match="bpr is ID-only"):
        run(world, "bpr", "fs", user=0)
    with pytest.raises(ValueError, match="unknown recommender 'mf'"):
        run(world, "mf", user=0)
    changed = {**world["params"]["recommenders"], "bpr": {"embedding_size": 16}}
    with pytest.raises(RuntimeError, match="does not fit recommenders.bpr in the params file"):
        run(world, user=0, recommenders=changed)
