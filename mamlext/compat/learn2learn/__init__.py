"""learn2learn scripts on current Python and torch, with mamlext underneath: one line,

    import mamlext.compat.learn2learn  # first in the script

after which ``import learn2learn`` (and ``learn2learn.algorithms``, ``.data``,
``.data.transforms``, ``.vision.{datasets,models,transforms,benchmarks}``, ``.utils``,
``.nn``) gives this package's pure-Python modules, written from learn2learn 0.2.0's
documented behaviour (docs/learn2learn.md; learn2learn 0.2.0 does not install on Python >=
3.11, its C extension does not build). ``MAML``'s and ``MetaSGD``'s inner step is mamlext's
fused update. Importing it never imports ``gym``, nor needs torchvision.

Where the real learn2learn imports, it is kept: this import changes nothing and says so
(one warning); :func:`install` with ``force=True`` puts the shim in its place.
:func:`status` says which serves. learn2learn's own examples read toy data from torchmeta:
where torchmeta is installed, :mod:`mamlext.compat.torchmeta` is imported too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

from mamlext.compat.learn2learn import algorithms, data, transforms, utils, vision, vision_models

__all__ = ["install", "status"]

VERSION = "0.2.0"  # the learn2learn release whose behaviour the shim follows
PROVIDES = "algorithms, data, data.transforms, vision, utils and nn (the MAML family)"
_state = {"serving": "nothing yet"}


def status() -> str:
    """Which learn2learn serves ``import learn2learn`` here, in one line."""
    return f"mamlext.compat.learn2learn: {_state['serving']}"


def _names(module: types.ModuleType) -> dict[str, Any]:
    return {name: getattr(module, name) for name in module.__all__}


def _lacks(module: str, name: str) -> str:
    return (
        f"mamlext's learn2learn shim has no {module}.{name}: it offers {PROVIDES}. Install "
        "learn2learn 0.2.0 (it builds on Python 3.10) for the rest"
    )


def _module(name: str, names: dict[str, Any], doc: str) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []  # a package: `from learn2learn.x import y` asks the finder below

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(_lacks(name, attr))

    vars(module).update(names, __getattr__=__getattr__, __mamlext_shim__=True)
    return module


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: a ``learn2learn.*`` module the shim lacks says so."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.startswith("learn2learn.") and getattr(
            sys.modules.get("learn2learn"), "__mamlext_shim__", False
        ):
            raise ModuleNotFoundError(_lacks("learn2learn", fullname[12:]), name=fullname)
        return None


def _shim_modules() -> dict[str, types.ModuleType]:
    doc = "learn2learn, as mamlext's pure-Python shim (mamlext.compat.learn2learn)"
    modules = {
        "learn2learn.algorithms.maml": _module(
            "learn2learn.algorithms.maml",
            {"MAML": algorithms.MAML, "maml_update": algorithms.maml_update}, doc,
        ),
        "learn2learn.algorithms.meta_sgd": _module(
            "learn2learn.algorithms.meta_sgd",
            {"MetaSGD": algorithms.MetaSGD, "meta_sgd_update": algorithms.meta_sgd_update}, doc,
        ),
        "learn2learn.algorithms.base_learner": _module(
            "learn2learn.algorithms.base_learner", {"BaseLearner": algorithms.BaseLearner}, doc
        ),
        "learn2learn.utils": _module("learn2learn.utils", _names(utils), doc),
        "learn2learn.data.transforms": _module(
            "learn2learn.data.transforms", _names(transforms), doc
        ),
        "learn2learn.data.utils": _module(
            "learn2learn.data.utils",
            {"partition_task": data.partition_task, "InfiniteIterator": data.InfiniteIterator},
            doc,
        ),
        "learn2learn.vision.datasets": _module(
            "learn2learn.vision.datasets",
            {"FullOmniglot": vision.FullOmniglot, "MiniImagenet": vision.MiniImagenet}, doc,
        ),
        "learn2learn.vision.models": _module(
            "learn2learn.vision.models", _names(vision_models), doc
        ),
        "learn2learn.vision.transforms": _module(
            "learn2learn.vision.transforms", {"RandomClassRotation": vision.RandomClassRotation},
            doc,
        ),
        "learn2learn.vision.benchmarks": _module(
            "learn2learn.vision.benchmarks",
            {n: getattr(vision, n) for n in ("BenchmarkTasksets", "get_tasksets", "list_tasksets")},
            doc,
        ),
        "learn2learn.nn": _module(
            "learn2learn.nn",
            {n: getattr(vision_models, n) for n in ("Lambda", "Flatten", "Scale", "freeze", "unfreeze")},
            doc,
        ),
    }  # fmt: skip

    def sub(prefix: str) -> dict[str, types.ModuleType]:
        """The modules just below ``prefix``, by their last name."""
        return {k.rsplit(".", 1)[1]: v for k, v in modules.items() if k.rsplit(".", 1)[0] == prefix}

    modules["learn2learn.algorithms"] = _module(
        "learn2learn.algorithms", {**_names(algorithms), **sub("learn2learn.algorithms")}, doc
    )
    modules["learn2learn.data"] = _module(
        "learn2learn.data", {**_names(data), **sub("learn2learn.data")}, doc
    )
    modules["learn2learn.vision"] = _module("learn2learn.vision", sub("learn2learn.vision"), doc)
    top = {**_names(utils), **sub("learn2learn"), "__version__": VERSION}
    modules["learn2learn"] = _module("learn2learn", top, doc)
    return modules


def install(force: bool = False) -> str:
    """Make ``import learn2learn`` give the shim, unless the real learn2learn imports (then
    nothing changes, unless ``force``). Returns :func:`status`; idempotent."""
    if getattr(sys.modules.get("learn2learn"), "__mamlext_shim__", False):
        return status()
    if not force and importlib.util.find_spec("learn2learn") is not None:
        try:
            real = importlib.import_module("learn2learn")
        except Exception as error:  # e.g. no gym, a torchvision that does not import
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            _state["serving"] = f"the shim (the installed learn2learn does not import: {reason})"
        else:
            version = getattr(real, "__version__", "?")
            _state["serving"] = f"the real learn2learn {version} (nothing changed)"
            warnings.warn(
                f"learn2learn {version} is installed and imports: mamlext.compat.learn2learn "
                "changes nothing (mamlext.compat.learn2learn.install(force=True) puts the "
                "shim in its place)",
                stacklevel=3,
            )
            return status()
    else:
        _state["serving"] = "the shim" + (
            " (forced)" if force else " (learn2learn is not installed)"
        )
    for name in [n for n in sys.modules if n.split(".")[0] == "learn2learn"]:
        del sys.modules[name]  # a failed import of the real one leaves it half-initialised
    sys.modules.update(_shim_modules())
    if not any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        sys.meta_path.append(_ShimFinder())
    if importlib.util.find_spec("torchmeta") is not None:  # learn2learn's sine example uses it
        importlib.import_module("mamlext.compat.torchmeta")
    return status()


install()
