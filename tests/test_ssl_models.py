"""The self-supervised multimodal graph recommenders: MMGCL and SLMRec."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from graphs import clustered as make_clustered

from pipeline.recommenders import ItemFeatures, get_recommender
from pipeline.recommenders.graph import propagate, to_csr
from pipeline.recommenders.losses import bpr_loss, info_nce, l2_reg
from pipeline.recommenders.mmgcl import MMGCL
from pipeline.recommenders.slmrec import SLMRec
from pipeline.training.sampling import epoch_batches

N_GROUPS = 4

# (model name, config) pairs whose SSL contrasts two augmented views
VIEW_MODELS = [
    ("mmgcl", {}),
    ("slmrec", {"ssl_task": "fd"}),
    ("slmrec", {"ssl_task": "fm"}),
    ("slmrec", {"ssl_task": "fd+fm"}),
]
ALL_MODELS = [*VIEW_MODELS, ("slmrec", {"ssl_task": "fac"})]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds overhead (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


clustered = partial(make_clustered, n_users=40, n_items=32, per_user=8, n_groups=N_GROUPS)


def features(n_items, image=True, text=True) -> ItemFeatures:
    """Image = noisy one-hot of the item's group, text = noise."""
    gen = torch.Generator().manual_seed(0)
    group = F.one_hot(torch.arange(n_items) % N_GROUPS, N_GROUPS).float()
    return ItemFeatures(
        image=group + 0.1 * torch.randn(n_items, N_GROUPS, generator=gen) if image else None,
        text=torch.randn(n_items, 5, generator=gen) if text else None,
    )


def build(name, config, data=None, **modalities):
    data = data or clustered()
    torch.manual_seed(0)
    cfg = {"embedding_size": 8, "n_layers": 2, **config}
    return get_recommender(name).build(data, features(data.n_items, **modalities), cfg)


def batch(data, size=64):
    return next(epoch_batches(data, size, seed=0, epoch=1))


def test_propagate_is_the_lightgcn_layer_mean_and_its_gradient_is_exact():
    adj = to_csr(
        torch.sparse_coo_tensor(
            torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]),
            torch.tensor([0.5, 0.5, 2.0, 2.0]),
            (3, 3),
            check_invariants=True,
        )
    )
    dense = adj.to_dense()
    x = torch.randn(3, 4, requires_grad=True)
    out = propagate(adj, x, 2)
    expected = (x + dense @ x + dense @ dense @ x) / 3
    torch.testing.assert_close(out, expected)
    weights = torch.randn(3, 4)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_info_nce_prefers_matching_pairs_and_counts_hard_negatives():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=gen)
    near = a + 0.1 * torch.randn(16, 8, generator=gen)
    assert info_nce(a, near, 0.2) < info_nce(a, near[torch.roll(torch.arange(16), 1)], 0.2)
    # a hard negative identical to the positive adds exp(s_pos / t) to the denominator
    logits = F.normalize(a, dim=1) @ F.normalize(near, dim=1).T / 0.2
    pos = logits.diagonal()
    expected = (torch.logsumexp(torch.cat([logits, pos[:, None]], 1), 1) - pos).mean()
    torch.testing.assert_close(info_nce(a, near, 0.2, hard=near), expected)


@pytest.mark.parametrize(("name", "config"), VIEW_MODELS)
def test_views_differ_are_seeded_and_contrast_matching_pairs_lower(name, config):
    data = clustered()
    model = build(name, config, data)
    users, items = torch.arange(data.n_users), torch.arange(data.n_items)
    torch.manual_seed(5)
    (u1, i1), (u2, i2) = model.views(users, items)
    assert not torch.allclose(u1, u2) and not torch.allclose(i1, i2)
    torch.manual_seed(5)
    (u1_again, i1_again), (u2_again, _) = model.views(users, items)
    assert torch.equal(u1, u1_again) and torch.equal(i1, i1_again) and torch.equal(u2, u2_again)
    others = []
    for seed in range(6, 10):  # feature masking alone has only 6 pairs of masked channels
        torch.manual_seed(seed)
        others.append(model.views(users, items)[0][0])
    assert any(not torch.equal(u1, other) for other in others)
    temp = model.config.ssl_temp
    shuffle = torch.roll(torch.arange(data.n_users), 7)
    assert info_nce(u1, u2, temp) < info_nce(u1, u2[shuffle], temp)
    shuffle = torch.roll(torch.arange(data.n_items), 5)
    assert info_nce(i1, i2, temp) < info_nce(i1, i2[shuffle], temp)


@pytest.mark.parametrize(("name", "config"), ALL_MODELS)
def test_ssl_weight_scales_the_ssl_term_and_zero_leaves_main_loss_plus_reg(name, config):
    data = clustered()
    users, pos, neg = batch(data)
    bpr_main = {"main_loss": "bpr"} if name == "slmrec" else {}
    plain = build(name, {**config, **bpr_main, "ssl_weight": 0.0}, data)
    user_all, item_all = plain.forward()
    u, p, n = user_all[users], item_all[pos], item_all[neg]
    ego = (plain.user_embedding[users], plain.item_embedding[pos], plain.item_embedding[neg])
    reg = plain.config.reg_weight * l2_reg(*ego)
    main = bpr_loss((u * p).sum(1), (u * n).sum(1))
    torch.testing.assert_close(plain.loss(users, pos, neg), main + reg)

    weighted = build(name, {**config, "ssl_weight": 0.5}, data)  # same seed, same weights
    if name == "slmrec":  # MMRec's main loss: in-batch InfoNCE of users and positives
        main = info_nce(u, p, weighted.config.main_temp)
    torch.manual_seed(1)
    ssl = weighted.ssl_loss(users, pos)
    assert ssl > 0
    torch.manual_seed(1)
    torch.testing.assert_close(weighted.loss(users, pos, neg), main + reg + 0.5 * ssl)


@pytest.mark.parametrize(("name", "config"), ALL_MODELS)
def test_eval_scores_are_deterministic_cached_and_unaugmented(name, config):
    data = clustered()
    model = build(name, config, data)
    users = torch.arange(data.n_users)
    model.eval()
    torch.manual_seed(0)
    first = model.score(users)
    torch.manual_seed(1)
    assert torch.equal(model.score(users), first)
    user_all, item_all = model.forward()
    torch.testing.assert_close(first, user_all @ item_all.T)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.loss(*batch(data)).backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(model.score(users), first)  # the cache was dropped by train()


@pytest.mark.parametrize(("name", "config"), ALL_MODELS)
@pytest.mark.parametrize("modalities", ["image", "text", "both"])
def test_training_learns_the_clusters_with_any_modalities(name, config, modalities):
    data = clustered()
    present = {"image": modalities != "text", "text": modalities != "image"}
    model = build(name, config, data, **present)
    assert model.n_channels == 1 + sum(present.values())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for epoch in range(12):
        model.train()
        total = 0.0
        for users, pos, neg in epoch_batches(data, 64, seed=0, epoch=epoch):
            loss = model.loss(users, pos, neg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    assert losses[-1] < 0.9 * losses[0]
    model.eval()
    scores = model.score(torch.arange(data.n_users))
    same = (torch.arange(data.n_users)[:, None] - torch.arange(data.n_items)) % N_GROUPS == 0
    unseen = torch.from_numpy(data.train.toarray() == 0)
    # held-out items of the user's group outrank the other groups' items
    assert scores[same & unseen].mean() > scores[~same].mean() + 0.1 * scores.std()


def test_fac_aligns_each_items_id_channel_with_its_own_modalities():
    data = clustered()
    model = build("slmrec", {"ssl_task": "fac", "ssl_weight": 1.0}, data)
    assert [layer.out_features for layer in model.fac_chain] == [8, 4]  # image, then text
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(10):
        for users, pos, neg in epoch_batches(data, 64, seed=0, epoch=epoch):
            optimizer.zero_grad()
            model.loss(users, pos, neg).backward()
            optimizer.step()
    with torch.no_grad():
        channels = model._channels(model._inputs())[1]  # [I, C, d]
        shuffled = channels.clone()
        shuffled[:, 1:] = channels[torch.roll(torch.arange(data.n_items), 1), 1:]
        assert model.fac_loss(channels) < model.fac_loss(shuffled)
    one = build("slmrec", {"ssl_task": "fac"}, data, image=False)
    assert len(one.fac_chain) == 1 and one.fac_chain[0].out_features == 8


def test_mmgcl_masks_one_modality_and_hard_negatives_swap_one_channel():
    data = clustered()
    model = build("mmgcl", {"mask_image_p": 1.0}, data)
    assert isinstance(model, MMGCL) and model.masked_modality() == "image"
    channels = model.item_channels()
    _, masked, random = model._draw_views(channels)
    assert masked == 1 and random.shape == channels[1].shape  # the image channel
    assert not torch.allclose(random, channels[1])
    assert build("mmgcl", {"mask_image_p": 0.0}, data).masked_modality() == "text"
    assert build("mmgcl", {}, data, image=False).masked_modality() == "text"
    channels = torch.randn(10, 3, model.config.embedding_size)
    swapped = model._swap_modality(channels)
    changed = (swapped != channels).any(dim=2)  # [10, 3]
    assert changed[:, 0].sum() == 0 and (changed.sum(dim=1) == 1).all()
    assert model._swap_modality(channels[:1]) is None
    user_items, item_users = (block.to_dense() for block in model.edge_dropped_blocks())
    kept = (user_items > 0).sum().item()
    assert 0.5 * data.n_train < kept < 0.9 * data.n_train  # about 70% of the edges
    torch.testing.assert_close(user_items, item_users.T)


def test_mmgcl_edge_dropped_blocks_are_the_normalised_kept_graph():
    data = clustered()
    model = build("mmgcl", {}, data)
    torch.manual_seed(3)
    user_items, item_users = model.edge_dropped_blocks()
    torch.manual_seed(3)  # the reference: the same draw, the kept graph normalised whole
    full = model.edge_dropped_adjacency().to_dense()
    u = data.n_users
    assert torch.equal(user_items.to_dense(), full[:u, u:])
    assert torch.equal(item_users.to_dense(), full[u:, :u])


def test_channel_propagation_matches_the_full_graph_at_any_rows():
    data = clustered()
    model = build("slmrec", {"n_layers": 3}, data)
    d, u = model.config.embedding_size, data.n_users
    items = torch.cat(model.item_channels(), dim=1)
    full = propagate(model.adjacency, model.stack(list(items.split(d, dim=1))), 3)
    full = full.view(full.shape[0], -1, d)
    users_out, items_out = model.propagate_channels(items)
    assert torch.equal(users_out, full[:u]) and torch.equal(items_out, full[u:])
    user_rows, item_rows = torch.tensor([0, 3, u - 1]), torch.tensor([2, 5])
    rows_users, rows_items = model.propagate_channels(items, user_rows, item_rows)
    assert torch.equal(rows_users, full[user_rows]) and torch.equal(rows_items, full[u + item_rows])
    weights = torch.randn_like(rows_users)
    params = [model.user_embedding, model.item_embedding]
    grads = torch.autograd.grad((rows_users * weights).sum(), params)
    expected = torch.autograd.grad((full[user_rows] * weights).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_slmrec_feature_masking_zeroes_two_different_channels():
    data = clustered()
    model = build("slmrec", {"ssl_task": "fm"}, data)
    assert isinstance(model, SLMRec)
    d, u = model.config.embedding_size, data.n_users
    masked = model._inputs(masked=1)
    assert (masked[u:, d : 2 * d] == 0).all() and (masked[:u, d : 2 * d] != 0).any()
    with pytest.raises(ValueError, match="'fac' contrasts channels"):
        build("slmrec", {}, data).views(torch.arange(3), torch.arange(3))


def test_configs_reject_bad_values():
    data = clustered()
    with pytest.raises(ValueError, match=r"ssl_task = 'xx'; allowed: \['fac', 'fd', 'fm'"):
        build("slmrec", {"ssl_task": "xx"}, data)
    with pytest.raises(ValueError, match=r"main_loss = 'mse'; allowed: \['infonce', 'bpr'\]"):
        build("slmrec", {"main_loss": "mse"}, data)
    with pytest.raises(ValueError, match="ssl_temp = 0.0"):
        build("mmgcl", {"ssl_temp": 0.0}, data)
    with pytest.raises(ValueError, match="dropout_rate = 1.0"):
        build("mmgcl", {"dropout_rate": 1.0}, data)
    with pytest.raises(ValueError, match="mmgcl uses item features"):
        get_recommender("mmgcl").build(data, None, {})
