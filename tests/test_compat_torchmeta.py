"""mamlext.compat.torchmeta: real torchmeta 1.8.0 on current torch, each scenario in a fresh
interpreter (import order matters)."""

import importlib.util
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, run_python

needs_torchmeta = pytest.mark.skipif(
    importlib.util.find_spec("torchmeta") is None,
    reason="torchmeta 1.8.0 is not installed (pip install --no-deps torchmeta==1.8.0)",
)

OMNIGLOT = SHARED_DATA / "omniglot"


def run_ok(code: str, env: dict | None = None) -> str:
    proc = run_python(textwrap.dedent(code), env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def write_package(root: Path, files: dict[str, str]) -> dict[str, str]:
    """Write a fake ``torchvision`` under ``root``; return the env that puts it on sys.path."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


@needs_torchmeta
def test_torchmeta_imports_only_after_the_compat_module():
    run_ok(
        """
        import importlib
        import mamlext.compat.torchmeta as compat
        import torchmeta
        from torchmeta.modules import MetaLinear

        assert MetaLinear(3, 1)(__import__("torch").ones(2, 3)).shape == (2, 1)
        first = compat.status()
        assert first.torchmeta == "1.8.0", first
        assert "torchmeta.utils.data.task.SubsetTask.__getitems__" in first.patches, first
        import mamlext.compat.torchmeta
        importlib.reload(compat)  # idempotent: finds its shims in place
        assert repr(compat.status()) == repr(first), (compat.status(), first)

        import platform, torch, mamlext
        line = str(first)  # for a bug report
        assert len(line.splitlines()) == 1, line
        assert line.startswith("mamlext.compat.torchmeta: torchmeta 1.8.0; torchvision "), line
        for part in (first.torchvision, *first.patches, f"mamlext {mamlext.__version__}",
                     f"torch {torch.__version__}", f"Python {platform.python_version()}"):
            assert part in line, (part, line)
        """
    )
    plain = run_python("import torchmeta")
    assert plain.returncode != 0
    assert "torchvision" in plain.stderr


def test_nothing_to_do_without_torchmeta():
    run_ok(
        """
        import sys
        sys.modules["torchmeta"] = None  # as if not installed
        import mamlext.compat.torchmeta as compat

        assert compat.status() == compat.CompatStatus("not installed", "untouched")
        assert "torchvision" not in sys.modules
        """
    )


@needs_torchmeta
def test_omniglot_helper_batches_from_the_shared_copy():
    root = OMNIGLOT / "torchmeta"
    if not (root / "omniglot" / "data.hdf5").exists():
        pytest.skip(f"no torchmeta Omniglot copy at {root}")
    before = sorted((p.name, p.stat().st_mtime) for p in root.rglob("*"))
    run_ok(
        """
        import os
        import mamlext.compat.torchmeta
        import torch
        from torchmeta.datasets.helpers import omniglot
        from torchmeta.utils.data import BatchMetaDataLoader

        dataset = omniglot(os.environ["ROOT"], ways=5, shots=1, test_shots=15,
                           meta_train=True, download=True)
        batch = next(iter(BatchMetaDataLoader(dataset, batch_size=4, num_workers=0)))
        (train_x, train_y), (test_x, test_y) = batch["train"], batch["test"]
        assert train_x.shape == (4, 5, 1, 28, 28) and train_y.shape == (4, 5)
        assert test_x.shape == (4, 75, 1, 28, 28) and test_y.shape == (4, 75)
        assert train_x.dtype == test_x.dtype == torch.float32
        for x in (train_x, test_x):
            assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
        for y in train_y:
            assert sorted(y.tolist()) == list(range(5))
        for y in test_y:
            assert torch.bincount(y, minlength=5).tolist() == [15] * 5
        """,
        {"ROOT": str(root)},
    )
    assert sorted((p.name, p.stat().st_mtime) for p in root.rglob("*")) == before


@needs_torchmeta
def test_sinusoid_helper_batches():
    run_ok(
        """
        import mamlext.compat.torchmeta
        from torchmeta.toy.helpers import sinusoid
        from torchmeta.utils.data import BatchMetaDataLoader

        batch = next(iter(BatchMetaDataLoader(sinusoid(shots=10, test_shots=15), batch_size=3)))
        for inputs, targets in (batch["train"], batch["test"]):
            assert inputs.dtype.is_floating_point and targets.dtype.is_floating_point
        assert batch["train"][0].shape == batch["train"][1].shape == (3, 10, 1)
        assert batch["test"][0].shape == (3, 15, 1)
        """
    )


@needs_torchmeta
def test_gradient_update_parameters_hand_derived():
    # torchmeta's tests/utils/test_gradient_based.py: f(w) = 0.5 (w . [1, 2, 3])^2 at
    # w = [2, 3, 5], one step of 0.5, then g = 0.5 (w' . [4, 5, 6])^2 differentiated
    # through the step.
    run_ok(
        """
        import mamlext.compat.torchmeta
        import torch
        from torchmeta.modules import MetaLinear, MetaSequential
        from torchmeta.utils.gradient_based import gradient_update_parameters

        model = MetaSequential(MetaLinear(3, 1, bias=False))
        model[0].weight.data = torch.tensor([[2.0, 3.0, 5.0]])
        loss = 0.5 * model(torch.tensor([[1.0, 2.0, 3.0]])) ** 2
        params = gradient_update_parameters(model, loss, step_size=0.5)
        assert loss.item() == 264.5
        assert list(params) == ["0.weight"]
        assert params["0.weight"].tolist() == [[-9.5, -20.0, -29.5]]

        test_loss = 0.5 * model(torch.tensor([[4.0, 5.0, 6.0]]), params=params) ** 2
        (grad,) = torch.autograd.grad(test_loss, model.parameters())
        assert grad.tolist() == [[3780.0, 8505.0, 13230.0]]
        """
    )


@needs_torchmeta
def test_stand_in_transforms_match_torchvision_on_omniglot_pngs():
    # torchvision's Resize on a PIL image ignores `antialias` and calls PIL's
    # `img.resize((w, h), BILINEAR)`, whose filter widens with the downscale factor
    # (antialiased); ToTensor then divides uint8 by 255. The stand-in must match that
    # exactly, and the shared omniglot_28x28.npz (made "as Resize(28)") independently.
    if not (OMNIGLOT / "images_background.zip").exists():
        pytest.skip(f"no Omniglot PNG zip in {OMNIGLOT}")
    run_ok(
        """
        import io, os, sys, zipfile
        sys.modules["torchvision"] = None  # the stand-in even where a torchvision imports
        import mamlext.compat.torchmeta
        import numpy as np, torch, torchvision
        from PIL import Image, ImageOps
        from torchmeta.transforms import Rotation
        from torchvision.transforms import Compose, Resize, ToTensor

        assert torchvision.__mamlext_stub__
        root = os.environ["OMNIGLOT"]
        small = np.load(os.path.join(root, "omniglot_28x28.npz"))
        names = list(small["filenames"])
        with zipfile.ZipFile(os.path.join(root, "images_background.zip")) as zf:
            for name in names[:19280:3851]:
                png = Image.open(io.BytesIO(zf.read(name)))
                assert png.size == (105, 105)
                image = ImageOps.invert(png.convert("L"))  # as torchmeta's data.hdf5 holds it
                out = Compose([Resize(28), ToTensor()])(image)
                assert out.shape == (1, 28, 28) and out.dtype == torch.float32

                pil = np.asarray(image.resize((28, 28), Image.BILINEAR), dtype=np.float32)
                assert torch.equal(out[0], torch.from_numpy(pil / 255))
                as_uint8 = (out[0] * 255).round().to(torch.uint8).numpy()
                assert np.array_equal(as_uint8, small["images"][names.index(name)])

                # torchmeta's class augmentation: torchvision's rotate is PIL's, nearest
                rotated = Rotation(90)(image)
                assert rotated.tobytes() == image.transpose(Image.Transpose.ROTATE_90).tobytes()

                big = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None, None]
                for antialias, near in ((True, True), (False, False)):
                    torch_out = torch.nn.functional.interpolate(
                        big, size=(28, 28), mode="bilinear", antialias=antialias)[0]
                    assert ((out - torch_out).abs().max() <= 1 / 255) == near, antialias
        """,
        {"OMNIGLOT": str(OMNIGLOT)},
    )


@needs_torchmeta
def test_working_torchvision_gets_the_missing_helper_and_is_kept(tmp_path):
    env = write_package(
        tmp_path,
        {
            "torchvision/__init__.py": """
                __version__ = "0.0.fake"
                from torchvision import datasets, transforms
                """,
            "torchvision/transforms/__init__.py": """
                from torchvision.transforms import functional

                class Compose:
                    def __init__(self, transforms):
                        self.transforms = transforms

                Resize = CenterCrop = ToTensor = Compose
                """,
            "torchvision/transforms/functional.py": "def rotate(): ...\nhflip = vflip = rotate\n",
            "torchvision/datasets/__init__.py": "from torchvision.datasets import utils\n",
            "torchvision/datasets/utils.py": """
                def list_dir(): ...

                download_url = check_integrity = _save_response_content = list_dir
                """,
        },
    )
    run_ok(
        """
        import types
        import mamlext.compat.torchmeta as compat
        import torchmeta.datasets.utils
        import torchvision
        import torchvision.datasets.utils as tv_utils

        assert not hasattr(torchvision, "__mamlext_stub__")
        assert compat.status().torchvision == "real 0.0.fake", compat.status()
        assert compat.status().patches == (
            "torchvision.datasets.utils._get_confirm_token",
            "torchmeta.utils.data.task.SubsetTask.__getitems__",
            "mamlext.modules.MetaModule.__bases__ = (torchmeta.modules.MetaModule,)",
        ), compat.status()
        assert tv_utils._save_response_content is tv_utils.list_dir  # the fake's own, kept
        assert torchmeta.datasets.utils._get_confirm_token is tv_utils._get_confirm_token
        response = types.SimpleNamespace(cookies={"NID": "1", "download_warning_9": "token"})
        assert tv_utils._get_confirm_token(response) == "token"
        """,
        env,
    )


@needs_torchmeta
def test_torchvision_whose_import_raises_is_replaced_by_the_stand_in(tmp_path):
    env = write_package(
        tmp_path,
        {
            "torchvision/__init__.py": """
                from torchvision import extension
                raise RuntimeError("operator torchvision::nms does not exist")
                """,
            "torchvision/extension.py": "",
        },
    )
    run_ok(
        """
        import sys
        import mamlext.compat.torchmeta as compat
        import torchmeta
        import torchvision

        assert torchvision.__mamlext_stub__
        reason = "RuntimeError: operator torchvision::nms does not exist"
        assert compat.status().torchvision == f"stand-in ({reason})", compat.status()
        assert "torchvision.extension" not in sys.modules  # the half-imported one is gone

        # What the stand-in lacks: the error names it, the missing name, and the reason.
        def message(statement, error_type):
            try:
                exec(statement, {})
            except error_type as error:
                return str(error)
            raise AssertionError(f"{statement} did not raise {error_type.__name__}")

        for statement, error_type, missing in (
            ("from torchvision.transforms import Normalize", ImportError,
             "torchvision.transforms.Normalize"),
            ("from torchvision.transforms.functional import normalize", ImportError,
             "torchvision.transforms.functional.normalize"),
            ("from torchvision import models", ImportError, "torchvision.models"),
            ("import torchvision.models", ImportError, "torchvision.models"),
            ("import torchvision; torchvision.__version__", AttributeError,
             "torchvision.__version__"),
            ("import torchvision.transforms as T; T.Normalize", AttributeError,
             "torchvision.transforms.Normalize"),
        ):
            text = message(statement, error_type)
            for part in ("mamlext's torchvision stand-in", f"has no {missing}:",
                         "the real torchvision is not importable here", reason):
                assert part in text, (statement, part, text)
        import torchvision.transforms as T
        assert not hasattr(T, "Normalize") and getattr(T, "Normalize", None) is None
        from torchvision.transforms import Compose, ToTensor  # what torchmeta needs, still there
        """,
        env,
    )


@needs_torchmeta
def test_torchmeta_and_mamlext_layers_mix_in_one_model_inside_mamlext_maml():
    """torchmeta's Meta layers inside mamlext containers and the other way round, under
    mamlext.MAML (per-task loop), equal higher on the plain twin model."""
    code = """
import mamlext.compat.torchmeta
import higher, torch, torch.nn.functional as F
import torchmeta.modules as tm
import mamlext
from mamlext import modules as mm
from torch import nn
torch.manual_seed(0)
plain = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)), nn.Tanh(), nn.Linear(5, 3)).double()
mixed = mm.MetaSequential(tm.MetaSequential(mm.MetaLinear(4, 6), nn.Tanh(), tm.MetaLinear(6, 5)), nn.Tanh(), tm.MetaLinear(5, 3)).double()
mixed.load_state_dict(plain.state_dict())
assert [n for n, _ in mixed.meta_named_parameters()] == [n for n, _ in plain.named_parameters()]
xs, xq = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
ys, yq = torch.randint(0, 3, (2, 6)), torch.randint(0, 3, (2, 6))
maml = mamlext.MAML(mixed, step_size=0.3, num_steps=2)
assert not maml.use_batched(xs, xq)
loss, _ = maml(xs, ys, xq, yq)
ours = torch.autograd.grad(loss, list(mixed.parameters()))
losses = []
for t in range(2):
    with higher.innerloop_ctx(plain, torch.optim.SGD(plain.parameters(), lr=0.3), copy_initial_weights=False) as (f, d):
        for _ in range(2):
            d.step(F.cross_entropy(f(xs[t]), ys[t]))
        losses.append(F.cross_entropy(f(xq[t]), yq[t]))
ref = torch.autograd.grad(torch.stack(losses).mean(), list(plain.parameters()))
for a, b in zip(ours, ref):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
print("OK")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def write_user_modules(root: Path) -> dict[str, str]:
    """Library modules that import torchmeta's function by name, as pytorch-maml's do."""
    return write_package(
        root,
        {
            "early_user.py": """
                from torchmeta.utils import gradient_update_parameters
                from torchmeta.utils.gradient_based import gradient_update_parameters as gup
                """,
            "late_user.py": "from torchmeta.utils import gradient_update_parameters\n",
        },
    )


@needs_torchmeta
def test_fused_update_rebinds_every_name_of_torchmeta_s_function(tmp_path):
    run_ok(
        """
        import importlib
        import mamlext.compat.torchmeta as compat
        import early_user  # bound torchmeta's function before the patch
        import torchmeta.utils.gradient_based

        originals = [torchmeta.utils.gradient_based.gradient_update_parameters]
        assert originals[0].__module__ == "torchmeta.utils.gradient_based"
        assert compat.status().patches[-1].startswith("mamlext.modules"), compat.status()

        import mamlext.compat.torchmeta_fused
        import late_user
        import mamlext
        import torchmeta.utils

        fused = mamlext.gradient_update_parameters
        for holder, name in (
            (torchmeta.utils.gradient_based, "gradient_update_parameters"),
            (torchmeta.utils, "gradient_update_parameters"),
            (early_user, "gradient_update_parameters"),
            (early_user, "gup"),
            (late_user, "gradient_update_parameters"),
        ):
            assert getattr(holder, name) is fused, (holder, name)
        assert originals[0] is not fused  # a list entry is no module-level name

        importlib.reload(mamlext.compat.torchmeta_fused)  # idempotent
        compat.use_fused_update()
        assert torchmeta.utils.gradient_update_parameters is fused
        patch = "torchmeta's gradient_update_parameters = mamlext.gradient_update_parameters"
        assert compat.status().patches.count(patch) == 1, compat.status()
        """,
        write_user_modules(tmp_path),
    )


@needs_torchmeta
def test_fused_update_equals_torchmeta_s_own_to_the_bit():
    """Losses, adapted parameters and meta-gradients (to the weights and to learned step
    sizes) through torchmeta's name after the patch equal torchmeta's function's: to the
    bit where the native kernel serves, as torchmeta's two roundings (``step * g``, then
    ``p - that``); the pure-PyTorch fallback's ``torch.add(p, g, alpha=-step)`` rounds once."""
    run_ok(
        """
        import mamlext, mamlext.compat.torchmeta as compat
        import torch, torch.nn.functional as F
        from torch import nn
        from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential
        import torchmeta.utils

        originals = [torchmeta.utils.gradient_update_parameters]
        compat.use_fused_update()
        patched = torchmeta.utils.gradient_update_parameters
        assert patched is not originals[0]

        def model():
            torch.manual_seed(0)
            return MetaSequential(
                MetaConv2d(1, 4, 3, padding=1),
                MetaBatchNorm2d(4, momentum=1.0, track_running_stats=False),
                nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), MetaLinear(4 * 4 * 4, 3))

        def episode(update, dtype, first_order, step):
            torch.manual_seed(1)
            net = model().to(dtype)
            xs, ys = torch.randn(6, 1, 8, 8, dtype=dtype), torch.arange(6) % 3
            xq, yq = torch.randn(9, 1, 8, 8, dtype=dtype), torch.arange(9) % 3
            names = [name for name, _ in net.meta_named_parameters()]
            step_size = step if step == 0.4 else {  # a float and a per-element tensor
                name: 0.1 * (i + 1) if i % 2 else
                torch.full_like(p, 0.3, requires_grad=True)
                for i, (name, p) in enumerate(net.meta_named_parameters())}
            params, losses = None, []
            for _ in range(2):
                losses.append(F.cross_entropy(net(xs, params=params), ys))
                params = update(net, losses[-1], params=params, step_size=step_size,
                                first_order=first_order)
            query = F.cross_entropy(net(xq, params=params), yq)
            rates = [] if step == 0.4 else [r for r in step_size.values() if torch.is_tensor(r)]
            grads = torch.autograd.grad(query, [*net.parameters(), *rates])
            assert list(params) == names
            return [*losses, query, *params.values(), *grads]

        exact = mamlext.backend_info()["cpu"].kernel == "native"
        for case in [(d, f, s) for d in (torch.float32, torch.float64)
                     for f in (False, True) for s in (0.4, "dict")]:
            ours, theirs = episode(patched, *case), episode(originals[0], *case)
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert a.dtype == b.dtype == case[0]
                if exact:
                    assert torch.equal(a, b), (case, (a - b).abs().max())
                else:
                    tol = 1e-12 if case[0] == torch.float64 else 1e-5
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=str(case))
        """
    )


@needs_torchmeta
def test_errors_are_the_ones_torchmeta_s_callers_catch():
    run_ok(
        """
        import mamlext.compat.torchmeta as compat
        import torch
        from torchmeta.modules import MetaLinear, MetaSequential
        import torchmeta.utils

        functions = {"torchmeta": torchmeta.utils.gradient_update_parameters}
        compat.use_fused_update()
        functions["fused"] = torchmeta.utils.gradient_update_parameters

        model = MetaSequential(MetaLinear(3, 2), MetaLinear(2, 1))
        x = torch.randn(4, 3)
        unused = model[0](x).sum()  # the second layer is not used
        with torch.no_grad():
            no_graph = model(x).sum()
        for loss in (unused, no_graph):
            for name, update in functions.items():
                try:
                    update(model, loss)
                except RuntimeError as error:  # what autograd raised inside torchmeta's
                    assert isinstance(error, ValueError) == (name == "fused"), (name, error)
                else:
                    raise AssertionError(f"{name} raised nothing")
        """
    )


SEEDED_HELPERS = {
    "sinusoid": """
        from torchmeta.toy.helpers import sinusoid
        def make():
            return sinusoid(shots=3, test_shots=2)
        """,
    "omniglot": """
        import os
        from torchmeta.datasets.helpers import omniglot
        def make():
            return omniglot(os.environ["ROOT"], ways=3, shots=1, test_shots=2, meta_train=True)
        """,
}


@needs_torchmeta
@pytest.mark.parametrize("helper", list(SEEDED_HELPERS))
def test_seed_from_torch_makes_two_runs_repeat(helper):
    root = OMNIGLOT / "torchmeta"
    if helper == "omniglot" and not (root / "omniglot" / "data.hdf5").exists():
        pytest.skip(f"no torchmeta Omniglot copy at {root}")
    run_ok(
        "import mamlext.compat.torchmeta as compat\n"
        + textwrap.dedent(SEEDED_HELPERS[helper])
        + textwrap.dedent(
            """
            import torch
            from torchmeta.utils.data import BatchMetaDataLoader

            def run():
                torch.manual_seed(0)
                batches, tensors = iter(BatchMetaDataLoader(make(), batch_size=2)), []
                for _ in range(2):
                    batch = next(batches)
                    tensors += [*batch["train"], *batch["test"]]
                return tensors

            def same(a, b):
                return all(torch.equal(x, y) for x, y in zip(a, b))

            assert not same(run(), run())  # torchmeta: fresh OS entropy each time
            compat.seed_from_torch()
            compat.seed_from_torch()  # idempotent
            assert same(run(), run())
            seeded = [p for p in compat.status().patches if p.endswith("(seeded from torch)")]
            assert len(seeded) == 3, compat.status()
            """
        ),
        {"ROOT": str(root)},
    )
