"""``learn2learn.data.transforms``: task transforms, each a step that builds or edits a task's
description (a list of :class:`~.data.DataDescription`).

Written from learn2learn 0.2.0's documented behaviour; randomness from Python's ``random``,
drawn as learn2learn draws it. One deliberate difference: where learn2learn's ``NWays``
samples from a ``set`` (which Python >= 3.11 refuses), the classes present are sampled in
the order they first appear.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

from mamlext.compat.learn2learn.data import DataDescription

__all__ = [
    "ConsecutiveLabels", "FilterLabels", "FusedNWaysKShots", "KShots", "LoadData", "NWays",
    "RemapLabels", "TaskTransform",
]  # fmt: skip


class TaskTransform:
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def new_task(self) -> list[DataDescription]:
        """A description holding every sample of the dataset."""
        return [DataDescription(i) for i in range(len(self.dataset))]

    def __call__(self, task_description):
        raise NotImplementedError


class LoadData(TaskTransform):
    """Each sample's data: ``dataset[index]``."""

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        for entry in task_description:
            entry.transforms.append(self.dataset.__getitem__)
        return task_description


class FilterLabels(TaskTransform):
    """Keep the samples whose label is one of ``labels``."""

    def __init__(self, dataset, labels: Sequence) -> None:
        super().__init__(dataset)
        wanted = set(labels)
        self.kept = {i for i, label in dataset.indices_to_labels.items() if label in wanted}

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        return [entry for entry in task_description if entry.index in self.kept]


class ConsecutiveLabels(TaskTransform):
    """Order the samples by their original label (stable)."""

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        return sorted(task_description, key=lambda e: self.dataset.indices_to_labels[e.index])


class RemapLabels(TaskTransform):
    """Relabel the task's classes ``0..n-1`` (in a random assignment if ``shuffle``); comes
    after :class:`LoadData`, since it edits the loaded sample's label."""

    def __init__(self, dataset, shuffle: bool = True) -> None:
        super().__init__(dataset)
        self.shuffle = shuffle

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        labels = list({self.dataset.indices_to_labels[e.index] for e in task_description})
        if self.shuffle:
            random.shuffle(labels)
        mapping = {label: k for k, label in enumerate(labels)}
        for entry in task_description:
            new_label = mapping[self.dataset.indices_to_labels[entry.index]]
            entry.transforms.append(lambda x, y=new_label: [*list(x)[:1], y, *list(x)[2:]])
        return task_description


class NWays(TaskTransform):
    """Keep the samples of ``n`` random classes."""

    def __init__(self, dataset, n: int = 2) -> None:
        super().__init__(dataset)
        self.n = n
        self.indices_to_labels = dict(dataset.indices_to_labels)

    def __call__(self, task_description):
        if task_description is None:
            classes = random.sample(self.dataset.labels, k=self.n)
            return [DataDescription(i) for c in classes for i in self.dataset.labels_to_indices[c]]
        present = list(dict.fromkeys(self.indices_to_labels[e.index] for e in task_description))
        classes = set(random.sample(present, k=self.n))
        return [e for e in task_description if self.indices_to_labels[e.index] in classes]


class KShots(TaskTransform):
    """Keep ``k`` random samples of each class (``replacement``: drawn with replacement)."""

    def __init__(self, dataset, k: int = 1, replacement: bool = False) -> None:
        super().__init__(dataset)
        self.k = k
        self.replacement = replacement

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        by_class: dict = {}
        for entry in task_description:
            by_class.setdefault(self.dataset.indices_to_labels[entry.index], []).append(entry)
        kept = []
        for entries in by_class.values():
            if self.replacement:
                kept += [copy.deepcopy(e) for e in random.choices(entries, k=self.k)]
            else:
                kept += random.sample(entries, k=self.k)
        return kept


class FusedNWaysKShots(TaskTransform):
    """``n`` random classes of ``filter_labels`` (default: all), ``k`` random samples each,
    in one step (the classes in the order drawn)."""

    def __init__(
        self, dataset, n: int = 2, k: int = 1, replacement: bool = False, filter_labels=None
    ) -> None:
        super().__init__(dataset)
        self.n, self.k, self.replacement = n, k, replacement
        self.filter_labels = list(dataset.labels if filter_labels is None else filter_labels)

    def __call__(self, task_description):
        if task_description is not None:  # an edited description: the steps one by one
            filtered = FilterLabels(self.dataset, self.filter_labels)(task_description)
            ways = NWays(self.dataset, self.n)(filtered)
            return KShots(self.dataset, self.k, self.replacement)(ways)
        description = []
        for label in random.sample(self.filter_labels, k=self.n):
            indices = self.dataset.labels_to_indices[label]
            if self.replacement:
                chosen = [random.choice(indices) for _ in range(self.k)]
            else:
                chosen = random.sample(indices, k=self.k)
            description += [DataDescription(i) for i in chosen]
        return description
