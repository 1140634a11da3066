"""The peers: each builds, on one benchmark batch, a meta-training step and its meta-gradient.

Every peer starts from the seed model's weights (:func:`~mamlext.bench.configs.twin`) and
runs the second-order MAML meta-training step its users write: for every task the inner
loop on the support set and the query loss, the mean over tasks, backward, Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mamlext
from mamlext.bench.configs import CONFIGS, FULL_CONFIGS, QUICK_CONFIGS, Config, seed_model, twin
from mamlext.data.tasks import Batch
from mamlext.models import META_LAYERS, PLAIN_LAYERS, Conv4Layers

META_LR = 1e-3


class PeerUnavailable(RuntimeError):
    """The peer's library cannot be imported here."""


class Peer(NamedTuple):
    step: Callable[[], None]  # one meta-training step (Adam on the meta-parameters)
    meta_gradient: Callable[[], list[Tensor]]  # the meta-gradients, weights unchanged
    path: str = ""  # which code path served it (mamlext: batched or per-task)


def make_peer(params: list[Tensor], backward: Callable[[], None], path: str = "") -> Peer:
    """``backward()`` accumulates the meta-gradient of the mean query loss into ``.grad``."""
    optimizer = torch.optim.Adam(params, lr=META_LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()

    def meta_gradient() -> list[Tensor]:
        optimizer.zero_grad(set_to_none=True)
        backward()
        return [p.grad.detach().clone() for p in params]

    return Peer(step, meta_gradient, path)


def _import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise PeerUnavailable(f"not installed ({reason})") from error


def _seed_model_like(cfg: Config, like: Tensor) -> nn.Module:
    return seed_model(cfg).to(like.device, like.dtype)


def build_higher(cfg: Config, batch: Batch) -> Peer:
    """higher's ``innerloop_ctx`` per task, query loss / T backward per task (as users do)."""
    higher = _import("higher")
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model = _seed_model_like(cfg, xs)
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.step_size)

    def backward() -> None:
        for t in range(cfg.tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(cfg.steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                (F.cross_entropy(fmodel(xq[t]), yq[t]) / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_torchmeta(cfg: Config, batch: Batch) -> Peer:
    """torchmeta's Meta layers and ``gradient_update_parameters`` loop per task."""
    _import("mamlext.compat.torchmeta")  # makes torchmeta importable on current torch
    tm = _import("torchmeta.modules")
    update = _import("torchmeta.utils.gradient_based").gradient_update_parameters
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    layers = Conv4Layers(tm.MetaConv2d, tm.MetaBatchNorm2d, tm.MetaLinear, tm.MetaSequential)
    model = twin(cfg, xs, layers)

    def backward() -> None:
        for t in range(cfg.tasks):
            params = None
            for _ in range(cfg.steps):
                loss = F.cross_entropy(model(xs[t], params=params), ys[t])
                params = update(model, loss, params=params, step_size=cfg.step_size)
            query_loss = F.cross_entropy(model(xq[t], params=params), yq[t])
            (query_loss / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_torch_func(cfg: Config, batch: Batch) -> Peer:
    """``functional_call`` + ``grad`` + ``vmap`` over tasks (BN without running stats).

    Its second-order meta-gradient through training-mode BatchNorm is wrong (reported in
    pytorch/functorch#534; measured in benchmarks/results/maml_cpu.md); the correctness
    column shows by how much.
    """
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    norm = partial(nn.BatchNorm2d, track_running_stats=False)
    model = twin(cfg, xs, PLAIN_LAYERS._replace(norm=norm))
    func = torch.func

    def loss(params, x, y):
        return F.cross_entropy(func.functional_call(model, params, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        for _ in range(cfg.steps):
            grads = func.grad(loss)(params, xs, ys)
            params = {n: p - cfg.step_size * grads[n] for n, p in params.items()}
        return loss(params, xq, yq)

    tasks_loss = func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    params = dict(model.named_parameters())

    def backward() -> None:
        tasks_loss(params, xs, ys, xq, yq).mean().backward()

    return make_peer(list(params.values()), backward)


def build_foreach(cfg: Config, batch: Batch) -> Peer:
    """A plain per-task autograd loop: ``functional_call``, ``torch._foreach_add`` update."""
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model = _seed_model_like(cfg, xs)
    names, params = zip(*model.named_parameters())

    def logits(fast, x):
        return torch.func.functional_call(model, dict(zip(names, fast)), (x,))

    def backward() -> None:
        for t in range(cfg.tasks):
            fast = list(params)
            for _ in range(cfg.steps):
                loss = F.cross_entropy(logits(fast, xs[t]), ys[t])
                grads = torch.autograd.grad(loss, fast, create_graph=True)
                fast = torch._foreach_add(fast, grads, alpha=-cfg.step_size)
            query_loss = F.cross_entropy(logits(fast, xq[t]), yq[t])
            (query_loss / cfg.tasks).backward()

    return make_peer(list(params), backward)


def build_learn2learn(cfg: Config, batch: Batch) -> Peer:
    """learn2learn's ``MAML`` wrapper: ``clone()`` and ``adapt()`` per task."""
    l2l = _import("learn2learn")
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model = _seed_model_like(cfg, xs)
    maml = l2l.algorithms.MAML(model, lr=cfg.step_size, first_order=False)

    def backward() -> None:
        for t in range(cfg.tasks):
            learner = maml.clone()
            for _ in range(cfg.steps):
                learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
            (F.cross_entropy(learner(xq[t]), yq[t]) / cfg.tasks).backward()

    return make_peer(list(model.parameters()), backward)


def build_torchopt(cfg: Config, batch: Batch) -> Peer:
    """TorchOpt's functional API per task: ``torchopt.sgd`` updates applied out of place."""
    torchopt = _import("torchopt")
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model = _seed_model_like(cfg, xs)
    names, params = zip(*model.named_parameters())
    inner = torchopt.sgd(lr=cfg.step_size)

    def loss(fast, x, y) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, fast)), (x,)), y)

    def backward() -> None:
        for t in range(cfg.tasks):
            fast, state = params, inner.init(params)
            for _ in range(cfg.steps):
                grads = torch.autograd.grad(loss(fast, xs[t], ys[t]), fast, create_graph=True)
                updates, state = inner.update(grads, state, inplace=False)
                fast = torchopt.apply_updates(fast, updates, inplace=False)
            (loss(fast, xq[t], yq[t]) / cfg.tasks).backward()

    return make_peer(list(params), backward)


def build_mamlext(
    cfg: Config,
    batch: Batch,
    batched: bool | str = "auto",
    inner_checkpoint=None,
    layers: Conv4Layers = META_LAYERS,
) -> Peer:
    """``mamlext.MAML`` (``batched`` as given; path recorded). ``layers``: mamlext's Meta
    layers (a MetaModule), or torch's (a plain nn.Module, run through its own forward)."""
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model = twin(cfg, xs, layers)
    maml = mamlext.MAML(
        model, step_size=cfg.step_size, num_steps=cfg.steps, batched=batched,
        inner_checkpoint=inner_checkpoint,
    )  # fmt: skip
    path = ("batched" if maml.use_batched(xs, xq) else "per-task") + (
        "" if layers is META_LAYERS else ", nn.Module"
    )

    def backward() -> None:
        maml.meta_backward(xs, ys, xq, yq)  # the training loop's call: per-pass backward

    return make_peer(list(model.parameters()), backward, path)


PEERS: dict[str, Callable[[Config, Batch], Peer]] = {
    "higher": build_higher,
    "torchmeta": build_torchmeta,
    "torch.func": build_torch_func,
    "foreach loop": build_foreach,
    "learn2learn": build_learn2learn,
    "torchopt": build_torchopt,
    "mamlext": build_mamlext,
    "mamlext (batched)": partial(build_mamlext, batched=True),
    "mamlext (per-task)": partial(build_mamlext, batched=False),
    "mamlext (checkpoint auto)": partial(build_mamlext, inner_checkpoint="auto"),
    # the same Conv-4 built from torch's layers: MAML for any nn.Module
    "mamlext (nn.Module)": partial(build_mamlext, layers=PLAIN_LAYERS),
    "mamlext (nn.Module, vmap)": partial(build_mamlext, batched=True, layers=PLAIN_LAYERS),
    "mamlext (nn.Module, per-task)": partial(build_mamlext, batched=False, layers=PLAIN_LAYERS),
}
QUICK_PEERS = (
    "higher",
    "torchmeta",
    "foreach loop",
    "mamlext",
    "mamlext (nn.Module)",
    "torch.func",
)
NOTES = {  # shown in the table's note column
    "torch.func": "meta-gradient wrong through BatchNorm under vmap (pytorch/functorch#534)",
}


def plan(
    quick: bool, configs: Iterable[str] | None = None, peers: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """The (config, peer) pairs to measure, higher first in each config (the reference)."""
    configs = list(configs or (QUICK_CONFIGS if quick else FULL_CONFIGS))
    chosen = list(peers or (QUICK_PEERS if quick else PEERS))
    unknown = [c for c in configs if c not in CONFIGS] + [p for p in chosen if p not in PEERS]
    if unknown:
        raise ValueError(
            f"unknown configs or peers {unknown}; configs: {list(CONFIGS)}, peers: {list(PEERS)}"
        )
    ordered = [p for p in PEERS if p in chosen]
    ordered.sort(key=lambda p: p != "higher")
    return [
        (c, p)
        for c in configs
        for p in ordered
        if not (quick and peers is None and p == "torch.func" and c != "A")
    ]
