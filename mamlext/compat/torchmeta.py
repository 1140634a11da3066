"""Make torchmeta 1.8.0 importable and usable on current torch.

Import this module before torchmeta (nothing in site-packages is edited)::

    import mamlext.compat.torchmeta  # noqa: F401
    import torchmeta

It bridges three gaps, and nothing else (file and line numbers are torchmeta 1.8.0's):

1. ``torchmeta/__init__.py`` imports every subpackage, and ten of its modules import
   torchvision at the top (e.g. ``torchmeta/transforms/target_transforms.py:1``), and the
   PyPI torchvision does not import beside the CPU torch wheel (``operator torchvision::nms
   does not exist``, as in pytorch/pytorch#122494). When the modules torchmeta needs do not import, a
   stand-in ``torchvision`` (marked ``__mamlext_stub__ = True``) offers only the names
   torchmeta imports, implemented for PIL images as torchvision does. A working
   torchvision is never shadowed.
2. Where torchvision imports, ``torchmeta/datasets/utils.py:39`` still imports the private
   ``_get_confirm_token`` and ``_save_response_content`` of torchvision <= 0.8, which later
   torchvision dropped (tristandeleu/pytorch-meta#176); whichever is missing is added.
3. ``SubsetTask`` (``torchmeta/utils/data/task.py:53-63``) overrides ``__getitem__``
   without ``__getitems__``, which current ``torch.utils.data.Subset.__init__`` rejects
   with a ``NotImplementedError`` (torch 2.13.0: ``torch/utils/data/dataset.py:418-430``;
   the DataLoader bug behind it: pytorch/pytorch#163184), breaking ``ClassSplitter`` and
   every helper; it gets a ``__getitems__`` that maps its ``__getitem__``.

torchmeta itself is imported here, right after the torchvision shims, and then patched.
Every ``import torchmeta...`` runs the whole package ``__init__`` anyway, so this costs a
torchmeta user nothing, and it is simpler than a meta-path hook that would have to patch
one class when its module finishes loading. :func:`status` says what was bridged.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["CompatStatus", "status"]

# What torchmeta 1.8.0 imports from torchvision (found by grepping its sources).
_TORCHVISION_MODULES = (
    "torchvision.transforms",  # Compose, Resize, CenterCrop, ToTensor
    "torchvision.transforms.functional",  # rotate, hflip, vflip
    "torchvision.datasets.utils",  # list_dir, download_url, check_integrity, private helpers
)
_NEAREST, _BILINEAR = 0, 2  # PIL.Image.Resampling values, the interpolation torchmeta passes


@dataclass(frozen=True)
class CompatStatus:
    """What this module bridged in this interpreter.

    Attributes:
        torchmeta: its version, ``"not installed"`` (then nothing was touched), or
            ``"import failed: <error>"`` for a gap this module does not bridge.
        torchvision: ``"real <version>"``, ``"stand-in (<why the real one did not
            import>)"``, or ``"untouched"``.
        patches: attributes added to a real torchvision and to torchmeta.
    """

    torchmeta: str
    torchvision: str
    patches: tuple[str, ...] = ()


def status() -> CompatStatus:
    """What importing this module bridged (torchvision real or stand-in, patches applied)."""
    return _STATUS


# The torchvision stand-in: only what torchmeta uses, on PIL images.


def _require_pil(img: Any, verb: str) -> None:
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError(
            f"the torchvision stand-in of mamlext.compat.torchmeta {verb} PIL images only, "
            f"got {type(img).__name__}"
        )


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
            f"{fpath} is missing or corrupt, and the torchvision stand-in of "
            f"mamlext.compat.torchmeta does not download: fetch {url} there yourself, "
            "or install a torchvision that imports with this torch"
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


_DATASETS_UTILS_PRIVATE = {
    "_get_confirm_token": _get_confirm_token,
    "_save_response_content": _save_response_content,
}


def _install_stand_in(reason: str) -> None:
    def module(name: str, **names: Any) -> types.ModuleType:
        mod = types.ModuleType(name, f"Stand-in from {__name__}: torchvision did not import.")
        is_package = name.count(".") < 2
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            mod.__path__ = []  # so `import torchvision.models` says "No module named ..."
        vars(mod).update(names)
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
        **_DATASETS_UTILS_PRIVATE,
    )
    datasets = module("torchvision.datasets", utils=utils)
    module(
        "torchvision",
        transforms=transforms,
        datasets=datasets,
        __mamlext_stub__=True,
        __mamlext_reason__=reason,
    )


def _torchvision() -> str:
    """Make the torchvision modules torchmeta imports importable; say which serves them."""
    loaded = sys.modules.get("torchvision")
    if getattr(loaded, "__mamlext_stub__", False):
        return f"stand-in ({loaded.__mamlext_reason__})"
    try:
        for name in _TORCHVISION_MODULES:
            importlib.import_module(name)
    except Exception as error:  # absent, or e.g. "operator torchvision::nms does not exist"
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]  # drop what the failed import left half-initialised
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        _install_stand_in(reason)
        return f"stand-in ({reason})"
    return f"real {getattr(sys.modules['torchvision'], '__version__', '(no __version__)')}"


def _ours(value: Any) -> bool:
    return getattr(value, "__module__", None) == __name__


def _subset_task_getitems(self: Any, indices: Sequence[int]) -> list[Any]:
    """``SubsetTask.__getitems__``: map its ``__getitem__``, as ``Subset`` now requires."""
    return [self[i] for i in indices]


def _adopt_mamlext_modules() -> str:
    """Make every mamlext Meta layer an instance of torchmeta's ``MetaModule``.

    torchmeta's containers route ``params`` only to children that pass
    ``isinstance(child, torchmeta.modules.MetaModule)``; giving mamlext's base class that
    base (both derive from ``nn.Module`` alone) lets the two libraries' layers mix in one
    model, either way round.
    """
    from torchmeta.modules import MetaModule as TorchmetaMetaModule

    from mamlext.modules.module import MetaModule

    if not issubclass(MetaModule, TorchmetaMetaModule):
        MetaModule.__bases__ = (TorchmetaMetaModule,)
    return "mamlext.modules.MetaModule.__bases__ = (torchmeta.modules.MetaModule,)"


def _bridge() -> CompatStatus:
    """Idempotent: a second call finds its shims in place and reports the same."""
    if importlib.util.find_spec("torchmeta") is None:
        return CompatStatus("not installed", "untouched")
    torchvision = _torchvision()
    patches: list[str] = []
    utils = sys.modules["torchvision.datasets.utils"]
    if not torchvision.startswith("stand-in"):
        for name, helper in _DATASETS_UTILS_PRIVATE.items():
            if not hasattr(utils, name):
                setattr(utils, name, helper)
            if _ours(getattr(utils, name)):
                patches.append(f"torchvision.datasets.utils.{name}")
    try:
        import torchmeta
        from torchmeta.utils.data.task import SubsetTask
    except Exception as error:  # a gap this module does not know; `import torchmeta` shows it
        failed = f"import failed: {type(error).__name__}: {error}".splitlines()[0]
        return CompatStatus(failed, torchvision, tuple(patches))
    if "__getitems__" not in vars(SubsetTask):
        SubsetTask.__getitems__ = _subset_task_getitems
    if _ours(vars(SubsetTask)["__getitems__"]):
        patches.append("torchmeta.utils.data.task.SubsetTask.__getitems__")
    patches.append(_adopt_mamlext_modules())
    version = getattr(torchmeta, "__version__", "(no __version__)")
    return CompatStatus(version, torchvision, tuple(patches))


_STATUS = _bridge()
