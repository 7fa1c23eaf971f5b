"""Adam for the training loop, without torch.optim: the same fused kernel, no compiler import.

Building any torch.optim optimiser imports torch._dynamo (~1.1 s a process on this project's
machine, paid by every train, train_id and e2e stage), and the training loop needs nothing of
it. ``FusedAdam`` calls the kernel ``torch.optim.Adam(fused=True)`` runs, on the same
tensors in the same order, so its updates are bit for bit the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

# torch.optim.Adam's defaults, which the project's runs use
BETAS = (0.9, 0.999)
EPS = 1e-8


class FusedAdam:
    """Adam (L2 weight decay, no amsgrad) over parameter groups, one fused kernel call per
    group and device/dtype; the optimiser interface the trainer uses: ``param_groups``,
    ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``."""

    def __init__(
        self,
        param_groups: Iterable[Mapping[str, Any]],
        lr: float,
        betas: tuple[float, float] = BETAS,
        eps: float = EPS,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [
            {**defaults, **group, "params": list(group["params"])} for group in param_groups
        ]
        params = [p for group in self.param_groups for p in group["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears in more than one parameter group")
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        for group in self.param_groups:
            shards: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdam does not support sparse gradients")
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                lists = shards.setdefault((p.device, p.dtype), [[] for _ in tensors])
                for slot, tensor in zip(lists, tensors, strict=True):
                    slot.append(tensor)
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, steps in shards.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps,
                    amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    grad_scale=None, found_inf=None,
                )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The moments and steps by parameter index, and the groups' settings (as torch.optim
        lays them out, so a checkpoint holds only tensors, numbers and lists)."""
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index[p] = len(index)
                ids.append(index[p])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[p]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned, for the same parameters in the same groups."""
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in groups] != sizes:
            raise ValueError(
                f"optimiser state has groups of {[len(g['params']) for g in groups]} "
                f"parameters, this optimiser {sizes}"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        for group, saved in zip(self.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        self.state = {
            params[int(i)]: {
                k: v.to(device=params[int(i)].device)
                if k == "step"
                else v.to(device=params[int(i)].device, dtype=params[int(i)].dtype)
                for k, v in s.items()
            }
            for i, s in state_dict["state"].items()
        }
