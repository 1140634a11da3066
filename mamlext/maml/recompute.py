r"""The inner loop recomputed during backward (``MAML(inner_checkpoint=...)``, activation
checkpointing): exact meta-gradients in memory that does not grow with the inner steps.

The inner loop :math:`\theta^{(k+1)} = u_k(\theta^{(k)})` runs in segments of ``n`` steps.
Forward keeps only each segment's first state :math:`\theta^{(k_0)}` (the adapted tensors),
not the graph of its steps. Backward, last segment first, runs the segment again from its
saved state *with* its graph (second order, the same random numbers), back-propagates the
incoming gradient through it, and frees it. The chain rule is the same, so the
meta-gradient is the stored-graph one; what changes is the memory:

.. math:: \text{peak} \approx \lceil K / n \rceil\, s + n\, g

for ``K`` steps, state size ``s`` and one step's graph ``g``, against :math:`K g` stored.
The cost is one more forward of each inner step (its support forward and inner gradient,
without a graph). ``n`` that minimises the peak is :math:`\sqrt{K s / g}`: the textbook
:math:`\sqrt{K}` when a step's graph is as large as the state; in MAML a step's graph
(activations) is usually much larger than the parameters, and the best ``n`` is small.

On a CPU with glibc the peak RSS also holds what the allocator keeps of the freed
segments: the segments' results are allocated before their temporaries, and free pages go
back to the system when too many stay resident (:mod:`mamlext.heap`; ``docs/memory.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from mamlext.heap import HEAP

# step(state, k, create_graph) -> the state after inner step k
InnerStep = Callable[[list[Tensor], int, bool], list[Tensor]]
Setting = int | str | None


def check_setting(setting: Setting) -> None:
    """Raise ``ValueError`` unless ``setting`` is ``None``, ``"auto"`` or an int >= 1."""
    if setting is None or setting == "auto":
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(
            "inner_checkpoint must be None (store the inner loop's graph), 'auto', or a "
            f"segment length in inner steps >= 1; got {setting!r}"
        )


def auto_segment_length(steps: int, state_bytes: int, step_bytes: int) -> int:
    r"""The ``n`` in ``1..steps`` nearest :math:`\sqrt{K s / g}`, the minimum of the peak."""
    if steps <= 1 or step_bytes <= 0:
        return max(steps, 1)
    return min(steps, max(1, round(math.sqrt(steps * state_bytes / step_bytes))))


def checkpointed_inner_loop(
    step: InnerStep,
    state: list[Tensor],
    steps: int,
    setting: int | str,
    second_order: bool,
    inputs: Sequence[Tensor],
    replaying: Callable[[], AbstractContextManager[None]],
) -> list[Tensor]:
    """``steps`` inner steps from ``state`` in checkpointed segments.

    Args:
        step: one inner step; it may read ``inputs`` (and only them, besides ``state``).
        state: the adapted tensors before the first step (graph to the meta-parameters).
        setting: the segment length in steps, or ``"auto"``: step 0 runs alone while the
            bytes it saves for backward are counted, and :func:`auto_segment_length` sizes
            the segments of the other steps.
        second_order: differentiate through the inner gradients (as the stored path).
        inputs: every other tensor the steps depend on that may require grad (the model's
            parameters, learned step sizes, the support batch); their gradients flow as
            stored.
        replaying: a context for the recomputation in backward: forwards that must record
            nothing and change no buffer (BatchNorm statistics).

    Returns:
        The state after ``steps`` steps, with a graph to ``state`` and ``inputs``.
    """
    check_setting(setting)
    inputs = [t for t in dict.fromkeys(inputs) if t.requires_grad]
    if steps == 0:
        return state
    context = step, second_order, inputs, replaying
    first, length = 0, setting
    if setting == "auto":  # step 0 alone, measured
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            state = _segments(state, [range(0, 1)], *context)
        state_bytes = sum(t.numel() * t.element_size() for t in state)
        first, length = 1, auto_segment_length(steps - 1, state_bytes, counter.total)
    plan = [range(k, min(k + length, steps)) for k in range(first, steps, length)]
    return _segments(state, plan, *context)


def _segments(state, plan: list[range], step, second_order, inputs, replaying) -> list[Tensor]:
    """The segments of ``plan`` one after another.

    Their results (each the next one's saved state) are allocated together, before any
    segment's temporaries. Allocated after them, each result would sit in the heap among
    the freed temporaries, and glibc could not give the next segment's temporaries that
    space back in one piece: the heap (and peak RSS) grew by a step's temporaries at
    every segment (``benchmarks/heap_probe.py``).
    """
    results = [[torch.empty_like(t) for t in state] for _ in plan]
    on_cpu = HEAP is not None and any(t.device.type == "cpu" for t in state)
    heap = HEAP if on_cpu else None
    if heap is not None:
        heap.keep_freed_top()
    for steps, out in zip(plan, results):
        run = _SegmentSteps(step, steps, second_order, out, inputs, replaying, heap)
        state = list(_Segment.apply(run, *state, *inputs))
        if heap is not None:  # the segment's temporaries are freed now
            heap.release_if_idle()
    return state


class _SegmentSteps:
    """One segment: its steps, and what its backward needs besides the saved state."""

    def __init__(self, step, steps: range, second_order, out, inputs, replaying, heap) -> None:
        self.step, self.steps, self.second_order = step, steps, second_order
        self.out, self.size = out, len(out)  # the buffers forward's results are copied to
        self.inputs, self.replaying, self.heap = inputs, replaying, heap
        self.rng: _RngState | None = None

    def forward(self, state: list[Tensor], replay: bool) -> list[Tensor]:
        """The steps; with the stored path's graph when ``replay``, else with none kept."""
        for k in self.steps:
            state = self.step(state, k, replay and self.second_order)
            if not replay:  # keep no graph from one step to the next
                state = [t.detach().requires_grad_() for t in state]
        return state

    def gradients(self, saved, extra, grad_outputs) -> tuple[Tensor, ...]:
        """The steps again from ``saved``, with their graph, and the gradients through them."""
        with torch.enable_grad(), self.rng.restored(), self.replaying():
            leaves = [t.detach().requires_grad_() for t in saved]
            out = self.forward(leaves, replay=True)
            return torch.autograd.grad(
                out, leaves + extra, grad_outputs, allow_unused=True, materialize_grads=True
            )


class _Segment(torch.autograd.Function):
    """``run.steps`` inner steps of ``tensors = (*state, *run.inputs)``.

    Forward keeps the first state (and the generators' states); backward recomputes the
    steps with their graph and back-propagates through them.
    """

    @staticmethod
    def forward(ctx, run: _SegmentSteps, *tensors: Tensor) -> tuple[Tensor, ...]:
        state = list(tensors[: run.size])
        ctx.run = run
        ctx.save_for_backward(*state)
        run.rng = _RngState.capture(state)
        with torch.enable_grad():
            out = run.forward([t.detach().requires_grad_() for t in state], replay=False)
        results, run.out = run.out, None
        return tuple(r.copy_(t) for r, t in zip(results, out))

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        run: _SegmentSteps = ctx.run
        wanted = ctx.needs_input_grad[1 + run.size :]
        extra = [t for t, needed in zip(run.inputs, wanted) if needed]
        # allocated before the replay's temporaries, for the reason given in _segments
        kept = [torch.empty_like(t) for t in [*ctx.saved_tensors, *extra]]
        computed = run.gradients(ctx.saved_tensors, extra, grad_outputs)
        grads = [k.copy_(g) for k, g in zip(kept, computed)]
        del computed  # the uncopied gradients, freed before the release
        if run.heap is not None:
            run.heap.release_if_idle()
        extra_grads = iter(grads[run.size :])
        return (None, *grads[: run.size], *(next(extra_grads) if n else None for n in wanted))


class _RngState:
    """The CPU and CUDA generators' states at a segment's start, restored for its replay."""

    def __init__(self, cpu: Tensor, cuda: dict[int, Tensor]) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, tensors: Sequence[Tensor]) -> _RngState:
        devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextmanager
    def restored(self) -> Iterator[None]:
        """The enclosed code draws the same random numbers; the generators are left as found."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


class _SavedBytes:
    """Saved-tensor hooks that add up the bytes a graph saves for backward."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, tensor: Tensor) -> Tensor:
        if not isinstance(tensor, torch.nn.Parameter):  # parameters cost nothing extra
            self.total += tensor.numel() * tensor.element_size()
        return tensor

    @staticmethod
    def unpack(tensor: Tensor) -> Tensor:
        return tensor
