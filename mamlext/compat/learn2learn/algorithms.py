"""``learn2learn.algorithms``: ``MAML`` and ``MetaSGD`` with mamlext's fused update.

Written from learn2learn 0.2.0's documented and tested behaviour. A learner wraps a model;
``clone()`` returns a differentiable copy (:func:`~.utils.clone_module`: the original's
``.grad`` receives the gradients of every clone, BatchNorm running statistics are shared);
``adapt(loss)`` takes one SGD step of the copy's parameters, ``p - lr * g`` for all of them
in one call of :func:`mamlext.inner.sgd_update` (the fused op: the same numbers as
learn2learn's ``p + (-lr * g)``), differentiable twice unless first order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mamlext.compat.learn2learn.utils import (
    clone_module,
    clone_parameters,
    swap_parameters,
    update_module,
)
from mamlext.inner import sgd_update

__all__ = ["BaseLearner", "MAML", "MetaSGD", "maml_update", "meta_sgd_update"]

HINT = "learn2learn: Maybe try with allow_nograd=True and/or allow_unused=True ?"


class BaseLearner(nn.Module):
    """Wraps ``module``: called like it, and its attributes are reachable through the learner."""

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self.module = module

    def __getattr__(self, attr: str):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], attr)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _fused_update(model: nn.Module, rates, grads: Sequence[Tensor | None]) -> nn.Module:
    """``p - rate * g`` for every parameter of ``model`` with a gradient, in place of ``p``."""
    params = list(model.parameters())
    if len(grads) != len(params):
        warnings.warn(
            f"the parameters and gradients have different lengths ({len(params)} vs {len(grads)})",
            stacklevel=3,
        )
    rates = rates if isinstance(rates, (list, tuple, nn.ParameterList)) else [rates] * len(params)
    chosen = [(p, g, r) for p, g, r in zip(params, grads, rates) if g is not None]
    if not chosen:
        return model
    updated = sgd_update(
        [p for p, _, _ in chosen], [g for _, g, _ in chosen], [r for *_, r in chosen]
    )
    return swap_parameters(model, {id(p): u for (p, _, _), u in zip(chosen, updated)})


def maml_update(model: nn.Module, lr, grads: Sequence[Tensor | None] | None = None) -> nn.Module:
    """One SGD step of ``model``'s parameters with ``grads`` (one per parameter, ``None``: not
    updated), in place; without ``grads``, the ``update`` attributes (as ``update_module``)."""
    if grads is None:
        return update_module(model)
    return _fused_update(model, lr, grads)


class MAML(BaseLearner):
    """MAML over any module (learn2learn's ``MAML``).

    Args:
        model: the module to meta-learn.
        lr: the inner learning rate (a float or a tensor).
        first_order: drop the second-order terms (FOMAML).
        allow_unused: parameters the loss does not use get no update (default:
            ``allow_nograd``).
        allow_nograd: parameters with ``requires_grad=False`` get no update (else ``adapt``
            raises when it meets one).
    """

    def __init__(
        self,
        model: nn.Module,
        lr,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
    ) -> None:
        super().__init__(model)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One inner step of this learner's parameters on ``loss``, in place."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        second_order = not first_order
        params = list(self.module.parameters())
        wanted = [p for p in params if p.requires_grad] if allow_nograd else params
        try:
            computed = torch.autograd.grad(
                loss, wanted, retain_graph=second_order, create_graph=second_order,
                allow_unused=allow_unused,
            )  # fmt: skip
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{HINT}") from error
        found = iter(computed)
        grads = [next(found) if (p.requires_grad or not allow_nograd) else None for p in params]
        self.module = maml_update(self.module, self.lr, grads)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """A differentiable copy of this learner (its flags as given, else this one's)."""
        return MAML(
            clone_module(self.module),
            lr=self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )


def meta_sgd_update(
    model: nn.Module, lrs: Sequence[Tensor] | None = None, grads: Sequence[Tensor] | None = None
) -> nn.Module:
    """``p - lr_p * g_p`` (element-wise rates) for every parameter of ``model``, in place."""
    if lrs is None or grads is None:
        raise ValueError("meta_sgd_update needs lrs and grads (one of each per parameter)")
    return _fused_update(model, list(lrs), grads)


class MetaSGD(BaseLearner):
    """Meta-SGD (learn2learn's ``MetaSGD``): a learned rate for every parameter element.

    Args:
        model: the module to meta-learn.
        lr: the rates' initial value.
        first_order: drop the second-order terms (the rates are still learned).
        lrs: the rates, one tensor per parameter (default: ``lr`` everywhere, learned).
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__(model)
        if lrs is None:
            lrs = nn.ParameterList(
                [nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()]
            )
        self.lrs = lrs
        self.first_order = first_order

    def clone(self) -> MetaSGD:
        """A differentiable copy of this learner and of its rates."""
        return MetaSGD(
            clone_module(self.module), lrs=clone_parameters(self.lrs), first_order=self.first_order
        )

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One inner step of this learner's parameters on ``loss``, in place."""
        second_order = not (self.first_order if first_order is None else first_order)
        grads = torch.autograd.grad(
            loss, list(self.module.parameters()), retain_graph=second_order,
            create_graph=second_order,
        )  # fmt: skip
        self.module = meta_sgd_update(self.module, self.lrs, grads)
