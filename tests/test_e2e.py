"""End-to-end training: the recommendation loss trains the encoder, the memory bank holds the
other items, and the run writes the same outputs as a cached-feature run."""

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from graphs import clustered
from tables import make_items

import pipeline.training.trainer as training
from pipeline.core.distributed import World
from pipeline.encoders import load_encoder
from pipeline.encoders._multiway import VlmoModel
from pipeline.encoders.clip import ClipEncoder
from pipeline.encoders.vlmo import DEMO_ARCH, VlmoEncoder, arch_config
from pipeline.features.extract import ExtractConfig, extract_features
from pipeline.training.e2e import (
    ENCODER_DIR,
    E2EConfig,
    build_end_to_end,
    build_prefix_cache,
    train_end_to_end,
)
from pipeline.training.trainer import TrainConfig

MODELS = ["vbpr", "mmgcn", "mmgcl", "slmrec", "lattice"]
CONFIGS = {"lattice": {"train_features": False}}
N_ITEMS = 24
CPU = torch.device("cpu")
FAST = E2EConfig(encoder_lr=1e-3)
CACHED = E2EConfig(encoder_lr=1e-3, freeze_layers=3)  # the demo CLIP's 3 of 4 blocks
UNCACHED = replace(CACHED, prefix_cache=False)
TRAIN = TrainConfig(batch_size=32, max_epochs=2, patience=5, topk=(5, 10), valid_metric="recall@10")
PARAMS = Path(__file__).parents[1] / "params.yaml"


def _model(name: str, cfg: E2EConfig = FAST, encoder=None):
    torch.manual_seed(0)
    data = clustered(30, N_ITEMS, 6, 3)
    encoder = encoder or ClipEncoder.tiny()
    model = build_end_to_end(name, data, encoder, make_items(N_ITEMS), CONFIGS.get(name), cfg, CPU)
    return model, encoder


def _step(model) -> torch.Tensor:
    """One optimiser step on a fixed batch, as the trainer takes it; returns the batch's items."""
    optimizer = torch.optim.Adam(model.param_groups(1e-3))
    model.train()
    users, pos, neg = (
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([5, 7, 9, 3]),
    )
    model.loss(users, pos, neg).backward()
    optimizer.step()
    model.after_step()
    return torch.unique(torch.cat([pos, neg]))


def _vlmo_with_dropout() -> VlmoEncoder:
    """The demo VLMo with stochastic depth and base/large's shared relative position bias
    table and layer scale (3 blocks, so that a frozen one is followed by two that train)."""
    demo = arch_config(DEMO_ARCH)
    arch = replace(demo, depth=3, vlffn_start_layer=2, drop_path_rate=0.5, abs_pos_emb=False,
                   relative_position_bias=True, layer_scale_init=0.1)  # fmt: skip
    return VlmoEncoder(VlmoModel(arch), "vlmo-test-rel")


def _cached_and_uncached(encoder, k: int, **settings) -> list:
    """The same model built twice from ``encoder``: without and with the prefix cache."""
    models = []
    for cached in (False, True):
        torch.manual_seed(0)
        data = clustered(30, N_ITEMS, 6, 3)
        cfg = E2EConfig(encoder_lr=1e-3, freeze_layers=k, prefix_cache=cached, **settings)
        models.append(build_end_to_end("mmgcl", data, copy.deepcopy(encoder), make_items(N_ITEMS),
                                       None, cfg, CPU))  # fmt: skip
    return models


@pytest.mark.parametrize(
    ("family", "k"), [(ClipEncoder.tiny, 3), (VlmoEncoder.tiny, 1), (_vlmo_with_dropout, 1)]
)
def test_a_cached_step_equals_the_uncached_step(family, k):
    torch.manual_seed(0)
    uncached, cached = _cached_and_uncached(family(), k)
    assert uncached.cache is None and cached.cache is not None
    torch.testing.assert_close(cached.bank_image, uncached.bank_image, atol=1e-5, rtol=0)
    results = []
    for model in (uncached, cached):
        optimizer = torch.optim.Adam(model.param_groups(1e-3))
        model.train()
        torch.manual_seed(1)  # the same dropout, stochastic depth and MMGCL views in both
        loss = model.loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]),
                          torch.tensor([5, 7, 9, 3]))  # fmt: skip
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        model.after_step()
        results.append((loss.detach(), grads, model.bank_image.clone(), model.bank_text.clone()))
    (loss_u, grads_u, image_u, text_u), (loss_c, grads_c, image_c, text_c) = results
    torch.testing.assert_close(loss_c, loss_u, atol=1e-5, rtol=0)
    assert grads_c.keys() == grads_u.keys()
    blocks = [n for n in grads_u if re.search(r"\.(resblocks|blocks)\.\d+\.", n) and "_vl" not in n]
    assert blocks and all(grads_u[n] is not None for n in blocks)  # the unfrozen blocks train
    for name in grads_u:
        if grads_u[name] is None:
            assert grads_c[name] is None, name
        else:
            torch.testing.assert_close(grads_c[name], grads_u[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(image_c, image_u, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_c, text_u, atol=1e-5, rtol=0)


def test_frozen_layers_are_a_fixed_function_even_in_train_mode():
    torch.manual_seed(0)
    encoder = _vlmo_with_dropout()
    encoder.freeze_lower_layers(1)
    encoder.train()
    tokens = encoder.tokenize(["a red shirt", "blue"])
    first, second = (encoder.text_prefix(tokens, 1)["states"] for _ in range(2))
    assert torch.equal(first, second)  # no dropout, no stochastic depth below the cut
    above = encoder.model.transformer.blocks[1]
    assert above.training and not encoder.model.transformer.blocks[0].training
    table = encoder.model.relative_position_bias_table
    encoder.text_suffix(encoder.text_prefix(tokens, 0), 0).sum().backward()
    heads = encoder.config.num_heads
    assert not table.grad[:, :heads].any() and table.grad[:, heads:].any()


def test_a_cached_run_gives_the_uncached_runs_result(tmp_path):
    runs = {}
    for cfg in (UNCACHED, CACHED):
        torch.manual_seed(0)
        data = clustered(30, N_ITEMS, 6, 3)
        model = build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                                 cfg, CPU)  # fmt: skip
        out = tmp_path / str(cfg.prefix_cache)
        metrics = train_end_to_end(model, data, TRAIN, out)
        runs[cfg.prefix_cache] = metrics, load_encoder(out / ENCODER_DIR).state_dict()
    (cached, cached_encoder), (uncached, uncached_encoder) = runs[True], runs[False]
    for key in ("recall@10", "ndcg@10", "valid_recall@10", "best_epoch", "epochs"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-6), key
    for key, value in uncached_encoder.items():
        torch.testing.assert_close(cached_encoder[key], value, atol=1e-5, rtol=0, msg=key)


def test_the_prefix_cache_is_rebuilt_when_the_frozen_weights_or_the_items_change():
    model, encoder = _model("vbpr", CACHED)
    cache = model.cache
    _step(model)
    model.eval()  # the trained blocks moved, the frozen ones did not: the cache still serves
    assert model.cache is cache
    state = model.state_dict()
    frozen = "encoder.model.visual.transformer.resblocks.1.mlp.c_fc.weight"
    state[frozen] = state[frozen] + 0.05 * torch.randn_like(state[frozen])
    model.load_state_dict(state)  # e.g. a resumed run's checkpoint with other frozen weights
    model.eval()
    assert model.cache is not cache and model.cache.key != cache.key
    image, text = extract_features(encoder, make_items(N_ITEMS), ExtractConfig())
    torch.testing.assert_close(model.bank_image, torch.from_numpy(image), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.bank_text, torch.from_numpy(text), atol=1e-5, rtol=0)

    items = make_items(N_ITEMS)
    texts = items.column("text").to_pylist()
    other = items.set_column(3, "text", [[t + " more" for t in texts]])
    caches = [build_prefix_cache(encoder, t, encoder.tokenize(t.column("text").to_pylist()),
                                 CACHED, World()) for t in (items, other)]  # fmt: skip
    assert caches[0].key == model.cache.key and caches[1].key != caches[0].key
    assert not torch.equal(caches[0].parts["text"]["states"], caches[1].parts["text"]["states"])


def test_a_memory_mapped_cache_gives_the_in_memory_result_and_is_removed(tmp_path):
    runs = {}
    for budget in (CACHED.cache_max_bytes, 1):
        torch.manual_seed(0)
        data = clustered(30, N_ITEMS, 6, 3)
        cfg = replace(CACHED, cache_max_bytes=budget)
        model = build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                                 cfg, CPU, tmp_dir=tmp_path / "tmp")  # fmt: skip
        folder = model.cache.folder
        if budget == 1:
            files = sorted(p.name for p in folder.iterdir())
            assert folder.parent == tmp_path / "tmp"
            assert files == ["image.states.bin", "text.ids.bin", "text.states.bin"]
        else:
            assert folder is None
        one_epoch = replace(TRAIN, max_epochs=1)
        runs[budget] = train_end_to_end(model, data, one_epoch, tmp_path / str(budget))
    in_memory, mapped = runs[CACHED.cache_max_bytes], runs[1]
    assert mapped == in_memory
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", MODELS)
def test_recommendation_loss_reaches_the_encoder(name):
    model, encoder = _model(name)
    before = {k: v.clone() for k, v in encoder.named_parameters()}
    _step(model)
    # every tower's weights get a gradient from the recommendation loss and move
    for key in ("model.visual.transformer.resblocks.0.attn.in_proj_weight",
                "model.transformer.resblocks.3.mlp.c_fc.weight", "model.visual.proj",
                "model.text_projection"):  # fmt: skip
        param = dict(encoder.named_parameters())[key]
        assert param.grad is not None and param.grad.abs().sum() > 0, key
        assert not torch.equal(param, before[key]), key


def test_vlmo_is_trained_end_to_end_too():
    torch.manual_seed(0)
    model, encoder = _model("vbpr", encoder=VlmoEncoder.tiny())
    before = {k: v.clone() for k, v in encoder.named_parameters()}
    _step(model)
    moved = [k for k, v in encoder.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.transformer.blocks.0.") for k in moved)
    assert any(k.startswith("model.itc_image_proj") for k in moved)


def test_frozen_lower_layers_stay_put_and_the_rest_trains():
    model, encoder = _model("vbpr", E2EConfig(encoder_lr=1e-3, freeze_layers=3))
    before = {k: v.clone() for k, v in encoder.named_parameters()}
    _step(model)
    params = dict(encoder.named_parameters())
    for key in ("model.visual.conv1.weight", "model.token_embedding.weight",
                "model.visual.transformer.resblocks.2.mlp.c_fc.weight"):  # fmt: skip
        assert params[key].grad is None and torch.equal(params[key], before[key]), key
    for key in ("model.visual.transformer.resblocks.3.mlp.c_fc.weight", "model.visual.proj"):
        assert not torch.equal(params[key], before[key]), key
    with pytest.raises(ValueError, match="freeze_layers = 5"):
        ClipEncoder.tiny().freeze_lower_layers(5)


def test_the_bank_takes_the_batch_rows_and_is_refreshed_before_scoring():
    model, encoder = _model("mmgcl")
    bank_before = model.bank_image.clone()
    model.train()
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([5, 7])
    batch = torch.tensor([0, 1, 5, 7])
    fresh_image, _ = model.encode(batch)
    model.loss(users, pos, neg)
    model.after_step()  # no optimiser step: the fresh rows are the current encoder's
    others = torch.tensor([i for i in range(N_ITEMS) if i not in batch.tolist()])
    torch.testing.assert_close(model.bank_image[batch], fresh_image.detach())
    assert torch.equal(model.bank_image[others], bank_before[others])

    with torch.no_grad():  # change the encoder: eval mode must recompute every row
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    image, text = extract_features(encoder, make_items(N_ITEMS), ExtractConfig())
    torch.testing.assert_close(model.bank_image, torch.from_numpy(image))
    torch.testing.assert_close(model.bank_text, torch.from_numpy(text))
    assert model.score(users).shape == (2, N_ITEMS)


def test_lattice_with_trained_feature_copies_is_refused():
    torch.manual_seed(0)
    data = clustered(30, N_ITEMS, 6, 3)
    with pytest.raises(ValueError, match="train_features must be false"):
        build_end_to_end("lattice", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                         E2EConfig(), CPU)  # fmt: skip


def test_items_must_match_the_interactions():
    data = clustered(30, N_ITEMS, 6, 3)
    with pytest.raises(ValueError, match="exactly the item ids 0..23"):
        build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(20), None, E2EConfig(), CPU)


def test_warm_start_loads_the_trained_recommender_and_checks_it():
    model, _ = _model("vbpr")
    state = {k: v + 1 for k, v in model.recommender.state_dict().items()}
    data = clustered(30, N_ITEMS, 6, 3)
    warm = build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                            E2EConfig(), CPU, init=state)  # fmt: skip
    for key, value in warm.recommender.state_dict().items():
        assert torch.equal(value, state[key]), key
    partial = {"user_embedding": state["user_embedding"]}
    with pytest.raises(ValueError, match="lacks"):
        build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                         E2EConfig(), CPU, init=partial)  # fmt: skip


def test_a_run_writes_the_run_contract_and_the_trained_encoder(tmp_path):
    torch.manual_seed(0)
    data = clustered(30, N_ITEMS, 6, 3)
    encoder = ClipEncoder.tiny()
    start = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = TrainConfig(
        batch_size=32, max_epochs=2, patience=5, topk=(5, 10), valid_metric="recall@10"
    )
    model = build_end_to_end("vbpr", data, encoder, make_items(N_ITEMS), None, FAST, CPU)
    metrics = train_end_to_end(model, data, cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    per_user = pl.read_parquet(tmp_path / "per_user.parquet")
    assert per_user.height == len(data.eval_users("test"))
    assert per_user["recall@10"].mean() == pytest.approx(metrics["recall@10"])
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved and not any(k.startswith("encoder.") for k in saved)
    trained = load_encoder(tmp_path / ENCODER_DIR)
    assert "+e2e:vbpr" in trained.pretrained
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > 50
    assert np.isfinite(metrics["valid_recall@10"])


def test_a_run_that_fails_to_save_its_encoder_leaves_the_earlier_run(tmp_path, monkeypatch):
    from test_training import files_under

    data = clustered(30, N_ITEMS, 6, 3)
    one_epoch = replace(TRAIN, max_epochs=1)

    def run():
        torch.manual_seed(0)
        model = build_end_to_end("vbpr", data, ClipEncoder.tiny(), make_items(N_ITEMS), None,
                                 FAST, CPU)  # fmt: skip
        train_end_to_end(model, data, one_epoch, tmp_path / "out")

    run()
    before = files_under(tmp_path)
    assert {"out/model.pt", "out/encoder/weights.json"} <= set(before)

    def disk_full(self, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ClipEncoder, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run()
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("e2e", [FAST, CACHED], ids=["uncached", "cached"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(e2e, tmp_path, monkeypatch):
    from test_resume import Interrupted, interrupt_after, outputs

    monkeypatch.setattr(training, "CHECKPOINT_INTERVAL_S", 0.0)  # save at every evaluation
    data = clustered(30, N_ITEMS, 6, 3)
    cfg = TrainConfig(
        batch_size=32, max_epochs=3, patience=5, topk=(5, 10), valid_metric="recall@10"
    )

    def run(out, checkpoint=None):
        torch.manual_seed(0)
        encoder = ClipEncoder.tiny()
        model = build_end_to_end("mmgcl", data, encoder, make_items(N_ITEMS), None, e2e, CPU)
        train_end_to_end(model, data, cfg, tmp_path / out, checkpoint)
        return load_encoder(tmp_path / out / ENCODER_DIR).state_dict()

    whole = run("whole")
    checkpoint = tmp_path / "run.pt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            run("resumed", checkpoint)
    assert torch.load(checkpoint, weights_only=True)["progress"]["epoch"] == 2
    resumed = run("resumed", checkpoint)
    assert outputs(tmp_path / "resumed") == outputs(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_stage_settings_layer_the_encoders_own_keys_and_the_overrides():
    import yaml

    from stages.e2e import settings

    params = yaml.safe_load(PARAMS.read_text())
    params["e2e"]["vlmo"] = {"freeze_layers": 1, "encoder_lr": 0.5}
    clip_cfg, train_cfg, lattice_cfg = settings({**params, "encoder": "clip"}, "lattice")
    vlmo_cfg, _, _ = settings({**params, "encoder": "vlmo"}, "lattice")
    assert (clip_cfg.freeze_layers, vlmo_cfg.freeze_layers) == (params["e2e"]["freeze_layers"], 1)
    assert vlmo_cfg.encoder_lr == 0.5 and clip_cfg.encoder_lr == params["e2e"]["encoder_lr"]
    assert train_cfg.max_epochs == params["e2e"]["train"]["max_epochs"]
    assert train_cfg.batch_size == params["train"]["batch_size"]  # not overridden: shared
    assert lattice_cfg["train_features"] is False
    assert lattice_cfg["knn_k"] == params["recommenders"]["lattice"]["knn_k"]
    params["recommenders"]["lattice"]["train"] = {"batch_size": 64, "lr": 0.5, "patience": 2}
    params["e2e"]["recommenders"]["lattice"]["train"] = {"patience": 1}
    _, train_cfg, lattice_cfg = settings({**params, "encoder": "clip"}, "lattice")
    assert "train" not in lattice_cfg  # the model's train settings are not hyperparameters
    assert train_cfg.batch_size == 64  # the model's own, kept under e2e
    assert train_cfg.lr == params["e2e"]["train"]["lr"]  # e2e.train over the model's own
    assert train_cfg.patience == 1  # e2e.recommenders.<model>.train over everything
    # the shipped params build on every encoder's demo model
    for name, family in (("clip", ClipEncoder), ("vlmo", VlmoEncoder)):
        cfg, _, _ = settings({**yaml.safe_load(PARAMS.read_text()), "encoder": name}, "vbpr")
        family.tiny().freeze_lower_layers(cfg.freeze_layers)
