"""Toy regression task samplers (float32) in the meta-batch format of :mod:`mamlext.data.tasks`.

``batch["train"] = (x [B, shots, 1], y [B, shots, 1])``, ``batch["test"]`` likewise with
``test_shots`` points. The support and query points of a task come from the same function.
:meth:`sample_with_params` also returns each task's parameters, and :meth:`true_function`
evaluates the noise-free function at any inputs (e.g. to plot the true curve).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamlext.data.tasks import Batch, SeededSampler

Params = dict[str, Tensor]


class _Regression(SeededSampler):
    def __init__(
        self, shots: int, test_shots: int, noise_std: float = 0.0, seed: int = 0, rank: int = 0
    ) -> None:
        super().__init__(seed, rank)
        if shots < 1 or test_shots < 0:
            raise ValueError(f"need shots >= 1 and test_shots >= 0, got {shots}, {test_shots}")
        self.shots, self.test_shots, self.noise_std = shots, test_shots, noise_std

    def _uniform(self, low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator).mul_(high - low).add_(low)

    def sample_params(self, meta_batch: int) -> Params:
        raise NotImplementedError

    def sample_inputs(self, params: Params, num: int) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def true_function(params: Params, x: Tensor) -> Tensor:
        """Noise-free targets ``[B, K, 1]`` of the tasks ``params`` at inputs ``x [B, K, 1]``."""
        raise NotImplementedError

    def sample_with_params(self, meta_batch: int) -> tuple[Batch, Params]:
        """A meta-batch and the parameters (each ``[B]`` or ``[B, 2]``) of its tasks."""
        params = self.sample_params(meta_batch)
        x = self.sample_inputs(params, self.shots + self.test_shots)
        y = self.true_function(params, x)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=self.generator)
        k = self.shots
        return {"train": (x[:, :k], y[:, :k]), "test": (x[:, k:], y[:, k:])}, params

    def sample(self, meta_batch: int) -> Batch:
        """A meta-batch: ``{"train": (x [B, shots, 1], y [B, shots, 1]), "test": ...}``."""
        return self.sample_with_params(meta_batch)[0]


class Sinusoid(_Regression):
    """Sine regression of the MAML paper (Finn et al., 2017): ``y = A sin(x - phase)``.

    Amplitude ``A ~ U[0.1, 5.0]``, phase ``~ U[0, pi]``, inputs ``x ~ U[-5.0, 5.0]`` (as in
    torchmeta's ``Sinusoid``); Gaussian noise of std ``noise_std`` on the targets (default
    none). Parameters: ``{"amplitude": [B], "phase": [B]}``.

    Args:
        shots: support points per task. test_shots: query points per task.
        noise_std: target noise. seed, rank: select the random stream (see ``SeededSampler``).
    """

    amplitude_range = (0.1, 5.0)
    phase_range = (0.0, math.pi)
    input_range = (-5.0, 5.0)

    def sample_params(self, meta_batch: int) -> Params:
        return {
            "amplitude": self._uniform(*self.amplitude_range, meta_batch),
            "phase": self._uniform(*self.phase_range, meta_batch),
        }

    def sample_inputs(self, params: Params, num: int) -> Tensor:
        return self._uniform(*self.input_range, params["phase"].shape[0], num, 1)

    @staticmethod
    def true_function(params: Params, x: Tensor) -> Tensor:
        a, p = (params[k].view(-1, 1, 1) for k in ("amplitude", "phase"))
        return a * torch.sin(x - p)


class Harmonic(_Regression):
    """Sum of two sines with frequency ratio 2 (Lacoste et al., 2018), as torchmeta's ``Harmonic``.

    ``y = a1 sin(w x + b1) + a2 sin(2 w x + b2)`` with frequency ``w ~ U[5.0, 7.0]``, phases
    ``b1, b2 ~ U[0, 2 pi]``, amplitudes ``a1, a2 ~ N(0, 1)``, and inputs ``x ~ N(mu, 1)`` around
    a per-task centre ``mu ~ U[-4.0, 4.0]``. (torchmeta's docstring says the amplitudes vary in
    [5, 7]; its code draws them from N(0, 1), as here, and [5, 7] is the frequency.)
    Parameters: ``{"mean": [B], "frequency": [B], "amplitude": [B, 2], "phase": [B, 2]}``.

    Args:
        shots: support points per task. test_shots: query points per task.
        noise_std: target noise. seed, rank: select the random stream (see ``SeededSampler``).
    """

    mean_range = (-4.0, 4.0)
    frequency_range = (5.0, 7.0)
    phase_range = (0.0, 2 * math.pi)

    def sample_params(self, meta_batch: int) -> Params:
        return {
            "mean": self._uniform(*self.mean_range, meta_batch),
            "frequency": self._uniform(*self.frequency_range, meta_batch),
            "amplitude": torch.randn(meta_batch, 2, generator=self.generator),
            "phase": self._uniform(*self.phase_range, meta_batch, 2),
        }

    def sample_inputs(self, params: Params, num: int) -> Tensor:
        mean = params["mean"]
        return mean.view(-1, 1, 1) + torch.randn(mean.shape[0], num, 1, generator=self.generator)

    @staticmethod
    def true_function(params: Params, x: Tensor) -> Tensor:
        w = params["frequency"].view(-1, 1, 1)
        a, b = params["amplitude"].unsqueeze(1), params["phase"].unsqueeze(1)  # [B, 1, 2]
        return a[..., :1] * torch.sin(w * x + b[..., :1]) + a[..., 1:] * torch.sin(
            2 * w * x + b[..., 1:]
        )
