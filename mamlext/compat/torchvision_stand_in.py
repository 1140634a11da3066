"""A stand-in for the few torchvision names torchmeta 1.8 imports, on PIL images.

The PyPI torchvision does not import beside the CPU torch wheel (``operator torchvision::nms
does not exist``, as in pytorch/pytorch#122494); :func:`install` puts this module's
functions and classes in ``sys.modules`` under torchvision's module names (marked
``__mamlext_stub__ = True``). They behave as torchvision's do on PIL images; anything else
raises an error naming the stand-in and why the real torchvision did not import.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DATASETS_UTILS_PRIVATE", "STAND_IN", "install"]

_NEAREST, _BILINEAR = 0, 2  # PIL.Image.Resampling values, the interpolation torchmeta passes


STAND_IN = "mamlext's torchvision stand-in"


def _stand_in_lacks(name: str) -> str:
    """The message for a torchvision name or module the stand-in does not offer."""
    reason = getattr(sys.modules.get("torchvision"), "__mamlext_reason__", "unknown")
    return (
        f"{STAND_IN} (installed by mamlext.compat) has no {name}: it offers only "
        "what torchmeta 1.8 imports, because the real torchvision is not importable here "
        f"({reason}); install a torchvision built for torch {torch.__version__} for the rest"
    )


def _require_pil(img: Any, verb: str) -> None:
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError(f"{STAND_IN} {verb} PIL images only, got {type(img).__name__}")


def resize(img: Any, size: int | Sequence[int], interpolation: int = _BILINEAR) -> Any:
    """An int sets the shorter side (aspect kept, longer side truncated); a pair is (h, w).

    As in torchvision on a PIL image, this is PIL's ``resize``, which antialiases when it
    downscales (torchvision's ``antialias`` flag only concerns tensors).
    """
    _require_pil(img, "resizes")
    w, h = img.size
    if isinstance(size, int):
        longer = int(size * max(w, h) / min(w, h))
        new_w, new_h = (size, longer) if w <= h else (longer, size)
    else:
        new_h, new_w = size
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), interpolation)


def center_crop(img: Any, size: int | Sequence[int]) -> Any:
    """Crop the centre (h, w); outside the image PIL fills zeros (torchvision pads first)."""
    _require_pil(img, "crops")
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    top, left = round((h - th) / 2), round((w - tw) / 2)
    return img.crop((left, top, left + tw, top + th))


def to_tensor(pic: Any) -> torch.Tensor:
    """PIL image or HWC array -> CHW tensor; uint8 becomes float in [0, 1], as torchvision."""
    array = np.array(pic, copy=True)
    if getattr(pic, "mode", None) == "1":
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return tensor.to(torch.get_default_dtype()).div(255) if tensor.dtype == torch.uint8 else tensor


def rotate(
    img: Any,
    angle: float,
    interpolation: int = _NEAREST,
    expand: bool = False,
    center: Sequence[int] | None = None,
    fill: Sequence[int] | int | None = None,
) -> Any:
    """Rotate counter-clockwise by ``angle`` degrees; torchmeta passes ``False``: nearest."""
    _require_pil(img, "rotates")
    if isinstance(fill, Sequence):
        fill = fill[0] if len(fill) == 1 else tuple(fill)
    return img.rotate(angle, int(interpolation), expand, center, fillcolor=fill)


def hflip(img: Any) -> Any:
    _require_pil(img, "flips")
    return img.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT


def vflip(img: Any) -> Any:
    _require_pil(img, "flips")
    return img.transpose(1)  # PIL.Image.Transpose.FLIP_TOP_BOTTOM


class _Transform:
    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose(_Transform):
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = transforms

    def __call__(self, img: Any) -> Any:
        for transform in self.transforms:
            img = transform(img)
        return img


class Resize(_Transform):
    def __init__(self, size: int | Sequence[int], interpolation: int = _BILINEAR) -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Any) -> Any:
        return resize(img, self.size, self.interpolation)


class CenterCrop(_Transform):
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, img: Any) -> Any:
        return center_crop(img, self.size)


class ToTensor(_Transform):
    def __call__(self, pic: Any) -> torch.Tensor:
        return to_tensor(pic)


def list_dir(root: str, prefix: bool = False) -> list[str]:
    root = os.path.expanduser(root)
    names = [p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p))]
    return [os.path.join(root, p) for p in names] if prefix else names


def check_integrity(fpath: str, md5: str | None = None) -> bool:
    if not os.path.isfile(fpath):
        return False
    if md5 is None:
        return True
    digest = hashlib.md5(usedforsecurity=False)
    with open(fpath, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == md5


def download_url(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
    """Accept a file already there; the stand-in downloads nothing."""
    fpath = os.path.join(os.path.expanduser(root), filename or os.path.basename(url))
    if not check_integrity(fpath, md5):
        raise RuntimeError(
            f"{fpath} is missing or corrupt, and {STAND_IN} does not download: fetch {url} "
            "there yourself, or install a torchvision that imports with this torch"
        )


# The private helpers of torchvision <= 0.8 that torchmeta.datasets.utils imports, for
# its Google Drive downloads (a stand-in serves them, and so does a real torchvision).


def _get_confirm_token(response: Any) -> str | None:
    cookies = response.cookies.items()
    return next((value for key, value in cookies if key.startswith("download_warning")), None)


def _save_response_content(response: Any, destination: str, chunk_size: int = 32768) -> None:
    with open(destination, "wb") as f:
        for chunk in response.iter_content(chunk_size):
            f.write(chunk)


DATASETS_UTILS_PRIVATE = {
    "_get_confirm_token": _get_confirm_token,
    "_save_response_content": _save_response_content,
}


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Make importing a torchvision module the stand-in lacks say so, and why.

    Last on ``sys.meta_path``, it is asked only once every other finder found nothing.
    Its error names ``torchvision`` (not the submodule), so that ``from torchvision.transforms
    import Normalize`` shows it too instead of "cannot import name ... (unknown location)".
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.startswith("torchvision.") and getattr(
            sys.modules.get("torchvision"), "__mamlext_stub__", False
        ):
            raise ModuleNotFoundError(_stand_in_lacks(fullname), name="torchvision")
        return None


def install(reason: str) -> None:
    """Put the stand-in's modules in ``sys.modules`` as ``torchvision``; ``reason``: why the
    real one did not import (kept as ``torchvision.__mamlext_reason__``)."""

    def module(name: str, **names: Any) -> types.ModuleType:
        mod = types.ModuleType(name, f"{STAND_IN}; the real one did not import: {reason}")
        # Every stand-in module is a package, so that `from <it> import <missing>` asks the
        # finder above for the submodule before Python's generic "cannot import name".
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []

        def __getattr__(attr: str) -> Any:
            raise AttributeError(_stand_in_lacks(f"{name}.{attr}"))

        vars(mod).update(names, __getattr__=__getattr__)
        sys.modules[name] = mod
        return mod

    functional = module(
        "torchvision.transforms.functional",
        **{f.__name__: f for f in (resize, center_crop, to_tensor, rotate, hflip, vflip)},
    )
    transforms = module(
        "torchvision.transforms",
        **{c.__name__: c for c in (Compose, Resize, CenterCrop, ToTensor)},
        functional=functional,
    )
    helpers = (list_dir, check_integrity, download_url)
    utils = module(
        "torchvision.datasets.utils",
        **{f.__name__: f for f in helpers},
        **DATASETS_UTILS_PRIVATE,
    )
    datasets = module("torchvision.datasets", utils=utils)
    module(
        "torchvision",
        transforms=transforms,
        datasets=datasets,
        __mamlext_stub__=True,
        __mamlext_reason__=reason,
    )
    if not any(isinstance(finder, _StandInFinder) for finder in sys.meta_path):
        sys.meta_path.append(_StandInFinder())
