"""``learn2learn.vision``: Omniglot and mini-ImageNet from local files, their benchmark
tasksets, and the class-rotation transform; no torchvision needed.

Written from learn2learn 0.2.0's documented behaviour, with three deliberate differences
(docs/learn2learn.md):

- ``FullOmniglot`` reads the two zips (or their extracted folders) wherever they are, in
  ``root/omniglot-py/`` (torchvision's place) or ``root/``, and downloads only if asked and
  they are absent. Characters are in sorted order (torchvision lists folders in directory
  order, which depends on the file system).
- ``get_tasksets`` draws each split's tasks from that split's classes (learn2learn 0.2.0 draws
  all three from all 1623 classes, against its own documentation).
- ``RandomClassRotation`` rotates each class by its own angle (learn2learn 0.2.0 rotates a
  whole task by its last class's angle, a late-binding closure).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mamlext.compat.learn2learn import data as l2l_data
from mamlext.compat.learn2learn import transforms as task_transforms
from mamlext.data.omniglot_files import SETS, URL, ZIP_MD5, download_file

__all__ = [
    "BenchmarkTasksets", "FullOmniglot", "MiniImagenet", "RandomClassRotation", "get_tasksets",
    "list_tasksets", "rotate_image",
]  # fmt: skip


class FullOmniglot(Dataset):
    """All 1623 Omniglot characters (background 0..963, evaluation 964..1622), 20 drawings
    each: ``(transform(image), target_transform(label))`` with ``image`` a 105x105 PIL image
    in mode "L".

    Args:
        root: a folder holding ``images_background.zip`` and ``images_evaluation.zip`` (or
            the folders they extract to), directly or in ``omniglot-py/``.
        download: fetch the zips into ``root/omniglot-py/`` if they are nowhere.
    """

    def __init__(self, root, transform=None, target_transform=None, download: bool = False):
        self.root = os.path.expanduser(str(root))
        self.transform, self.target_transform = transform, target_transform
        self._sources = self._find(download)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._members: list[tuple[str, str]] = []  # (set, member path), index order
        self.labels_of_samples: list[int] = []  # the label of each index, read from the names
        label = 0
        for name in SETS:
            characters = collections.defaultdict(list)
            for member in self._list(name):
                parts = member.split("/")
                if member.endswith(".png") and len(parts) == 4:
                    characters[(parts[1], parts[2])].append(member)
            for character in sorted(characters):
                for member in sorted(characters[character]):
                    self._members.append((name, member))
                    self.labels_of_samples.append(label)
                label += 1

    def _find(self, download: bool) -> dict[str, Path]:
        """Each set's zip or extracted folder."""
        found = {}
        for name in SETS:
            for folder in (Path(self.root) / "omniglot-py", Path(self.root)):
                if (folder / name).is_dir():
                    found[name] = folder / name
                    break
                if (folder / f"{name}.zip").is_file():
                    found[name] = folder / f"{name}.zip"
                    break
        missing = [name for name in SETS if name not in found]
        if missing and download:
            target = Path(self.root) / "omniglot-py"
            target.mkdir(parents=True, exist_ok=True)
            for name in missing:
                download_file(URL + f"{name}.zip", target / f"{name}.zip", ZIP_MD5[name])
                found[name] = target / f"{name}.zip"
        elif missing:
            raise FileNotFoundError(
                f"FullOmniglot: no {', '.join(f'{m}.zip' for m in missing)} (or extracted folder) "
                f"in {self.root}/omniglot-py or {self.root}; pass download=True to fetch them"
            )
        return found

    def _list(self, name: str) -> list[str]:
        source = self._sources[name]
        if source.is_dir():
            return [f"{name}/{p.relative_to(source).as_posix()}" for p in source.rglob("*.png")]
        with zipfile.ZipFile(source) as archive:
            return archive.namelist()

    def _read(self, name: str, member: str) -> bytes:
        source = self._sources[name]
        if source.is_dir():
            return (source.parent / member).read_bytes()
        key = f"{os.getpid()}:{name}"  # one handle per process (DataLoader workers fork)
        if key not in self._zips:
            self._zips[key] = zipfile.ZipFile(source)
        return self._zips[key].read(member)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int):
        name, member = self._members[index]
        image = Image.open(io.BytesIO(self._read(name, member))).convert("L")
        label = self.labels_of_samples[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zips"] = {}
        return state


def _omniglot_image(image: Image.Image) -> torch.Tensor:
    """learn2learn's Omniglot transform: Resize(28, LANCZOS), ToTensor, then ``1 - x``."""
    small = image.resize((28, 28), Image.LANCZOS)
    array = np.asarray(small, dtype=np.float32) / 255.0
    return 1.0 - torch.from_numpy(array).unsqueeze(0)


class MiniImagenet(Dataset):
    """mini-ImageNet from learn2learn's cache pickles ``mini-imagenet-cache-<mode>.pkl`` in
    ``root`` (a dict with ``image_data`` uint8 ``[N, 84, 84, 3]`` and ``class_dict`` {class:
    indices}): ``(transform(x), label)`` with ``x`` float ``[3, 84, 84]`` in 0..255."""

    def __init__(self, root, mode: str = "train", transform=None, target_transform=None,
                 download: bool = False) -> None:  # fmt: skip
        path = Path(os.path.expanduser(str(root))) / f"mini-imagenet-cache-{mode}.pkl"
        if not path.is_file():
            raise FileNotFoundError(
                f"MiniImagenet: no {path}; mamlext's learn2learn shim does not download "
                "mini-ImageNet: put learn2learn's cache pickles there"
            )
        with open(path, "rb") as f:
            cache = pickle.load(f)
        self.x = torch.from_numpy(np.asarray(cache["image_data"])).permute(0, 3, 1, 2).float()
        self.y = np.zeros(len(self.x), dtype=np.int64)
        for label, (_, indices) in enumerate(cache["class_dict"].items()):
            self.y[list(indices)] = label
        self.labels_of_samples = self.y.tolist()
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        x, y = self.x[index], int(self.y[index])
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


class RandomClassRotation(task_transforms.TaskTransform):
    """Rotate every sample of a class by one of ``degrees``, drawn per class (each class its
    own angle). Comes after ``LoadData`` (it edits the loaded sample)."""

    def __init__(self, dataset, degrees: Sequence[float]) -> None:
        super().__init__(dataset)
        self.degrees = list(degrees)

    def __call__(self, task_description):
        task_description = self.new_task() if task_description is None else task_description
        angles: dict = {}
        for entry in task_description:
            label = self.dataset.indices_to_labels[entry.index]
            if label not in angles:
                angles[label] = random.choice(self.degrees)
            entry.transforms.append(
                lambda x, angle=angles[label]: (rotate_image(x[0], angle), x[1])
            )
        return task_description


def rotate_image(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """``image`` ``[C, H, W]`` turned counter-clockwise by ``degrees`` (multiples of 90: exact;
    others: nearest neighbour about the centre, zeros outside)."""
    torch.empty(1).uniform_(degrees, degrees)  # torchvision's RandomRotation draws once here
    if degrees % 90 == 0:
        return torch.rot90(image, int(degrees // 90) % 4, dims=(-2, -1))
    angle = torch.tensor(np.deg2rad(degrees), dtype=torch.float32)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, sin, torch.zeros(())]),
                         torch.stack([-sin, cos, torch.zeros(())])])  # fmt: skip
    grid = torch.nn.functional.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    rotated = torch.nn.functional.grid_sample(
        image[None].float(), grid, mode="nearest", align_corners=False
    )
    return rotated[0].to(image.dtype)


BenchmarkTasksets = collections.namedtuple("BenchmarkTasksets", ("train", "validation", "test"))
OMNIGLOT_SPLIT = (1100, 100, 423)  # train, validation, test classes of learn2learn's benchmark


def _omniglot(train_ways, train_samples, test_ways, test_samples, root, **kwargs):
    dataset = l2l_data.MetaDataset(FullOmniglot(root, transform=_omniglot_image, download=True))
    classes = list(range(1623))
    random.shuffle(classes)
    first, second = OMNIGLOT_SPLIT[0], OMNIGLOT_SPLIT[0] + OMNIGLOT_SPLIT[1]
    splits = (classes[:first], classes[first:second], classes[second:])
    tasks = []
    for split, (ways, samples) in zip(
        splits, ((train_ways, train_samples), (test_ways, test_samples), (test_ways, test_samples))
    ):
        tasks.append([
            task_transforms.FusedNWaysKShots(dataset, n=ways, k=samples, filter_labels=split),
            task_transforms.LoadData(dataset),
            task_transforms.RemapLabels(dataset),
            task_transforms.ConsecutiveLabels(dataset),
            RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0]),
        ])  # fmt: skip
    return (dataset, dataset, dataset), tasks


def _mini_imagenet(train_ways, train_samples, test_ways, test_samples, root, **kwargs):
    datasets, tasks = [], []
    for mode, ways, samples in (("train", train_ways, train_samples),
                                ("validation", test_ways, test_samples),
                                ("test", test_ways, test_samples)):  # fmt: skip
        dataset = l2l_data.MetaDataset(MiniImagenet(root, mode=mode))
        datasets.append(dataset)
        tasks.append([
            task_transforms.NWays(dataset, ways),
            task_transforms.KShots(dataset, samples),
            task_transforms.LoadData(dataset),
            task_transforms.RemapLabels(dataset),
            task_transforms.ConsecutiveLabels(dataset),
        ])  # fmt: skip
    return tuple(datasets), tasks


_TASKSETS: dict[str, Callable] = {"omniglot": _omniglot, "mini-imagenet": _mini_imagenet}


def list_tasksets():
    return _TASKSETS.keys()


def get_tasksets(name: str, train_ways: int = 5, train_samples: int = 10, test_ways: int = 5,
                 test_samples: int = 10, num_tasks: int = -1, root: str = "~/data",
                 device=None, **kwargs) -> BenchmarkTasksets:  # fmt: skip
    """learn2learn's benchmark tasksets (``train``, ``validation``, ``test``) of ``name``.

    Omniglot: the 1623 characters shuffled with Python's ``random`` and split 1100 / 100 /
    423, images 28x28 with ink 1, every class of a training task rotated by a multiple of 90
    degrees. ``device`` is accepted and ignored, as in learn2learn.
    """
    if name not in _TASKSETS:
        raise ValueError(
            f"get_tasksets: mamlext's learn2learn shim offers {sorted(_TASKSETS)}, not {name!r}"
        )
    root = os.path.expanduser(root)
    datasets, tasks = _TASKSETS[name](train_ways, train_samples, test_ways, test_samples, root)
    return BenchmarkTasksets(*(
        l2l_data.Taskset(dataset, task_transforms=t, num_tasks=num_tasks)
        for dataset, t in zip(datasets, tasks)
    ))  # fmt: skip
