"""Containers that route each child its sub-dictionary of ``params``."""

from __future__ import annotations

from torch import Tensor, nn

from mamlext.modules.module import (
    MetaModule,
    Params,
    fold_tasks,
    is_meta_module,
    task_count,
    unfold_tasks,
)

# Plain modules that act element by element: in a task-batched call they take the
# [T, N, ...] tensor as it is; any other plain module sees tasks folded into its batch.
ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout,
)  # fmt: skip


def call_child(module: nn.Module, input: Tensor, params: Params | None) -> Tensor:
    """Call one child: Meta children get ``params``; plain ones see folded tasks."""
    if is_meta_module(module):
        return module(input, params=params)
    num_tasks = task_count()
    if num_tasks is None or isinstance(module, ELEMENTWISE):
        return module(input)
    folded, n_major = fold_tasks(input)
    return unfold_tasks(module(folded), num_tasks, n_major)


class MetaSequential(nn.Sequential, MetaModule):
    """``nn.Sequential`` whose Meta children receive their entries of ``params``."""

    def forward(self, input: Tensor, params: Params | None = None) -> Tensor:
        for name, module in self._modules.items():
            input = call_child(module, input, self.get_subdict(params, name))
        return input


class MetaModuleList(nn.ModuleList, MetaModule):
    """``nn.ModuleList`` of Meta modules; index it and pass ``get_subdict(params, str(i))``."""


class MetaModuleDict(nn.ModuleDict, MetaModule):
    """``nn.ModuleDict`` of Meta modules; pass ``get_subdict(params, key)`` to each."""
