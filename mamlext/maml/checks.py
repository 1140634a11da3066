"""The input contract of MAML's entry points: what would silently compute the wrong thing
is refused with an error that names the problem."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_tasks(model: nn.Module, **values) -> int:
    """The task count ``T`` shared by ``[T, N, ...]`` tensors; clear errors otherwise.

    ``support_x``/``query_x`` may be one tensor or a tuple, list or dict of them (the
    model's positional or keyword arguments, each ``[T, N, ...]``).
    """
    tensors: dict[str, Tensor] = {}
    for name, value in values.items():
        if name.endswith("_x") and isinstance(value, (tuple, list, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            found = {f"{name}[{key!r}]": v for key, v in items if isinstance(v, Tensor)}
            if not found:
                raise TypeError(f"{name} holds no tensor: {type(value).__name__} of {value!r:.80}")
            tensors.update(found)
        elif not isinstance(value, Tensor):
            kinds = (
                "a tensor [T, N, ...] (or a tuple or dict of them)"
                if name.endswith("_x")
                else "a tensor [T, N, ...]"
            )
            raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
        else:
            tensors[name] = value
    counts = {}
    takes_indices = any(isinstance(m, nn.Embedding) for m in model.modules())
    for name, value in tensors.items():
        if value.dim() < 2:
            raise ValueError(
                f"{name} must be [T, N, ...] (tasks, samples, ...), got shape {tuple(value.shape)}"
            )
        if name.endswith("_x") and not (value.is_floating_point() or takes_indices):
            raise TypeError(
                f"{name} has dtype {value.dtype}; the model expects floating-point inputs "
                "(convert images with .float())"
            )
        counts[name] = value.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"support and query sets disagree on the number of tasks T: {counts}")
    if 0 in counts.values():
        raise ValueError("the meta-batch has no task (T = 0)")
    for kind in ("support", "query"):
        samples = {n: t.shape[1] for n, t in tensors.items() if n.startswith(kind)}
        inputs = [n for n in samples if not n.startswith(f"{kind}_y")]
        if any(samples[n] == 0 for n in inputs):
            raise ValueError(
                f"{kind}_x has 0 samples per task: "
                + ("nothing to adapt on" if kind == "support" else "the query loss would be NaN")
            )
        if len(set(samples.values())) > 1:
            first = next(iter(samples))
            other = next(n for n in samples if samples[n] != samples[first])
            raise ValueError(
                f"{first} has {samples[first]} samples per task but {other} has {samples[other]}"
            )
    return next(iter(counts.values()))


def check_step_count(num_steps) -> int:
    """``num_steps`` if it is an integer >= 0, else ``ValueError``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
    return num_steps


def check_step_weights(
    weights: Sequence[float] | Tensor | None, steps: int, recomputed: bool
) -> list[float] | None:
    """The multi-step loss's ``step_weights``: ``steps`` finite floats >= 0, or ``None``.

    ``recomputed``: the inner loop is recomputed in backward (``inner_checkpoint`` with
    gradients on), which keeps no step's graph for the earlier steps' query losses.
    """
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        if weights.dim() != 1 or weights.is_complex():
            raise ValueError(f"step_weights must be a 1-D real tensor, got {weights!r}")
        weights = weights.tolist()
    weights = [float(w) for w in weights]
    if steps == 0:
        raise ValueError("step_weights (the multi-step loss) needs at least one inner step")
    if len(weights) != steps:
        raise ValueError(
            f"step_weights has {len(weights)} weight(s), one per inner step is needed: "
            f"this call takes {steps} step(s)"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"step_weights must be finite and >= 0, got {weights}")
    if recomputed:
        raise ValueError(
            "step_weights (the multi-step loss) needs every inner step's graph, which "
            "inner_checkpoint does not keep; set maml.inner_checkpoint = None"
        )
    return weights


def select_adapted(meta: OrderedDict[str, Tensor], adapt_params) -> list[str]:
    """The names of ``meta`` that ``adapt_params`` selects (names, prefixes or a predicate)."""
    if adapt_params is None:
        return list(meta)
    if callable(adapt_params):
        chosen = [n for n in meta if adapt_params(n)]
    else:
        wanted = [adapt_params] if isinstance(adapt_params, str) else list(adapt_params)
        unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in meta)]
        if unknown:
            raise ValueError(
                f"adapt_params names no parameter: {unknown}; parameters: {list(meta)}"
            )
        chosen = [n for n in meta if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ValueError("adapt_params selects no parameter to adapt")
    return chosen


def warn_if_no_graph(training: bool, stacklevel: int) -> None:
    """Warn when MAML meta-trains under ``torch.no_grad()``: no meta-gradient can follow."""
    if training and not torch.is_grad_enabled():
        warnings.warn(
            "MAML is in training mode under torch.no_grad(): the query loss has no graph, so "
            "backward() cannot give a meta-gradient. For meta-test evaluation use "
            "maml.eval() (no_grad is fine then); .eval() itself never turns gradients off",
            UserWarning,
            stacklevel=stacklevel,
        )


def in_place_guard(model: nn.Module, versions: dict[str, int]):
    """A pre-hook for the meta-loss's backward: refuse meta-parameters changed in place since
    ``versions`` (their ``_version`` counters at the forward) was taken."""
    params = dict(model.named_parameters())

    def check(grad_outputs):
        changed = [n for n, v in versions.items() if params[n]._version != v]
        if changed:
            raise RuntimeError(
                f"meta-parameters {changed} were modified in place after MAML's forward and "
                "before loss.backward() (e.g. an optimizer.step() or an in-place SGD on the "
                "model inside the inner loop). That is fine-tuning, not MAML: the meta-gradient "
                "through the adaptation is lost. Adapt with maml.adapt() or "
                "gradient_update_parameters(), which never modify the meta-parameters, and call "
                "optimizer.step() after loss.backward()"
            )

    return check
