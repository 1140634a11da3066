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
one class when its module finishes loading. :func:`status` says what was bridged
(``print(status())``: one line for a bug report).

Two more changes are opt-in: :func:`use_fused_update` (or ``import
mamlext.compat.torchmeta_fused``) makes torchmeta's own ``gradient_update_parameters``
mamlext's fused one, and :func:`seed_from_torch` makes torchmeta's unseeded samplers
repeat under ``torch.manual_seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import random
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch

from mamlext.inner import gradient_update_parameters as fused_gradient_update_parameters

__all__ = ["CompatStatus", "seed_from_torch", "status", "use_fused_update"]

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

    def __str__(self) -> str:
        """One line for a bug report: what was bridged, and the versions around it."""
        import mamlext

        return (
            f"mamlext.compat.torchmeta: torchmeta {self.torchmeta}; "
            f"torchvision {self.torchvision}; patches: {', '.join(self.patches) or 'none'}; "
            f"mamlext {mamlext.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}"
        )


def status() -> CompatStatus:
    """What this module bridged: torchvision real or stand-in, the patches now in place.

    ``print(status())`` gives it in one line, to paste into a bug report.
    """
    return dataclasses.replace(_STATUS, patches=_STATUS.patches + _opt_in_patches())


# The opt-in patches: the fused update under torchmeta's names, and seeds drawn from torch.

_FUSED_PATCH = "torchmeta's gradient_update_parameters = mamlext.gradient_update_parameters"
_SEEDED_METHODS = (  # what seed_from_torch replaces: (module, class, method)
    ("torchmeta.utils.data.dataset", "MetaDataset", "seed"),
    ("torchmeta.transforms.splitters", "Splitter", "seed"),
    ("torchmeta.utils.data.sampler", "CombinationRandomSampler", "__iter__"),
)


def use_fused_update() -> None:
    """Make torchmeta's ``gradient_update_parameters`` mamlext's fused one, by every name.

    Every module-level name bound to torchmeta's function is rebound:
    ``torchmeta.utils.gradient_based``, ``torchmeta.utils``, and each module loaded so far
    that did ``from torchmeta.utils import gradient_update_parameters`` (aliases included);
    modules imported later find the fused one in torchmeta. Results equal torchmeta's to
    the bit where the native kernel serves (the pure-PyTorch fallback may differ in the
    last bit). A reference held elsewhere (a class attribute, a default argument) keeps
    torchmeta's, so call this before importing the code that uses it. Idempotent.

    Raises:
        ImportError: torchmeta is not installed (or the error its import raises).
    """
    from torchmeta.utils import gradient_based

    original = gradient_based.gradient_update_parameters
    if original is fused_gradient_update_parameters:
        return
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        namespace = vars(module)
        for name in [name for name, value in namespace.items() if value is original]:
            namespace[name] = fused_gradient_update_parameters


def seed_from_torch() -> None:
    """Make torchmeta's unseeded randomness draw its seeds from torch's default generator.

    torchmeta seeds a meta-dataset and its splitter from OS entropy whenever no seed is
    given (``MetaDataset.seed(None)``, which every helper such as ``omniglot(...)`` calls
    without ``seed=``), and its ``CombinationRandomSampler`` picks the classes of each task
    with Python's global ``random``. After this call those seeds are drawn from torch's
    default generator instead (advancing it), so ``torch.manual_seed(s)`` before building
    the data makes two runs sample the same tasks. An explicit ``seed=`` is kept. Call it
    before building the data sets; idempotent.

    Raises:
        ImportError: torchmeta is not installed (or the error its import raises).
    """
    for module, cls_name, method in _SEEDED_METHODS:
        cls = getattr(importlib.import_module(module), cls_name)
        current = vars(cls)[method]
        if not _ours(current):
            setattr(
                cls, method, _seed_none_from_torch(current) if method == "seed" else _sample_tasks
            )


def _draw_seed() -> int:
    """A seed for numpy's ``RandomState`` or a ``random.Random``, from torch's generator."""
    return int(torch.randint(2**32, (), dtype=torch.int64))


def _seed_none_from_torch(seed_method: Callable[..., None]) -> Callable[..., None]:
    def seed(self: Any, seed: int | None = None) -> None:
        seed_method(self, _draw_seed() if seed is None else seed)

    return seed


def _sample_tasks(self: Any) -> Iterator[tuple[int, ...]]:
    """``CombinationRandomSampler.__iter__`` with a ``random.Random`` seeded from torch.

    Like torchmeta's: one task per combination of classes, each of
    ``num_classes_per_task`` distinct classes drawn uniformly (``random.sample``).
    """
    rng = random.Random(_draw_seed())
    num_classes, ways = len(self.data_source.dataset), self.data_source.num_classes_per_task
    for _ in combinations(range(num_classes), ways):
        yield tuple(rng.sample(range(num_classes), ways))


def _opt_in_patches() -> tuple[str, ...]:
    """Which of :func:`use_fused_update` and :func:`seed_from_torch`'s patches are in place."""
    patches = []
    gradient_based = sys.modules.get("torchmeta.utils.gradient_based")
    fused = getattr(gradient_based, "gradient_update_parameters", None)
    if fused is fused_gradient_update_parameters:
        patches.append(_FUSED_PATCH)
    for module, cls_name, method in _SEEDED_METHODS:
        cls = getattr(sys.modules.get(module), cls_name, None)
        if cls is not None and _ours(vars(cls).get(method)):
            patches.append(f"{module}.{cls_name}.{method} (seeded from torch)")
    return tuple(patches)


# The torchvision stand-in: only what torchmeta uses, on PIL images.


_STAND_IN = "mamlext's torchvision stand-in"


def _stand_in_lacks(name: str) -> str:
    """The message for a torchvision name or module the stand-in does not offer."""
    reason = getattr(sys.modules.get("torchvision"), "__mamlext_reason__", "unknown")
    return (
        f"{_STAND_IN} (installed by mamlext.compat.torchmeta) has no {name}: it offers only "
        "what torchmeta 1.8 imports, because the real torchvision is not importable here "
        f"({reason}); install a torchvision built for torch {torch.__version__} for the rest"
    )


def _require_pil(img: Any, verb: str) -> None:
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError(f"{_STAND_IN} {verb} PIL images only, got {type(img).__name__}")


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
            f"{fpath} is missing or corrupt, and {_STAND_IN} does not download: fetch {url} "
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


_DATASETS_UTILS_PRIVATE = {
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


def _install_stand_in(reason: str) -> None:
    def module(name: str, **names: Any) -> types.ModuleType:
        mod = types.ModuleType(name, f"{_STAND_IN}; the real one did not import: {reason}")
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
    if not any(_ours(type(finder)) for finder in sys.meta_path):
        sys.meta_path.append(_StandInFinder())


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
