"""``learn2learn.data``: datasets that know their labels, and tasks sampled from them.

Written from learn2learn 0.2.0's documented and tested behaviour. A task is described by a
list of :class:`DataDescription` (a sample index and the transforms to apply to it); the
task transforms (:mod:`.transforms`) build and edit that list, and :class:`Taskset` turns
it into data. Randomness comes from Python's ``random`` module, as in learn2learn, so
seeding it repeats the tasks.
"""

from __future__ import annotations

import os
import pickle
import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from mamlext.compat.learn2learn.utils import warn_once

__all__ = [
    "DataDescription", "FilteredMetaDataset", "InfiniteIterator", "MetaDataset", "TaskDataset",
    "Taskset", "UnionMetaDataset", "partition_task",
]  # fmt: skip


def _plain(label):
    return label.item() if hasattr(label, "item") else label


class MetaDataset(Dataset):
    """A dataset with ``labels_to_indices``, ``indices_to_labels`` and ``labels``.

    Built by reading every sample's label (``dataset[i][1]``) once, unless the maps are
    given, the dataset lists its labels (``labels_of_samples``: mamlext's datasets), or they
    are cached in the pickle at ``dataset._bookkeeping_path`` (read if it exists, written
    otherwise).
    """

    def __init__(self, dataset, labels_to_indices=None, indices_to_labels=None) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError("MetaDataset only accepts a torch dataset as input")
        self.dataset = dataset
        known = getattr(dataset, "labels_of_samples", None)
        # A dataset that lists its labels needs no cache, and must not read one written for
        # another order of the same files (the real learn2learn's, in the same root).
        path = None if known is not None else getattr(dataset, "_bookkeeping_path", None)
        if path is not None and os.path.exists(path):
            with open(path, "rb") as f:
                book = pickle.load(f)
            self._set(book["labels_to_indices"], book["indices_to_labels"])
            return
        if labels_to_indices is not None:
            indices_to_labels = {i: label for label, ids in labels_to_indices.items() for i in ids}
        elif indices_to_labels is not None:
            labels_to_indices = defaultdict(list)
            for i, label in indices_to_labels.items():
                labels_to_indices[label].append(i)
        else:
            labels_to_indices, indices_to_labels = defaultdict(list), defaultdict(int)
            for i in range(len(dataset)):
                label = _plain(known[i] if known is not None else dataset[i][1])
                labels_to_indices[label].append(i)
                indices_to_labels[i] = label
        self._set(labels_to_indices, indices_to_labels)
        if path is not None:
            try:
                with open(path, "wb") as f:
                    pickle.dump(self._bookkeeping, f, protocol=-1)
            except OSError:  # a read-only data folder: the maps are rebuilt next time
                pass

    def _set(self, labels_to_indices, indices_to_labels) -> None:
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = list(labels_to_indices.keys())
        self._bookkeeping = {
            "labels_to_indices": dict(labels_to_indices),
            "indices_to_labels": dict(indices_to_labels),
            "labels": self.labels,
        }

    def __getitem__(self, item):
        return self.dataset[item]

    def __len__(self) -> int:
        return len(self.dataset)


class UnionMetaDataset(MetaDataset):
    """Several datasets as one, their labels made consecutive (each dataset's after the last)."""

    def __init__(self, datasets: Sequence) -> None:
        datasets = [d if isinstance(d, MetaDataset) else MetaDataset(d) for d in datasets]
        self.datasets = datasets
        labels_to_indices, indices_to_labels = defaultdict(list), {}
        self._remap, label_offset, index_offset = [], 0, 0
        for dataset in datasets:
            remap = {label: label_offset + k for k, label in enumerate(dataset.labels)}
            self._remap.append((index_offset, dataset, remap))
            for label in dataset.labels:
                for i in dataset.labels_to_indices[label]:
                    labels_to_indices[remap[label]].append(index_offset + i)
                    indices_to_labels[index_offset + i] = remap[label]
            label_offset += len(dataset.labels)
            index_offset += len(dataset)
        self.dataset = datasets
        self._length = index_offset
        self._set(labels_to_indices, indices_to_labels)

    def __getitem__(self, item):
        for offset, dataset, remap in reversed(self._remap):
            if item >= offset:
                x, label = dataset[item - offset][:2]
                return [x, remap[_plain(label)]]
        raise IndexError(item)

    def __len__(self) -> int:
        return self._length


class FilteredMetaDataset(MetaDataset):
    """The samples of some ``labels`` only (in that order of labels; labels are kept)."""

    def __init__(self, dataset, labels: Sequence) -> None:
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        self.dataset = dataset
        self.filtered_labels = list(labels)
        self.to_true_indices = []
        labels_to_indices, indices_to_labels = defaultdict(list), {}
        for label in self.filtered_labels:
            for i in dataset.labels_to_indices[label]:
                labels_to_indices[label].append(len(self.to_true_indices))
                indices_to_labels[len(self.to_true_indices)] = label
                self.to_true_indices.append(i)
        self._set(labels_to_indices, indices_to_labels)

    def __getitem__(self, item):
        return self.dataset[self.to_true_indices[item]]

    def __len__(self) -> int:
        return len(self.to_true_indices)


class DataDescription:
    """One sample of a task: its ``index`` in the dataset and the ``transforms`` that load
    and edit it, applied in order."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.transforms: list[Callable] = []


class Taskset:
    """Tasks of ``dataset`` made by ``task_transforms`` (a list applied in turn to a task
    description, the first receiving ``None``, or one callable).

    Args:
        num_tasks: ``-1`` for a new task at every draw; ``n > 0`` for ``n`` fixed tasks, each
            drawn once, on its first use, and kept.
        task_collate: turns the list of samples into the task (default: torch's
            ``default_collate``: ``[X, y]``).
    """

    def __init__(self, dataset, task_transforms=None, num_tasks: int = -1, task_collate=None):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        if num_tasks < -1 or num_tasks == 0:
            raise ValueError("num_tasks needs to be -1 (infinity) or positive.")
        self.dataset = dataset
        self.num_tasks = num_tasks
        self.task_transforms = [] if task_transforms is None else task_transforms
        self.task_collate = default_collate if task_collate is None else task_collate
        self.sampled_descriptions: dict[int, list[DataDescription]] = {}
        self._task_id = 0

    def sample_task_description(self) -> list[DataDescription]:
        if callable(self.task_transforms):
            return self.task_transforms(None)
        description = None
        for transform in self.task_transforms:
            description = transform(description)
        return description

    def get_task(self, description: list[DataDescription]):
        samples = []
        for entry in description:
            data = entry.index
            for transform in entry.transforms:
                data = transform(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self):
        """A task: a random one of the ``num_tasks`` (a new one when ``num_tasks=-1``)."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int):
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def __iter__(self):
        self._task_id = 0
        return self

    def __next__(self):
        if self.num_tasks != -1 and self._task_id >= self.num_tasks:
            raise StopIteration
        task = self[self._task_id]
        self._task_id += 1
        return task

    def __add__(self, other):
        raise NotImplementedError


class TaskDataset(Taskset):
    """The former name of :class:`Taskset` (deprecated in learn2learn)."""

    def __init__(self, *args, **kwargs) -> None:
        warn_once("TaskDataset is deprecated, use Taskset instead.", "deprecation")
        super().__init__(*args, **kwargs)


def partition_task(data: torch.Tensor, labels: torch.Tensor, shots: int = 1):
    """Split a task into support and query: per label (sorted), the first ``shots`` samples
    to the support. Returns ``((X_support, y_support), (X_query, y_query))``."""
    support, query = [], []
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        support.append(where[:shots])
        query.append(where[shots:])
    s, q = torch.cat(support), torch.cat(query)
    return (data[s], labels[s]), (data[q], labels[q])


class InfiniteIterator:
    """Iterate over ``dataloader`` for ever, starting it again when it ends."""

    def __init__(self, dataloader) -> None:
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
            return next(self.iterator)
