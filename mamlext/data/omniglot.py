"""Omniglot (Lake et al., 2015) as few-shot tasks: the character splits (Vinyals et al.'s,
the MAML paper's, the background/evaluation sets) and the task sampler of a split. The
images come from :mod:`mamlext.data.omniglot_files`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mamlext.data.omniglot_files import (
    SET_SIZES,
    CorruptDataError,
    OmniglotData,
    corrupt_error,
    decode_png,
    download_omniglot,
    load_omniglot,
)
from mamlext.data.tasks import FewShotTasks, rotate_classes

__all__ = [
    "CorruptDataError", "OmniglotData", "decode_png", "download_omniglot", "load_omniglot",
    "omniglot_tasks", "split_indices",
]  # fmt: skip

SPLITS = ("train", "val", "test")
SCHEMES = ("vinyals", "background", "maml")
VINYALS_FILES = tuple(f"vinyals_{s}_labels.json" for s in SPLITS)
MAML_SPLIT_SEED = 1
MAML_NUM_TRAIN = 1200


def _vinyals_dir(root: Path) -> Path:
    dirs = [root, root / "omniglot", root / "torchmeta" / "omniglot"]
    for d in dirs:
        if all((d / f).is_file() for f in VINYALS_FILES):
            return d
    raise FileNotFoundError(
        f"split_scheme='vinyals' needs {', '.join(VINYALS_FILES)} (the Vinyals et al. split that "
        f"torchmeta.datasets.Omniglot writes next to data.hdf5, from its package assets "
        f"torchmeta/datasets/assets/omniglot/{{train,val,test}}.json) in one of: "
        f"{', '.join(map(str, dirs))}. Or use split_scheme='background' or 'maml', which need "
        f"no extra files."
    )


def split_indices(
    names: Sequence[str], split: str, split_scheme: str = "vinyals", root: str | Path | None = None
) -> np.ndarray:
    """Indices into ``names`` of the characters of one split.

    Schemes:
        ``"vinyals"``: torchmeta's ``vinyals_{train,val,test}_labels.json`` (found in ``root``,
        ``root/omniglot`` or ``root/torchmeta/omniglot``): 1028 / 172 / 423 characters.
        ``"background"``: train = the 964 background characters, test = the 659 evaluation
        ones, val = empty.
        ``"maml"`` (Finn et al., 2017): ``np.random.default_rng(1).permutation(1623)`` over the
        characters in sorted-name order; its first 1200 are train, the other 423 test, val =
        empty. (Finn's code shuffles with Python's ``random.seed(1)`` and holds 100 of the 1200
        out for validation; the exact characters depend on its directory listing order.)
    """
    if split not in SPLITS or split_scheme not in SCHEMES:
        raise ValueError(
            f"split must be in {SPLITS} and split_scheme in {SCHEMES}; got {split!r}, {split_scheme!r}"
        )
    names = list(names)
    if split_scheme == "background":
        prefix = {"train": "images_background/", "test": "images_evaluation/"}.get(split)
        return np.array(
            [i for i, n in enumerate(names) if prefix and n.startswith(prefix)], np.int64
        )
    if split_scheme == "maml":
        if len(names) != sum(SET_SIZES.values()):
            raise ValueError(f"split_scheme='maml' needs all 1623 characters, got {len(names)}")
        order = np.argsort(np.array(names), kind="stable")[
            np.random.default_rng(MAML_SPLIT_SEED).permutation(len(names))
        ]
        part = {"train": order[:MAML_NUM_TRAIN], "val": order[:0], "test": order[MAML_NUM_TRAIN:]}
        return part[split].astype(np.int64)
    path = _vinyals_dir(Path(root or ".")) / f"vinyals_{split}_labels.json"
    try:
        wanted = ["/".join(entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as e:
        raise corrupt_error(path, f"not a list of [set, alphabet, character] ({e})") from e
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} characters of {path.name} are not loaded, e.g. {missing[:3]}"
        )
    return np.array([index[n] for n in wanted], np.int64)


def omniglot_tasks(
    root: str | Path,
    split: str,
    ways: int,
    shots: int,
    test_shots: int,
    split_scheme: str = "vinyals",
    rotations: bool | None = None,
    seed: int = 0,
    rank: int = 0,
    download: bool = False,
    source: str = "auto",
    cache_dir: str | Path | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> FewShotTasks:
    """Omniglot few-shot tasks of one split: images ``[B, ways*shots, 1, 28, 28]`` in [0, 1].

    Args:
        root, download, source, cache_dir: as in :func:`load_omniglot`.
        split: ``"train"``, ``"val"`` or ``"test"``. split_scheme: see :func:`split_indices`.
        ways, shots, test_shots, seed, rank, transform: as in :class:`FewShotTasks`.
        rotations: rotated copies (90/180/270 degrees) as new classes (4x the classes);
            ``None`` = on for the train split only (MAML paper).
    """
    data = load_omniglot(root, source, download=download, cache_dir=cache_dir)
    idx = split_indices(data.names, split, split_scheme, root)
    if len(idx) == 0:
        raise ValueError(f"split_scheme={split_scheme!r} has no {split!r} characters; use 'test'")
    images = torch.from_numpy(data.images[idx])  # a fresh, writable copy
    if rotations is None:
        rotations = split == "train"
    if rotations:
        images = rotate_classes(images)
    return FewShotTasks(images, ways, shots, test_shots, seed=seed, rank=rank, transform=transform)
