"""``import mamlext.compat.learn2learn``: learn2learn scripts on current Python and torch.

The reference is the real learn2learn 0.2.0: ``tests/data/learn2learn_reference.pt`` holds
what ``tests/learn2learn_reference.py`` computed with it (Python 3.10, torch 2.13.0);
``MAMLEXT_LEARN2LEARN_PYTHON`` (an interpreter with learn2learn) recomputes it live, and
``MAMLEXT_LEARN2LEARN_SRC`` (a checkout of learn2learn v0.2.0) runs learn2learn's own unit
tests against the shim. Each of these runs in a fresh interpreter: the shim replaces
``learn2learn`` in ``sys.modules``.
"""

import os
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

import mamlext
from tests.conftest import REPO, SHARED_DATA, run_python

REFERENCE = REPO / "tests" / "data" / "learn2learn_reference.pt"
OMNIGLOT = SHARED_DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").exists(), reason=f"no Omniglot zips in {OMNIGLOT}"
)


def run_ok(code: str, env: dict | None = None, cwd: Path = REPO) -> str:
    proc = run_python(textwrap.dedent(code), env, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def same(a, b, exact: bool) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, exact) for x, y in zip(a, b))
    if exact:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5 if a.dtype == torch.float32 else 1e-12, atol=1e-7)


def compare_with(reference: Path, tmp_path: Path) -> None:
    ours = tmp_path / "shim.pt"
    run_ok(f"import sys; sys.argv = ['r', {str(ours)!r}, '--shim']\n"
           + (REPO / "tests" / "learn2learn_reference.py").read_text())  # fmt: skip
    want, got = torch.load(reference), torch.load(ours)
    assert want.keys() == got.keys()
    # bit for bit where the native kernel serves (it rounds as learn2learn's p + (-lr * g))
    exact = mamlext.backend_info()["cpu"].kernel == "native"
    differ = [k for k in want if not same(want[k], got[k], exact or k.startswith("tasks/"))]
    assert not differ, differ


def test_algorithms_and_tasks_equal_the_real_learn2learn(tmp_path):
    """MAML (second and first order), MetaSGD, float32 and float64: losses, adapted
    parameters, meta-gradients and the shared BatchNorm statistics; tasks of a seeded
    Python random, fused and step by step."""
    compare_with(REFERENCE, tmp_path)


def test_against_a_live_learn2learn(tmp_path):
    python = os.environ.get("MAMLEXT_LEARN2LEARN_PYTHON")
    if not python:
        pytest.skip("MAMLEXT_LEARN2LEARN_PYTHON names no interpreter with learn2learn 0.2.0")
    import subprocess

    reference = tmp_path / "real.pt"
    subprocess.run(
        [python, str(REPO / "tests" / "learn2learn_reference.py"), str(reference)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    compare_with(reference, tmp_path)


LEARN2LEARN_TESTS = [
    "tests/unit/algorithms/maml_test.py", "tests/unit/algorithms/metasgd_test.py",
    "tests/unit/utils_test.py", "tests/unit/data/transforms_test.py",
    "tests/unit/data/task_dataset_test.py",
]  # fmt: skip


def test_learn2learns_own_unit_tests_pass_on_the_shim():
    source = os.environ.get("MAMLEXT_LEARN2LEARN_SRC")
    if not source:
        pytest.skip("MAMLEXT_LEARN2LEARN_SRC names no checkout of learn2learn v0.2.0")
    out = run_ok(
        f"""
        import sys
        import mamlext.compat.learn2learn
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *{LEARN2LEARN_TESTS!r}]))
        """,
        cwd=Path(source),
    )
    assert " passed" in out and "failed" not in out, out[-2000:]


# ---- the import: what it replaces, what it keeps -----------------------------------------------


def test_the_import_installs_the_shim_without_gym_or_torchvision():
    out = run_ok(
        """
        import sys
        import mamlext.compat.learn2learn as shim
        import learn2learn as l2l
        from learn2learn.data.transforms import NWays
        from learn2learn.vision.models import OmniglotCNN
        from learn2learn.algorithms.maml import maml_update
        print(shim.status())
        print("gym" in sys.modules, l2l.__version__, l2l.clone_module is l2l.utils.clone_module)
        for missing in ("l2l.gym.MetaEnv", "l2l.algorithms.LightningMAML"):
            try:
                eval(missing)
            except AttributeError as error:
                print("LACKS", error)
        try:
            import learn2learn.text.datasets
        except ModuleNotFoundError as error:
            print("LACKS", error)
        """
    )
    assert "the shim (learn2learn is not installed)" in out
    assert "False 0.2.0 True" in out  # no gym
    lacks = [line for line in out.splitlines() if line.startswith("LACKS")]
    assert len(lacks) == 3 and all("offers algorithms, data" in line for line in lacks), lacks


def test_a_real_learn2learn_that_imports_is_kept_and_one_that_fails_is_replaced(tmp_path):
    fake = tmp_path / "site" / "learn2learn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.2.0'\nREAL = True\n")
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mamlext.compat.learn2learn as shim
        import learn2learn
        print(shim.status(), getattr(learn2learn, "REAL", False))
        print("WARNED", [str(w.message)[:50] for w in caught])
        shim.install(force=True)
        import learn2learn
        print("FORCED", shim.status(), getattr(learn2learn, "REAL", False))
        """
    out = run_ok(code, {"PYTHONPATH": str(tmp_path / "site")})
    assert "the real learn2learn 0.2.0 (nothing changed) True" in out
    assert "WARNED ['learn2learn 0.2.0 is installed and imports: mamlex']" in out
    assert "FORCED mamlext.compat.learn2learn: the shim (forced) False" in out
    (fake / "__init__.py").write_text("import gym_that_is_missing\n")
    out = run_ok(code, {"PYTHONPATH": str(tmp_path / "site")})
    assert "the shim (the installed learn2learn does not import: ModuleNotFoundError" in out


# ---- vision: Omniglot from its zips, the benchmark's tasks, the models ------------------------


@needs_omniglot
def test_full_omniglot_reads_the_zips_in_order(tmp_path):
    out = run_ok(
        f"""
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        data = l2l.vision.datasets.FullOmniglot(root={str(OMNIGLOT)!r})
        image, label = data[0]
        print(len(data), image.size, image.mode, label, data[20][1], data[32459][1])
        meta = l2l.data.MetaDataset(data)
        print(len(meta.labels), sorted(meta.labels_to_indices[964])[:2])
        """
    )
    assert "32460 (105, 105) L 0 1 1622" in out
    assert "1623 [19280, 19281]" in out  # the evaluation set follows the 964 background ones


@needs_omniglot
def test_full_omniglot_ignores_learn2learns_label_cache_in_its_root(tmp_path):
    """The real learn2learn caches its label maps in root/omniglot-bookkeeping.pkl, indexed in
    its own order of the files: the shim, which orders them by name, neither reads nor
    overwrites it."""
    for name in ("images_background.zip", "images_evaluation.zip"):
        (tmp_path / name).symlink_to(OMNIGLOT / name)
    cache = tmp_path / "omniglot-bookkeeping.pkl"
    stale = {"labels_to_indices": {0: [5]}, "indices_to_labels": {5: 0}, "labels": [0]}
    cache.write_bytes(pickle.dumps(stale))
    out = run_ok(
        f"""
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        meta = l2l.data.MetaDataset(l2l.vision.datasets.FullOmniglot(root={str(tmp_path)!r}))
        print(len(meta.labels), sorted(meta.labels_to_indices[964])[:2])
        """
    )
    assert "1623 [19280, 19281]" in out
    assert pickle.loads(cache.read_bytes()) == stale


@needs_omniglot
def test_omniglot_tasksets_have_learn2learns_layout_and_disjoint_splits(tmp_path):
    home = tmp_path / "home"
    (home / "data" / "omniglot-py").mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        (home / "data" / "omniglot-py" / name).symlink_to(OMNIGLOT / name)
    out = run_ok(
        """
        import random
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        random.seed(0)
        tasks = l2l.vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2,
                                                   test_ways=5, test_samples=2, root="~/data")
        x, y = tasks.train.sample()
        print("SHAPE", tuple(x.shape), x.dtype, float(x.min()), float(x.max()), y.tolist())
        ink = float(x.mean())
        print("INK", ink < 0.5)
        seen = {}
        for split in ("train", "validation", "test"):
            taskset = getattr(tasks, split)
            classes = set()
            for _ in range(30):
                description = taskset.sample_task_description()
                classes |= {taskset.dataset.indices_to_labels[d.index] for d in description}
            seen[split] = classes
        print("DISJOINT", not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"]))
        """,
        {"HOME": str(home)},
    )
    assert "SHAPE (10, 1, 28, 28) torch.float32 0.0 1.0" in out
    labels = eval(out.split("SHAPE")[1].split("]")[0].split(" 1.0 ")[1] + "]")
    assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(labels[2 * i] == labels[2 * i + 1] for i in range(5))  # 2 samples a class, grouped
    assert "INK True" in out and "DISJOINT True" in out


def test_class_rotation_turns_each_class_as_pil_does():
    out = run_ok(
        """
        import numpy as np, torch
        from PIL import Image
        from mamlext.compat.learn2learn.vision import rotate_image
        image = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
        for angle in (90.0, 180.0, 270.0):
            ours = rotate_image(torch.from_numpy(image)[None].float(), angle)[0].numpy()
            pil = np.asarray(Image.fromarray(image).rotate(angle), dtype=np.float32)
            print(angle, np.array_equal(ours, pil))
        """
    )
    assert out.split() == ["90.0", "True", "180.0", "True", "270.0", "True"]


def test_models_have_learn2learns_layers_names_and_shapes():
    out = run_ok(
        """
        import torch
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        fc = l2l.vision.models.OmniglotFC(28 * 28, 5)
        names = [n for n, _ in fc.named_parameters()]
        print(len(names), names[:4], names[-2:], len(list(fc.buffers())))
        print(tuple(fc(torch.randn(3, 1, 28, 28)).shape))
        cnn = l2l.vision.models.OmniglotCNN(5)
        keys = cnn.state_dict().keys()
        print(any(k.startswith("base.0.") for k in keys), any(k.startswith("features.1.0.") for k in keys))
        print(len(list(cnn.parameters())), float(cnn.classifier.bias.abs().sum()))
        mini = l2l.vision.models.MiniImagenetCNN(5)
        print(tuple(mini(torch.randn(2, 3, 84, 84)).shape), mini.hidden_size,
              [n for n, _ in mini.named_parameters()][:4])
        """
    )
    lines = out.splitlines()
    assert lines[0].startswith("18 ['features.1.0.normalize.weight', 'features.1.0.normalize.bias', "
                               "'features.1.0.linear.weight', 'features.1.0.linear.bias']")  # fmt: skip
    assert lines[0].endswith("['classifier.weight', 'classifier.bias'] 0")  # no running stats
    assert lines[1] == "(3, 5)"
    assert lines[2] == "True True"  # base is also features[1], as in learn2learn
    assert lines[3] == "18 0.0"
    assert lines[4].startswith("(2, 5) 64 ['features.0.normalize.weight'")


# ---- what a learn2learn user meets ------------------------------------------------------------


def test_clones_share_batchnorm_statistics_and_accumulate_into_the_original():
    out = run_ok(
        """
        import torch
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                  torch.nn.Linear(6, 2))
        net.ways = 2
        maml = l2l.algorithms.MAML(net, lr=0.1)
        before = net[1].running_mean.clone()
        for _ in range(2):
            clone = maml.clone()
            x = torch.randn(8, 4)
            clone.adapt(clone(x).pow(2).mean())
            clone(x).pow(2).mean().backward()
        print(not torch.equal(before, net[1].running_mean), clone.module[1].running_mean is net[1].running_mean)
        print(all(p.grad is not None for p in net.parameters()), maml.lr, maml.ways)
        """
    )
    assert out.split() == ["True", "True", "True", "0.1", "2"]  # attributes pass through


def test_adapt_without_allow_nograd_names_the_fix():
    out = run_ok(
        """
        import torch
        import mamlext.compat.learn2learn
        import learn2learn as l2l
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        net[0].weight.requires_grad_(False)
        clone = l2l.algorithms.MAML(net, lr=0.1).clone()
        loss = clone(torch.randn(3, 4)).sum()
        try:
            clone.adapt(loss)
        except RuntimeError as error:
            print("RAISED", str(error).splitlines()[-1])
        clone.adapt(loss, allow_nograd=True)
        print("ADAPTED", torch.equal(clone.module[0].weight, net[0].weight),
              torch.equal(clone.module[1].weight, net[1].weight))
        """
    )
    assert "RAISED learn2learn: Maybe try with allow_nograd=True and/or allow_unused=True ?" in out
    assert "ADAPTED True False" in out  # the frozen parameter is not updated, the other is
