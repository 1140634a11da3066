r"""The inner learning rates :math:`\alpha^{(k)}` of MAML: fixed, or learned (Meta-SGD, MAML++)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

STEP_SIZE_MODES = ("fixed", "per_element", "per_layer_per_step")


class StepSizes(nn.Module):
    r"""The learning rate of each adapted tensor at each inner step.

    Modes:

    ``"fixed"``
        one float :math:`\alpha` for every tensor and step; nothing is learned.
    ``"per_element"`` (Meta-SGD)
        rate ``i`` is a learned tensor of the shape of adapted tensor ``i``, the same at
        every step: :math:`\theta_i \leftarrow \theta_i - \alpha_i \odot g_i`.
    ``"per_layer_per_step"`` (MAML++)
        rate ``i`` is a learned ``[num_steps]`` vector: step ``k`` uses
        :math:`\alpha_i^{(k)}`; steps beyond the trained ones (e.g. at meta-test) reuse the
        last.

    Rate ``i`` is the parameter named ``str(i)`` (``step_sizes.0``, ``step_sizes.1``, ...
    in :class:`mamlext.MAML`'s state_dict).

    Args:
        params: the adapted tensors, in adaptation order; learned rates take their dtype,
            device and (``per_element``) shape.
        mode: one of ``STEP_SIZE_MODES``.
        step_size: :math:`\alpha`, or the initial value of the learned rates.
        num_steps: inner steps of meta-training (``per_layer_per_step``: rates per tensor).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        mode: str = "fixed",
        step_size: float = 0.4,
        num_steps: int = 1,
    ) -> None:
        super().__init__()
        if mode not in STEP_SIZE_MODES:
            raise ValueError(f"step_size_mode must be one of {STEP_SIZE_MODES}, got {mode!r}")
        self.mode = mode
        self.step_size = float(step_size)
        for i, param in enumerate(params):
            if mode == "per_element":
                rate = torch.full_like(param.detach(), step_size)
            elif mode == "per_layer_per_step":
                rate = param.detach().new_full((max(num_steps, 1),), step_size)
            else:
                break
            self.register_parameter(str(i), nn.Parameter(rate))

    @property
    def rates(self) -> list[nn.Parameter]:
        """The learned rates, one per adapted tensor (empty when ``fixed``)."""
        return list(self.parameters())

    def at(self, step: int) -> float | list[Tensor]:
        """The learning rate of inner step ``step``: a float, or one tensor per adapted tensor."""
        if self.mode == "per_element":
            return self.rates
        if self.mode == "per_layer_per_step":
            return [rates[min(step, rates.shape[0] - 1)] for rates in self.rates]
        return self.step_size

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, step_size={self.step_size}, rates={len(self.rates)}"
