"""Few-shot task sampling: the batch format, seeded samplers and a DataLoader wrapper.

A meta-batch has torchmeta's ``BatchMetaDataLoader`` format::

    batch["train"] = (inputs [B, ways*shots, ...], targets [B, ways*shots])
    batch["test"]  = (inputs [B, ways*test_shots, ...], targets [B, ways*test_shots])

Every sampler here owns a ``torch.Generator`` seeded from ``(seed, rank)``; its state can be
saved and restored (``state_dict`` / ``load_state_dict``) to resume a run exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

Batch = dict[str, tuple[Tensor, Tensor]]

_S = TypeVar("_S", bound="SeededSampler")


def derive_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the stream ``(seed, *key)``; distinct keys give independent streams."""
    if seed < 0 or any(k < 0 for k in key):
        raise ValueError(f"seed and stream keys must be >= 0, got seed={seed}, key={key}")
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])


def sample_without_replacement(n: int, k: int, batch: int, generator: torch.Generator) -> Tensor:
    """``[batch, k]`` rows of ``k`` distinct ints in ``[0, n)``, each a uniform ordered sample.

    Floyd's algorithm vectorized over the batch (``k`` small steps, independent of ``n``),
    then a uniform shuffle of each row.
    """
    out = torch.empty(batch, k, dtype=torch.long)
    for i, j in enumerate(range(n - k, n)):
        t = torch.randint(0, j + 1, (batch,), generator=generator)
        out[:, i] = torch.where((out[:, :i] == t.unsqueeze(1)).any(1), j, t)
    order = torch.rand(batch, k, generator=generator, dtype=torch.float64).argsort(dim=1)
    return out.gather(1, order)


class SeededSampler:
    """Base of the samplers: a private ``torch.Generator`` for the stream ``(seed, rank)``.

    Args:
        seed: base seed of the run.
        rank: distributed rank (or any other index), so that each process draws different tasks.
    """

    def __init__(self, seed: int = 0, rank: int = 0) -> None:
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator().manual_seed(derive_seed(seed, rank))

    def sample(self, meta_batch: int) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The RNG state (with seed and rank, checked on load)."""
        return {"seed": self.seed, "rank": self.rank, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next batches repeat those drawn after it."""
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(
                f"state was saved for seed={state['seed']}, rank={state['rank']}; "
                f"this sampler has seed={self.seed}, rank={self.rank}"
            )
        self.generator.set_state(state["generator"])

    def spawn(self: _S, *key: int) -> _S:
        """A shallow copy (sharing the data) drawing from the stream ``(seed, rank, *key)``."""
        other = copy.copy(self)
        other.generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, *key))
        return other


class FewShotTasks(SeededSampler):
    """N-way K-shot classification tasks over an in-memory array of classes.

    Each task draws ``ways`` distinct classes in random order (class ``i`` of the task gets
    label ``i``, so the class->label map is a random permutation), then ``shots + test_shots``
    distinct examples of each class: the first ``shots`` form the support ("train") set, the
    rest the query ("test") set. Examples are grouped by class (labels ``0,..,0,1,..,1,..``), as
    torchmeta's ``ClassSplitter`` orders them. Everything is drawn with tensor ops, per batch.

    Args:
        images: ``[num_classes, examples_per_class, ...]``; uint8 is scaled to float32 in
            [0, 1], float is kept (as float32). A 4-d ``[N, E, H, W]`` array gets a channel
            dimension, so samples are ``[B, ways*shots, 1, H, W]``.
        ways: classes per task.
        shots: support examples per class.
        test_shots: query examples per class.
        seed: base seed. rank: distributed rank; each ``(seed, rank)`` is its own stream.
        transform: optional callable applied to each split's float images ``[B, K, C, H, W]``.

    Raises:
        ValueError: ``ways`` exceeds the number of classes, or ``shots + test_shots`` exceeds
            the examples per class.
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        ways: int,
        shots: int,
        test_shots: int,
        seed: int = 0,
        rank: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(seed, rank)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images if images.flags.writeable else images.copy())
        if images.dim() < 3:
            raise ValueError(f"images must be [classes, examples, ...], got {tuple(images.shape)}")
        if images.dim() == 4:
            images = images.unsqueeze(2)
        num_classes, per_class = images.shape[:2]
        if ways < 1 or shots < 1 or test_shots < 0:
            raise ValueError(
                f"need ways >= 1, shots >= 1, test_shots >= 0; got {ways}, {shots}, {test_shots}"
            )
        if ways > num_classes:
            raise ValueError(f"ways={ways} exceeds the {num_classes} classes available")
        if shots + test_shots > per_class:
            raise ValueError(
                f"shots + test_shots = {shots} + {test_shots} = {shots + test_shots} exceeds the "
                f"{per_class} examples per class (examples are drawn without replacement)"
            )
        self.images = images.contiguous()
        self._flat = self.images.view(num_classes * per_class, -1)
        self.ways, self.shots, self.test_shots = ways, shots, test_shots
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def _float(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x if self.transform is None else self.transform(x)

    def sample(self, meta_batch: int) -> Batch:
        """One meta-batch of ``meta_batch`` tasks.

        Returns:
            ``{"train": (x [B, ways*shots, C, H, W] float32, y [B, ways*shots] int64),
            "test": (x [B, ways*test_shots, C, H, W], y [B, ways*test_shots])}``.
        """
        b, n, k, q = meta_batch, self.ways, self.shots, self.test_shots
        num_classes, per_class = self.images.shape[:2]
        classes = sample_without_replacement(num_classes, n, b, self.generator)  # [B, n]
        keys = torch.rand(b, n, per_class, generator=self.generator, dtype=torch.float64)
        examples = keys.topk(k + q, dim=2).indices  # [B, n, k+q], distinct per class
        index = classes.unsqueeze(-1) * per_class + examples  # rows of the flat image store
        labels = torch.arange(n).view(1, n, 1)
        out: Batch = {}
        for name, part, m in (("train", slice(0, k), k), ("test", slice(k, k + q), q)):
            x = self._flat.index_select(0, index[:, :, part].reshape(-1))
            x = self._float(x.view(b, n * m, *self.images.shape[2:]))
            out[name] = (x, labels.expand(b, n, m).reshape(b, n * m))
        return out


def rotate_classes(images: Tensor) -> Tensor:
    """Rotation augmentation (MAML paper): ``[N, E, ..., H, W] -> [4N, E, ..., H, W]``.

    Class ``k * N + c`` is class ``c`` rotated by ``k * 90`` degrees counter-clockwise
    (``torch.rot90(x, k, dims=(-2, -1))``), ``k = 0..3``.
    """
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])


class Sampler(Protocol):
    def sample(self, meta_batch: int) -> Batch: ...

    def spawn(self, *key: int) -> Sampler: ...


class TaskDataset(IterableDataset):
    """Meta-batches from a sampler, for ``DataLoader(ds, batch_size=None, num_workers=k)``.

    Seeding: each iteration draws from ``sampler.spawn(epoch, worker_id)``, the stream
    ``(seed, rank, epoch, worker_id)`` (worker 0 without workers), independent of the
    sampler's own generator and of torch's global seed. So workers draw distinct tasks, a run
    is reproducible for a fixed ``num_workers``, and :meth:`set_epoch` (as with
    ``DistributedSampler``; it needs ``persistent_workers=False``, the default) gives each
    epoch new tasks. With ``num_batches`` the batches are
    shared out among workers (worker ``w`` yields batches ``w, w+k, ...``; the DataLoader
    interleaves them in that order).

    Args:
        sampler: e.g. :class:`FewShotTasks`, :class:`~mamlext.data.toy.Sinusoid`.
        meta_batch: tasks per batch.
        num_batches: batches per epoch; ``None`` for an endless stream.
    """

    def __init__(self, sampler: Sampler, meta_batch: int, num_batches: int | None = None) -> None:
        self.sampler, self.meta_batch, self.num_batches = sampler, meta_batch, num_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless TaskDataset (num_batches=None) has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sampler = self.sampler.spawn(self.epoch, worker)
        count = None if self.num_batches is None else len(range(worker, self.num_batches, workers))
        i = 0
        while count is None or i < count:
            yield sampler.sample(self.meta_batch)
            i += 1
