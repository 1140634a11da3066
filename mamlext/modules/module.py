"""``MetaModule``: torchmeta's ``forward(x, params=None)`` convention, plus task batching.

Every layer accepts ``params``, a dict from its parameter names to tensors that replace
its own parameters for this call (the adapted "fast weights" of MAML). A value is either

- unbatched, of the parameter's own shape: torchmeta's exact semantics; or
- task-batched, ``[T, *shape]``: one set of weights per task. Then inputs are
  ``[T, N, ...]`` and each layer computes all ``T`` tasks in one pass (batched matmul,
  grouped convolution, per-task normalisation statistics). Within a task-batched call
  an unbatched value is shared by every task (ANIL's frozen body).

The outermost ``MetaModule`` call decides the mode once from ``params`` and records the
task count for the layers below it (:func:`task_count`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Iterator, Mapping

from torch import Tensor, nn

Params = Mapping[str, Tensor]

_TASKS: contextvars.ContextVar[int | None] = contextvars.ContextVar("mamlext_tasks", default=None)


def task_count() -> int | None:
    """The number of tasks of the task-batched call in progress, or ``None``."""
    return _TASKS.get()


@contextlib.contextmanager
def task_batched(num_tasks: int | None) -> Iterator[None]:
    """Run the enclosed MetaModule calls task-batched over ``num_tasks`` tasks."""
    token = _TASKS.set(num_tasks)
    try:
        yield
    finally:
        _TASKS.reset(token)


class MetaModule(nn.Module):
    """Base class of modules whose ``forward`` takes ``params=``, as torchmeta's.

    Subclasses implement ``forward(self, input, params=None)`` and read their
    parameters with :meth:`meta_param` (or a child's sub-dictionary with
    :meth:`get_subdict`).
    """

    def meta_named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters that belong to MetaModules (the ones ``params`` may replace)."""
        gen = self._named_members(
            lambda module: module._parameters.items() if is_meta_module(module) else [],
            prefix=prefix,
            recurse=recurse,
        )
        yield from gen

    def meta_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, param in self.meta_named_parameters(recurse=recurse):
            yield param

    def get_subdict(self, params: Params | None, key: str | None = None) -> Params | None:
        """The entries of ``params`` under ``key.`` with that prefix removed.

        Unlike torchmeta, a child with no entries gets an empty dict (so a missing
        weight is an error in the child), never ``None`` (its own weights, silently).
        """
        if params is None or key is None:
            return params
        prefix = key + "."
        return OrderedDict(
            (name[len(prefix) :], value)
            for name, value in params.items()
            if name.startswith(prefix)
        )

    def meta_param(self, params: Params | None, name: str) -> Tensor | None:
        """The tensor that stands for parameter ``name`` in this call.

        ``None`` params means the module's own. Raises ``KeyError`` naming the entry when
        ``params`` lacks one the module has.
        """
        own = getattr(self, name)
        if params is None or own is None:
            return own
        try:
            return params[name]
        except KeyError:
            raise KeyError(
                f"params has no entry {name!r} for {self._get_name()} "
                f"(its entries: {sorted(params) or 'none'}); pass every parameter of "
                "model.meta_named_parameters(), e.g. OrderedDict(model.meta_named_parameters())"
            ) from None

    def __call__(self, *args, **kwargs):
        params = kwargs.get("params", args[1] if len(args) > 1 else None)
        if not isinstance(params, Mapping) or task_count() is not None:
            return super().__call__(*args, **kwargs)
        num_tasks = infer_task_count(self, params)
        if num_tasks is None:
            return super().__call__(*args, **kwargs)
        with task_batched(num_tasks):
            return super().__call__(*args, **kwargs)


def is_meta_module(module: nn.Module) -> bool:
    """A module that takes ``params=``: mamlext's, or another library's (torchmeta's)."""
    return isinstance(module, MetaModule) or callable(
        getattr(module, "meta_named_parameters", None)
    )


def infer_task_count(module: nn.Module, params: Params) -> int | None:
    """``T`` if any value of ``params`` is ``[T, *shape]`` of its parameter, else ``None``.

    Raises ``ValueError`` when batched values disagree on ``T`` or a value fits neither.
    """
    own = dict(module.named_parameters())
    counts = {}
    for name, value in params.items():
        param = own.get(name)
        if param is None:
            continue
        if value.shape == param.shape:
            continue
        if value.dim() == param.dim() + 1 and value.shape[1:] == param.shape:
            counts[name] = value.shape[0]
        else:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(value.shape)}; expected the parameter's "
                f"shape {tuple(param.shape)} or a task-batched [T, *shape]"
            )
    if not counts:
        return None
    if len(set(counts.values())) > 1:
        raise ValueError(f"task-batched params disagree on the number of tasks: {counts}")
    return next(iter(counts.values()))


def per_task(value: Tensor | None, own: Tensor | None, num_tasks: int) -> Tensor | None:
    """``value`` as ``[T, *shape]``: a shared (unbatched) value is expanded without a copy."""
    if value is None or own is None:
        return value
    if value.dim() == own.dim():
        return value.expand(num_tasks, *value.shape)
    return value


def check_task_input(input: Tensor, num_tasks: int, layer: nn.Module, min_dim: int) -> None:
    if input.dim() < min_dim or input.shape[0] != num_tasks:
        raise ValueError(
            f"{layer._get_name()}: task-batched input must be [T={num_tasks}, N, ...] with at "
            f"least {min_dim} dims, got shape {tuple(input.shape)}"
        )


def fold_tasks(x: Tensor) -> tuple[Tensor, bool]:
    """``[T, N, ...] -> [T*N, ...]`` (or ``[N*T, ...]``, whichever needs no copy).

    For per-sample modules the order of samples is irrelevant; keeping an N-major
    tensor N-major lets convolution outputs flow through pooling with no copies.
    Returns the folded tensor and whether it is N-major (for :func:`unfold_tasks`).
    """
    n_major = x.dim() >= 2 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
    if n_major:
        return x.transpose(0, 1).flatten(0, 1), True
    return x.flatten(0, 1), False


def unfold_tasks(y: Tensor, num_tasks: int, n_major: bool) -> Tensor:
    if n_major:
        return y.unflatten(0, (-1, num_tasks)).transpose(0, 1)
    return y.unflatten(0, (num_tasks, -1))
