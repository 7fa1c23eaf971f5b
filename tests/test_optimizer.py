"""FusedAdam: torch's fused Adam bit for bit, resumable, and no compiler import in training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training.optimizer import FusedAdam

ROOT = Path(__file__).parents[1]


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    shapes = [(50, 8), (8,), (3, 3)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _groups(params):
    return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]


def _step(params, optimizer, step: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    if step % 3:
        loss = params[0].sin().sum() * params[1].sum() + (params[2] ** 3).sum()
    else:  # some steps leave parameters without a gradient: Adam must not touch them
        loss = params[0].pow(2).sum()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_updates_equal_torch_fused_adam_bit_for_bit(weight_decay):
    ours, theirs = _params(), _params()
    mine = FusedAdam(_groups(ours), lr=1e-2, weight_decay=weight_decay)
    torch_adam = torch.optim.Adam(_groups(theirs), lr=1e-2, weight_decay=weight_decay, fused=True)
    for step in range(20):
        _step(ours, mine, step)
        _step(theirs, torch_adam, step)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_restored_state_continues_exactly():
    straight, resumed = _params(), _params()
    opt = FusedAdam(_groups(straight), lr=1e-2)
    for step in range(10):
        _step(straight, opt, step)
    first = FusedAdam(_groups(resumed), lr=1e-2)
    for step in range(5):
        _step(resumed, first, step)
    saved = first.state_dict()
    second = FusedAdam(_groups(resumed), lr=0.5)  # the saved settings win
    second.load_state_dict(saved)
    for step in range(5, 10):
        _step(resumed, second, step)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_state_for_other_groups_is_refused():
    saved = FusedAdam(_groups(_params()), lr=1e-2).state_dict()
    other = FusedAdam([{"params": _params()}], lr=1e-2)
    with pytest.raises(ValueError, match=r"groups of \[2, 1\] parameters, this optimiser \[3\]"):
        other.load_state_dict(saved)


def test_a_parameter_in_two_groups_is_refused():
    p = _params()
    with pytest.raises(ValueError, match="more than one parameter group"):
        FusedAdam([{"params": p}, {"params": p[:1]}], lr=1e-2)


def test_a_training_run_imports_no_compiler(tmp_path):
    # torch.optim's optimisers and torch.use_deterministic_algorithms import torch._dynamo
    # (~1.1 s), paid by each of the demo's ~40 train/e2e processes for nothing
    code = (
        "import sys\n"
        "from pipeline.data.interactions import InteractionData\n"
        "from pipeline.training.trainer import TrainConfig, train_recommender\n"
        "users = [u for u in range(20) for _ in range(5)]\n"
        "items = [(u * 3 + k) % 30 for u in range(20) for k in range(5)]\n"
        "splits = ['train', 'train', 'train', 'valid', 'test'] * 20\n"
        "data = InteractionData.from_arrays(users, items, splits, 20, 30)\n"
        "cfg = TrainConfig(batch_size=16, max_epochs=2, topk=(5, 20), device='cpu')\n"
        "train_recommender('lightgcn', data, None, {'embedding_size': 4}, cfg, 'out',\n"
        "                  'out.ckpt')\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]"
