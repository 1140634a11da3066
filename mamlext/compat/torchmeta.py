"""Make torchmeta 1.8.0 importable and usable on current torch.

Import this module before torchmeta (nothing in site-packages is edited)::

    import mamlext.compat.torchmeta  # noqa: F401
    import torchmeta

It bridges three gaps and lets the two libraries' layers mix, and does nothing else (file
and line numbers are torchmeta 1.8.0's):

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
4. torchmeta's containers route ``params`` only to children that are its own
   ``MetaModule``s: mamlext's ``MetaModule`` gets torchmeta's as its base, so that the
   libraries' layers mix in one model, either container outside.

The stand-in lives in :mod:`mamlext.compat.torchvision_stand_in`.

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
import importlib
import importlib.util
import platform
import random
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from mamlext.compat import torchvision_stand_in
from mamlext.inner import gradient_update_parameters as fused_gradient_update_parameters
from mamlext.version import __version__

__all__ = ["CompatStatus", "seed_from_torch", "status", "use_fused_update"]

# What torchmeta 1.8.0 imports from torchvision (found by grepping its sources).
_TORCHVISION_MODULES = (
    "torchvision.transforms",  # Compose, Resize, CenterCrop, ToTensor
    "torchvision.transforms.functional",  # rotate, hflip, vflip
    "torchvision.datasets.utils",  # list_dir, download_url, check_integrity, private helpers
)


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
        return (
            f"mamlext.compat.torchmeta: torchmeta {self.torchmeta}; "
            f"torchvision {self.torchvision}; patches: {', '.join(self.patches) or 'none'}; "
            f"mamlext {__version__}, torch {torch.__version__}, "
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
        torchvision_stand_in.install(reason)
        return f"stand-in ({reason})"
    return f"real {getattr(sys.modules['torchvision'], '__version__', '(no __version__)')}"


def _ours(value: Any) -> bool:
    return getattr(value, "__module__", None) in (__name__, torchvision_stand_in.__name__)


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
        for name, helper in torchvision_stand_in.DATASETS_UTILS_PRIVATE.items():
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
