"""Training-step cost of every registered recommender, against the code of an earlier commit;
see benchmarks/README.md.

    python benchmarks/bench_steps.py --threads 2                      # baby + elec, all models
    python benchmarks/bench_steps.py --models bpr,vbpr --sizes baby

For each size and model, two worker processes build the model on the same synthetic data
(saved once to a temporary folder): one imports ``pipeline`` from this checkout, the other
from a ``git worktree`` of ``--base-rev``. Their steps are timed in alternating rounds (or one
after the other when two copies would not fit in memory, marked ``seq``); the current code's
step is then split by kind of work and its unavoidable products are timed alone.
Not a test: it reports timings and ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPLY = "@@ "  # prefix of a worker's JSON replies on stdout
SPEEDUP_TARGET = 2.0  # old step / new step
FLOOR_TARGET = 1.5  # new step / (unavoidable products + dense Adam)
DENSE_OPS = {"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul", "_addmm_activation"}


# ----------------------------------------------------------------------------- worker side


def _module(name: str, flat: str) -> Any:
    """The module ``name`` of this checkout's layout, or ``flat``, its name in the flat
    ``pipeline/`` of a commit before the packages (the base worktree's side)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise
        return importlib.import_module(flat)


def _load_data(folder: Path) -> tuple[Any, Any]:
    """The interactions and (memory-mapped, copy-on-write) features saved by the parent."""
    import torch
    from synthetic import SPLITS

    from pipeline.recommenders.base import ItemFeatures

    InteractionData = _module("pipeline.data.interactions", "pipeline.interactions").InteractionData
    saved = np.load(folder / "interactions.npz")
    n_users, n_items = (int(v) for v in saved["shape"])
    data = InteractionData.from_arrays(
        saved["users"], saved["items"], SPLITS[saved["split"]], n_users, n_items
    )
    image, text = (np.load(folder / f"{m}.npy", mmap_mode="c") for m in ("image", "text"))
    features = ItemFeatures(image=torch.from_numpy(image), text=torch.from_numpy(text))
    return data, features


def _rss_peak_mib() -> float:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _OpTimer:
    """A dispatch mode that adds each aten op's wall time to ``sparse`` (an operand has a
    sparse layout) or ``dense`` (a dense matrix product); ops it does not classify are not
    timed. Ops run synchronously on the CPU, so wall time is the op's time."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        sparse_layouts = {torch.sparse_coo, torch.sparse_csr, torch.sparse_csc}
        timer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                kind = None
                if any(t.layout in sparse_layouts for t in tensors):
                    kind = "sparse"
                elif name in DENSE_OPS:
                    kind = "dense"
                if kind is None:
                    return func(*args, **kwargs)
                start = time.perf_counter()
                out = func(*args, **kwargs)
                timer.seconds[kind] += time.perf_counter() - start
                return out

        self.mode = Mode
        self.seconds = {"sparse": 0.0, "dense": 0.0}


class Worker:
    """One side (this checkout or the base worktree) of one model at one size."""

    def __init__(self, folder: Path, batch_size: int, seed: int):
        import torch

        training = _module("pipeline.training.trainer", "pipeline.training")
        epoch_batches = _module("pipeline.training.sampling", "pipeline.sampling").epoch_batches

        self.torch, self.training = torch, training
        self.data, self.features = _load_data(folder)
        start = time.perf_counter()
        self.batches = list(epoch_batches(self.data, batch_size, seed, 1))
        self.sampling_s = (time.perf_counter() - start) / len(self.batches)
        self.seed, self.lr, self.next = seed, 1e-3, 0

    def build(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Build ``name`` as train_recommender does, its optimiser as the trainer does, and
        take two untimed steps (the first pays for lazy allocations and per-epoch work)."""
        from pipeline.recommenders import get_recommender

        seed_everything = _module("pipeline.core.seeding", "pipeline.seeding").seed_everything
        torch = self.torch
        torch.use_deterministic_algorithms(True, warn_only=True)  # as training.deterministic
        seed_everything(self.seed)
        start = time.perf_counter()
        cls = get_recommender(name)
        self.model = cls.build(self.data, self.features if cls.uses_features else None, params)
        make = getattr(self.training, "make_optimizer", None)
        if make is not None:
            self.optimizer = make(self.model, self.lr)
        else:  # the trainer before make_optimizer
            self.optimizer = torch.optim.Adam(self.model.param_groups(self.lr), lr=self.lr)
        build_s = time.perf_counter() - start
        self.model.train()
        warm = self.steps(2)
        return {"build_s": build_s, "warm_s": warm, "rss_mib": _rss_peak_mib()}

    def _batch(self) -> tuple[Any, Any, Any]:
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        return batch

    def _step(self, users: Any, pos: Any, neg: Any) -> None:
        """One training step exactly as the trainer takes it (one micro-batch, one process)."""
        step = getattr(self.training, "train_step", None)
        if step is not None:
            step(self.model, self.optimizer, users, pos, neg)
            return
        self.optimizer.zero_grad(set_to_none=True)  # the trainer before train_step
        self.model.loss(users, pos, neg).backward()
        self.optimizer.step()
        self.model.after_step()

    def steps(self, n: int) -> list[float]:
        """Seconds of each of ``n`` steps (each plus its share of the epoch's sampling)."""
        times = []
        for _ in range(n):
            batch = self._batch()
            start = time.perf_counter()
            self._step(*batch)
            times.append(time.perf_counter() - start + self.sampling_s)
        return times

    def split(self, n: int) -> dict[str, float]:
        """Medians over ``n`` steps of where a step's time goes (see the README's columns)."""
        rows = []
        for _ in range(n):
            users, pos, neg = self._batch()
            timer = _OpTimer()
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            with timer.mode():
                t1 = time.perf_counter()
                loss = self.model.loss(users, pos, neg)
                t2 = time.perf_counter()
                forward = dict(timer.seconds)
                loss.backward()
                t3 = time.perf_counter()
            self.optimizer.step()
            self.model.after_step()
            t4 = time.perf_counter()
            backward = {k: timer.seconds[k] - forward[k] for k in forward}
            rows.append(
                {
                    "sampling": self.sampling_s,
                    "sparse": timer.seconds["sparse"],
                    "dense": timer.seconds["dense"],
                    "loss": (t2 - t1) - forward["sparse"] - forward["dense"],
                    "backward": (t3 - t2) - backward["sparse"] - backward["dense"],
                    "optim": (t1 - t0) + (t4 - t3),
                    "total": t4 - t0 + self.sampling_s,
                }
            )
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    def floor(self, reps: int) -> dict[str, float]:
        """The unavoidable sparse and dense products of a step, and one fused Adam step over
        the parameters a step updates, each timed alone (median of ``reps``)."""
        torch = self.torch
        users, pos, neg = self.batches[0]
        products = floor_products(self.model, users, pos, neg)
        out = {"sparse": 0.0, "dense": 0.0}
        for kind, fn in products:
            fn()
            out[kind] += statistics.median(_timed(fn) for _ in range(reps))
        trained = [p for p in self.model.parameters() if p.grad is not None]
        copies = [p.detach().clone() for p in trained]
        for c, p in zip(copies, trained, strict=True):
            c.grad = p.grad.clone()
        adam = torch.optim.Adam(copies, lr=self.lr, fused=True)
        adam.step()
        out["adam"] = statistics.median(_timed(adam.step) for _ in range(reps))
        return out


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floor_products(model: Any, users: Any, pos: Any, neg: Any) -> list[tuple[str, Callable]]:
    """What a step of ``model`` cannot do without, as (kind, zero-argument product) pairs:
    per propagation layer one sparse product forward and one backward at the width the
    model's maths needs (the channels it propagates side by side), each feature projection
    over the rows the loss reads, forward and weight gradient. Batch-sized products (read-outs,
    losses) are left out. BPR has none."""
    import torch

    def spmm(matrix: Any, width: int, count: int = 1) -> tuple[str, Callable]:
        x = torch.randn(matrix.shape[1], width)

        def run() -> None:
            for _ in range(count):
                matrix @ x

        return "sparse", run

    def linear(rows: int, k: int, n: int, input_grad: bool) -> tuple[str, Callable]:
        x, w, g = torch.randn(rows, k), torch.randn(k, n), torch.randn(rows, n)

        def run() -> None:
            x @ w  # forward
            x.T @ g  # weight gradient
            if input_grad:
                g @ w.T

        return "dense", run

    name, cfg = model.name, model.config
    d = getattr(cfg, "embedding_size", 64)
    n_nodes = model.n_users + model.n_items
    if name == "lightgcn":
        return [spmm(model.adjacency, d, 2 * cfg.n_layers)]
    if name == "vbpr":
        items = torch.unique(torch.cat([pos, neg]))
        feats, weight = model.item_features, model.item_linear.weight
        g = torch.randn(len(items), weight.shape[0])

        def project() -> None:
            x = feats[items]  # the batch's feature rows, projected, and the weight gradient
            x @ weight.T
            g.T @ x

        return [("dense", project)]
    if name == "lattice":
        graph, transposed = model._graph  # the epoch's item graph (CSR) and its transpose
        return [
            spmm(graph, d, cfg.n_layers),
            spmm(transposed, d, cfg.n_layers),
            spmm(model.ui_graph, d, 2 * cfg.n_ui_layers),
        ]
    if name in ("mmgcl", "slmrec"):
        c = model.n_channels
        out = [
            linear(model.n_items, getattr(model, f"{m}_features").shape[1], d, False)
            for m in model.modalities
        ]
        if name == "mmgcl":  # main + masked view side by side, edge-dropped view on its own
            out += [spmm(model.adjacency, 2 * c * d, 2 * cfg.n_layers)]
            out += [spmm(model.edge_dropped_adjacency(), c * d, 2 * cfg.n_layers)]
        else:
            views = 1 if cfg.ssl_task == "fac" or cfg.ssl_weight == 0 else 3
            out += [spmm(model.adjacency, views * c * d, 2 * cfg.n_layers)]
        return out
    if name == "mmgcn":
        rows = len(torch.unique(torch.cat([users, pos, neg])))
        out = []
        for modality, gcn in model.gcns.items():
            feats = getattr(model, f"{modality}_features")
            width = feats.shape[1]
            if gcn.project is not None:
                out.append(linear(model.n_items, width, gcn.project.out_features, False))
                width = gcn.project.out_features
            widths = [width] + [d] * (cfg.n_layers - 1)
            for layer, w in enumerate(widths):
                out += [spmm(model.adjacency, w), spmm(model.adjacency_t, w)]
                m = rows if layer == len(widths) - 1 else n_nodes
                out += [linear(m, w, w, True), linear(m, w, d, True)]
                out.append(linear(m, w + d if cfg.concat else w, d, True))
        return out
    return []


def worker_main(args: argparse.Namespace) -> None:
    """Serve JSON commands from stdin, one per line; reply on stdout after REPLY."""
    import torch

    torch.set_num_threads(args.threads)
    import pipeline

    try:  # the allocator policy `lmmrec` sets at start; a checkout before it has none
        from pipeline.core.memory import keep_freed_memory
    except ModuleNotFoundError:
        pass
    else:
        keep_freed_memory()

    worker = Worker(Path(args.worker), args.batch_size, args.seed)
    reply = {"pipeline": str(Path(pipeline.__file__).parent), "sampling_s": worker.sampling_s}
    print(REPLY + json.dumps(reply), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            result: Any = getattr(worker, op)(**cmd)
        except Exception as exc:  # reported to the parent, which carries on with other models
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(REPLY + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side


class Side:
    """A worker process and its command channel."""

    def __init__(self, label: str, pythonpath: Path, folder: Path, args: argparse.Namespace):
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder)]
        command += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
        command += ["--seed", str(args.seed)]
        self.label = label
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.hello = self._read()
        expected = Path(pythonpath) / "pipeline"
        if Path(self.hello["pipeline"]) != expected:
            raise RuntimeError(f"{label} side imported {self.hello['pipeline']}, not {expected}")

    def _read(self) -> Any:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"{self.label} worker exited (code {self.proc.wait()})")

    def ask(self, op: str, **kwargs: Any) -> Any:
        """Run ``op`` in the worker; raise with its message if it failed."""
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(f"{self.label}: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait()


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def save_data(size_name: str, seed: int, folder: Path) -> dict[str, int]:
    """Generate the synthetic data of ``size_name`` once and save it for both sides."""
    from synthetic import SIZES, synthetic_arrays, synthetic_feature_arrays

    size = SIZES[size_name]
    users, items, split = synthetic_arrays(size, seed)
    shape = np.array([size.users, size.items])
    np.savez(folder / "interactions.npz", users=users, items=items, split=split, shape=shape)
    image, text = synthetic_feature_arrays(size.items, seed)
    np.save(folder / "image.npy", image)
    np.save(folder / "text.npy", text)
    return {"users": size.users, "items": size.items, "train": int((split == 0).sum())}


def model_params(name: str) -> dict[str, Any]:
    """The model's hyperparameters in params.yaml (what the pipeline trains), or {} for
    defaults."""
    import yaml

    from stages.params import model_settings

    params = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    return model_settings(params.get("recommenders"), name)[0]


def bench_one(name: str, size_name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Old vs new step times, the new step's split and its floor, for one model and size."""
    params = model_params(name)
    budget = args.budget * (args.elec_budget_factor if size_name == "elec" else 1.0)
    row: dict[str, Any] = {"model": name, "size": size_name}
    old = Side("old", args.base_tree, folder, args)
    new = None
    try:
        old_build = old.ask("build", name=name, params=params)
        old_step = old_build["warm_s"][-1]
        reps = max(args.min_reps, min(args.max_reps, int(budget / max(old_step, 1e-6) / 2)))
        need = old_build["rss_mib"] * 1.2 + 1024
        row["mode"] = "alt" if mem_available_mib() > need else "seq"
        old_times: list[float] = []
        if row["mode"] == "seq":  # two copies would not fit: the old side first, alone
            old_times = old.ask("steps", n=reps)
            old.close()
        new = Side("new", ROOT, folder, args)
        new.ask("build", name=name, params=params)
        new_times: list[float] = []
        if row["mode"] == "alt":
            rounds = min(reps, args.rounds)
            per_round = math.ceil(reps / rounds)
            for _ in range(rounds):
                old_times += old.ask("steps", n=per_round)
                new_times += new.ask("steps", n=per_round)
            old.close()
        else:
            new_times = new.ask("steps", n=reps)
        row.update(
            reps=len(new_times),
            old_s=statistics.median(old_times),
            new_s=statistics.median(new_times),
        )
        row["split"] = new.ask("split", n=max(1, min(3, reps)))
        row["floor"] = new.ask("floor", reps=max(1, min(5, reps)))
    except Exception as exc:  # one broken model must not hide the others
        row["error"] = str(exc)
    finally:
        old.close()
        if new is not None:
            new.close()
    return row


def verdict(row: dict[str, Any]) -> tuple[str, str]:
    """(step / floor, ok or MISS): ok when old/new >= 2 or step <= 1.5 x the floor."""
    floor = row["floor"]["sparse"] + row["floor"]["dense"] + row["floor"]["adam"]
    ratio = row["new_s"] / floor
    met = row["old_s"] / row["new_s"] >= SPEEDUP_TARGET or ratio <= FLOOR_TARGET
    return f"{ratio:.2f}x", "ok" if met else "MISS"


def print_table(rows: list[dict[str, Any]]) -> None:
    ms = 1e3
    head = (
        f"{'size':<5}{'model':<9}{'mode':>5}{'reps':>5}{'old ms':>9}{'new ms':>9}{'old/new':>8}"
        f" |{'sampl':>7}{'sparse':>8}{'dense':>8}{'loss':>7}{'backw':>7}{'optim':>7}{'sum':>8}"
        f" |{'sparse':>8}{'dense':>8}{'adam':>7}{'step/floor':>11}  verdict"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['size']:<5}{r['model']:<9}  FAILED: {r['error']}")
            continue
        s, f = r["split"], r["floor"]
        ratio, ok = verdict(r)
        print(
            f"{r['size']:<5}{r['model']:<9}{r['mode']:>5}{r['reps']:>5}"
            f"{r['old_s'] * ms:>9.1f}{r['new_s'] * ms:>9.1f}{r['old_s'] / r['new_s']:>7.2f}x"
            f" |{s['sampling'] * ms:>7.1f}{s['sparse'] * ms:>8.1f}{s['dense'] * ms:>8.1f}"
            f"{s['loss'] * ms:>7.1f}{s['backward'] * ms:>7.1f}{s['optim'] * ms:>7.1f}"
            f"{s['total'] * ms:>8.1f} |{f['sparse'] * ms:>8.1f}{f['dense'] * ms:>8.1f}"
            f"{f['adam'] * ms:>7.1f}{ratio:>11}  {ok}",
            flush=True,
        )
    print(
        f"ok: old/new >= {SPEEDUP_TARGET:g}x, or the step within {FLOOR_TARGET:g}x of its floor "
        "(unavoidable sparse + dense products + one fused dense Adam step, each timed alone)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (default: every registered)")
    parser.add_argument("--sizes", default="baby,elec", help="baby, elec or both (default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--base-rev", default="e9c98f8", help="the code before (default e9c98f8)")
    parser.add_argument(
        "--base-tree", type=Path, help="its git worktree (default: ../base-<rev>, made if missing)"
    )
    parser.add_argument(
        "--budget", type=float, default=8.0, help="seconds of timed steps per side and model"
    )
    parser.add_argument("--elec-budget-factor", type=float, default=2.0)
    parser.add_argument("--min-reps", type=int, default=2)
    parser.add_argument("--max-reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="alternations old/new")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    from timing import base_tree, chosen_models, ensure_worktree

    names = chosen_models(args.models)
    args.base_tree = base_tree(args.base_tree, args.base_rev)
    ensure_worktree(args.base_tree, args.base_rev)
    rows = []
    started = time.perf_counter()
    for size_name in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench_steps_{size_name}_") as tmp:
            shape = save_data(size_name, args.seed, Path(tmp))
            print(
                f"{size_name}: {shape['users']:,} users, {shape['items']:,} items, "
                f"{shape['train']:,} train pairs; batch {args.batch_size}, {args.threads} "
                f"thread(s); old = {args.base_rev} ({args.base_tree}), new = {ROOT}",
                flush=True,
            )
            for name in names:
                start = time.perf_counter()
                rows.append(bench_one(name, size_name, Path(tmp), args))
                print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s in all\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
