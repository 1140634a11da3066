"""How MAML calls a model with parameters other than its own: the one place that knows what
kind of model it adapts.

- A ``MetaModule`` (mamlext's or torchmeta's layers) takes them itself:
  ``model(x, params=...)``, and runs all tasks at once when its layers can.
- Any other ``nn.Module`` runs its own ``forward`` with them through
  ``torch.func.functional_call``; all tasks at once through ``torch.func.vmap`` of that call
  (the inner gradient is taken outside ``vmap``, with ``torch.autograd``, so second order is
  exact: tested against higher in float64). Its torch BatchNorm layers become mamlext's
  (:func:`~mamlext.modules.norm.make_meta_batchnorm`) so that the BatchNorm policy reaches
  them inside any ``forward``.

Either way, second-order steps run with the attention kernels that have a double backward
(``scaled_dot_product_attention``'s math one) and, on CUDA, without cuDNN for recurrent
layers (whose cuDNN backward has no derivative).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.lazy import LazyModuleMixin

from mamlext.maml.inputs import Inputs, as_arguments
from mamlext.modules import batchable
from mamlext.modules.module import is_meta_module
from mamlext.modules.norm import STATELESS_POLICIES, MetaBatchNormBase, make_meta_batchnorm


class ModelCall:
    """``model`` called with given parameters, for one task or all tasks at once.

    Attributes:
        kind: what the model is, as ``mamlext info``-style text.
        cannot_batch: why ``batched=True`` is refused where :meth:`can_batch` says no.
    """

    kind = "model"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
        self.weight_norm = [name for name, m in model.named_modules() if _uses_weight_norm(m)]

    def check_second_order(self) -> None:
        """Refuse second order through an op whose second derivative torch gets wrong."""
        if self.weight_norm:
            raise ValueError(
                f"{self.weight_norm} use weight normalisation (torch.nn.utils.weight_norm or "
                "parametrizations.weight_norm), whose op torch._weight_norm has a wrong second "
                "derivative with respect to its direction (torch.autograd.gradgradcheck fails): "
                "second-order MAML through it would give a wrong meta-gradient. Use "
                "first_order=True, or compute the weight in the model as g * v / v.norm(...)"
            )

    def check_reads(self, outputs: Tensor, params: OrderedDict[str, Tensor]) -> None:
        """Refuse a forward that did not read ``params`` (adapted tensors, not leaves) through
        the module: then MAML's adaptation could not reach the outputs."""

    def parameters(self) -> OrderedDict[str, Tensor]:
        """The parameters the algorithm may adapt, by name (shared ones included)."""
        raise NotImplementedError

    def __call__(
        self, x: Inputs, params: OrderedDict[str, Tensor], num_tasks: int | None
    ) -> Tensor:
        """Outputs of one task (``num_tasks`` None: ``x`` is ``[N, ...]``) or of all ``T``
        tasks (``x`` is ``[T, N, ...]``, adapted parameters ``[T, *shape]``)."""
        raise NotImplementedError

    def can_batch(self, bn_policy: str | None) -> bool:
        """Whether all tasks can run in one call, exactly, under BatchNorm policy ``bn_policy``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def twice_differentiable(self, device: torch.device) -> Iterator[None]:
        """Kernels whose backward can be differentiated again (second-order inner steps)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if self._has_rnn and device.type == "cuda":
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            yield


class MetaModuleCall(ModelCall):
    """``model(x, params=params)``: torchmeta's convention."""

    kind = "MetaModule"
    cannot_batch = (
        "batched=True needs a MetaModule built only from mamlext's Meta layers and per-sample "
        "modules (another forward cannot be task-batched); use batched='auto' or False"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._batchable = batchable(model)  # its layers' types: fixed once built

    def parameters(self) -> OrderedDict[str, Tensor]:
        return OrderedDict(self.model.meta_named_parameters())

    def __call__(self, x, params, num_tasks):
        args, kwargs = as_arguments(x)
        return self.model(*args, params=params, **kwargs)

    def can_batch(self, bn_policy: str | None) -> bool:
        return self._batchable


class FunctionalCall(ModelCall):
    """The model's own ``forward`` with the given parameters (``torch.func.functional_call``).

    Raises:
        TypeError: a lazy module not yet initialised.
    """

    kind = "nn.Module (torch.func.functional_call)"
    cannot_batch = (
        "batched=True runs the model's forward under torch.func.vmap, which this model does "
        "not allow exactly: a recurrent layer, a BatchNorm subclass of its own, or BatchNorm "
        "layers with bn 'per_step', 'running' or None (they update or record running "
        "statistics); use batched='auto' or False"
    )

    def __init__(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                raise TypeError(
                    f"MAML: {name or 'the model'!r} ({type(module).__name__}) is a lazy module "
                    "whose parameters do not exist yet: run one forward on a batch of inputs "
                    "first, then build mamlext.MAML(model)"
                )
        super().__init__(model)
        self.meta_batchnorm = make_meta_batchnorm(model)
        self._has_foreign_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, MetaBatchNormBase)
            for m in model.modules()
        )

    def parameters(self) -> OrderedDict[str, Tensor]:
        return OrderedDict(self.model.named_parameters())

    def __call__(self, x, params, num_tasks):
        args, kwargs = as_arguments(x)
        versions = {name: t._version for name, t in params.items()}
        if num_tasks is None:
            out = functional_call(self.model, params, args, kwargs)
        else:
            own = self.model.get_parameter
            dims = {name: 0 if t.dim() > own(name).dim() else None for name, t in params.items()}
            in_dims = (dims, _tensor_dims(args), _tensor_dims(kwargs))
            # the math attention kernel: the fused ones have no batching rule (a slow loop)
            with sdpa_kernel(SDPBackend.MATH):
                out = vmap(self._call, in_dims=in_dims, randomness="different")(
                    params, args, kwargs
                )
        changed = [name for name, t in params.items() if t._version != versions[name]]
        if changed:
            raise RuntimeError(
                f"the forward of {type(self.model).__name__} modified {changed} in place: MAML "
                "passes it the adapted parameters, and an in-place change of them (e.g. "
                "weight.clamp_() or weight.data.copy_()) makes the meta-gradient wrong. Change "
                "the forward to compute with a new tensor (w = weight.clamp(-1, 1))"
            )
        return out

    def _call(self, params, args, kwargs):
        return functional_call(self.model, params, args, kwargs)

    def check_reads(self, outputs: Tensor, params: OrderedDict[str, Tensor]) -> None:
        """Refuse a forward that did not read ``params`` through the module's attributes (a
        tensor held in a list or closure, which ``functional_call`` cannot replace): the
        adapted values would not reach the outputs, and the meta-gradient would be wrong.

        Once per MAML: one backward of the outputs to the adapted tensors (the graph is kept).
        """
        wanted = {name: t for name, t in params.items() if t.requires_grad}
        if not wanted or not outputs.requires_grad:
            return
        reached = torch.autograd.grad(
            outputs.sum(), list(wanted.values()), retain_graph=True, allow_unused=True
        )
        missing = [name for name, grad in zip(wanted, reached) if grad is None]
        if missing:
            raise ValueError(
                f"the forward of {type(self.model).__name__} does not read {missing} through "
                "its module attributes (a tensor kept in a list, a dict or a closure, say), so "
                "the adapted values MAML gives it never reach the outputs and the meta-gradient "
                "would be wrong; read the parameter as self.<module>.<name> in forward"
            )

    def can_batch(self, bn_policy: str | None) -> bool:
        """``vmap`` runs every task's forward in one call, with one condition per hazard:
        no recurrent layer (no batching rule), no BatchNorm that records or updates running
        statistics (side effects inside ``vmap``: only ``bn="transductive"`` and
        ``"support"``)."""
        if self._has_rnn or self._has_foreign_norm:
            return False
        return not self.meta_batchnorm or bn_policy in STATELESS_POLICIES


def _uses_weight_norm(module: nn.Module) -> bool:
    hooks = getattr(module, "_forward_pre_hooks", {}).values()
    if any(type(hook).__name__ == "WeightNorm" for hook in hooks):  # torch.nn.utils.weight_norm
        return True
    parametrizations = getattr(module, "parametrizations", {})
    return any(
        type(p).__name__ == "_WeightNorm" for plist in parametrizations.values() for p in plist
    )


def _tensor_dims(values: tuple | dict) -> tuple | dict:
    """``vmap``'s in_dims for arguments: the task dimension of tensors, none of other values."""
    if isinstance(values, dict):
        return {k: 0 if isinstance(v, Tensor) else None for k, v in values.items()}
    return tuple(0 if isinstance(v, Tensor) else None for v in values)


def model_call(model: nn.Module) -> ModelCall:
    """The call that fits ``model``: its ``params=`` if it takes them, else its own forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"MAML needs an nn.Module, got {type(model).__name__}")
    return MetaModuleCall(model) if is_meta_module(model) else FunctionalCall(model)
