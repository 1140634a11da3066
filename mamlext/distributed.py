"""Meta-training over several processes with torch.distributed (launched by torchrun).

Each rank adapts its share of the meta-batch (task-batched) and the meta-gradients are
averaged with ONE explicit all-reduce of a flat buffer per step. Not DDP: DDP's
gradient hooks do not support ``torch.autograd.grad``, which every MAML inner step
calls, and the learned step sizes live outside the model. Buffers the caller hands over
(MAML's BatchNorm running statistics, policies ``per_step``/``running``) are averaged the
same way, so every rank keeps the state one process would have with the whole meta-batch.

A rank that dies makes the collectives of the others fail after ``MAMLEXT_DIST_TIMEOUT``
seconds (default 120) with an error naming the cause, instead of hanging (torchrun also
stops the remaining workers when one fails).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class PeerFailure(RuntimeError):
    """Another process of the job stopped answering."""


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "cpu") -> World:
        """One process, or the torchrun job described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = torch.device(device)
        if size <= 1:
            return cls(0, 1, wanted)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if wanted.type == "cuda":
            wanted = torch.device("cuda", local_rank)
            torch.cuda.set_device(wanted)
        if not dist.is_initialized():
            # torch._dynamo (which torch.optim imports) keeps references to a process group
            # that exists when it is first imported (torch 2.13). destroy_process_group then
            # cannot stop gloo's worker threads, and one that frees the tensors of the last
            # collective while Python shuts down aborts the process ("terminate called
            # without an active exception"). Imported first, it holds none.
            importlib.import_module("torch._dynamo")

            timeout = datetime.timedelta(
                seconds=float(os.environ.get("MAMLEXT_DIST_TIMEOUT", "120"))
            )
            backend = "nccl" if wanted.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timeout)
        return cls(rank, size, wanted)

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as error:
            raise PeerFailure(
                f"rank {self.rank}: a collective operation failed, most likely because another "
                f"process of the job stopped ({str(error).splitlines()[0]})"
            ) from None

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if self.size > 1:
            for tensor in [*module.parameters(), *module.buffers()]:
                self._collective(dist.broadcast, tensor.data, src=0)

    def share(self, total: int) -> slice:
        """This rank's part of ``total`` tasks: contiguous, sizes differing by at most one."""
        if total < self.size:
            raise ValueError(
                f"a meta-batch of {total} tasks cannot be split over {self.size} processes: "
                "use at least one task per process"
            )
        return slice(self.rank * total // self.size, (self.rank + 1) * total // self.size)

    def average_gradients(
        self, module: nn.Module, tasks: int = 1, buffers: Sequence[torch.Tensor] = ()
    ) -> None:
        r"""Average over ranks ``.grad`` of every parameter of ``module``, and ``buffers``.

        Rank :math:`r`'s values are weighted by its ``tasks`` :math:`n_r`:
        :math:`\sum_r n_r x_r / \sum_r n_r`, so ranks whose gradients are means over
        unequal shares of a meta-batch give the gradient of the mean over all its tasks,
        as one process would (one all-reduce). ``buffers`` are averaged in place with the
        same weights: MAML's trained BatchNorm statistics (``maml.bn_policy.statistics()``,
        policies ``per_step``/``running``), which are linear in the tasks' mean.
        """
        if self.size == 1:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        stats = list(buffers)
        flat = torch.cat([t.reshape(-1) for t in grads + stats])
        weight = flat.new_full((1,), float(tasks))
        flat = torch.cat([flat * weight, weight])
        self._collective(dist.all_reduce, flat)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for p, t in zip(params + [None] * len(stats), grads + stats):
            chunk = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
            if p is not None:
                p.grad = chunk
            else:
                t.copy_(chunk)

    def mean(self, value: torch.Tensor, tasks: int = 1) -> float:
        """The mean over ranks of a scalar tensor, each rank weighted by its ``tasks``."""
        if self.size > 1:
            value = value.detach().to(self.device, torch.float64).reshape(1)
            pair = torch.cat([value * tasks, value.new_full((1,), float(tasks))])
            self._collective(dist.all_reduce, pair)
            value = pair[0] / pair[1]
        return float(value)

    def gather_states(self, sampler) -> list[dict[str, Any]] | None:
        """Every rank's sampler state (on rank 0; ``None`` elsewhere), for checkpoints."""
        state = sampler.state_dict()
        if self.size == 1:
            return [state]
        gathered: list[Any] = [None] * self.size if self.is_main else None
        self._collective(dist.gather_object, state, gathered, dst=0)
        return gathered

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
