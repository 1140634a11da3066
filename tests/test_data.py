"""Task data: batch format, sampling invariants, seeding, Omniglot sources and splits, toys."""

import hashlib
import io
import itertools
import math
import re
import shutil
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mamlext.data import (
    CorruptDataError,
    FewShotTasks,
    Harmonic,
    Sinusoid,
    TaskDataset,
    load_omniglot,
    omniglot_files,
    omniglot_tasks,
    rotate_classes,
    split_indices,
)
from mamlext.data import omniglot as og
from mamlext.data.tasks import sample_without_replacement
from tests.conftest import SHARED_DATA

OMNIGLOT = SHARED_DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "omniglot_28x28.npz").is_file(),
    reason=f"the offline Omniglot copy is absent ({OMNIGLOT})",
)


def id_images(num_classes: int = 12, per_class: int = 6) -> torch.Tensor:
    """``[N, E, 1, 1, 2]`` float images whose pixels are (class, example): traceable samples."""
    c, e = torch.meshgrid(torch.arange(num_classes), torch.arange(per_class), indexing="ij")
    return torch.stack([c, e], -1).float().view(num_classes, per_class, 1, 1, 2)


def assert_batches_equal(a: dict, b: dict) -> None:
    for k in ("train", "test"):
        for x, y in zip(a[k], b[k]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---- FewShotTasks -------------------------------------------------------------------------


def test_batch_format():
    images = torch.randint(0, 256, (30, 20, 28, 28), dtype=torch.uint8)
    batch = FewShotTasks(images, ways=5, shots=2, test_shots=3).sample(7)
    assert set(batch) == {"train", "test"}
    for name, m in (("train", 2), ("test", 3)):
        x, y = batch[name]
        assert x.shape == (7, 5 * m, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (7, 5 * m) and y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        for row in y:
            assert torch.bincount(row, minlength=5).tolist() == [m] * 5


def test_classes_distinct_supports_and_queries_disjoint():
    tasks = FewShotTasks(id_images(12, 6), ways=4, shots=2, test_shots=3, seed=3)
    (xs, ys), (xq, yq) = tasks.sample(50).values()
    for b in range(50):
        cls_s = xs[b, :, 0, 0, 0].long().view(4, 2)
        cls_q = xq[b, :, 0, 0, 0].long().view(4, 3)
        assert (cls_s == cls_s[:, :1]).all() and (cls_q == cls_s[:, :1]).all()  # label <-> class
        assert len(set(cls_s[:, 0].tolist())) == 4
        assert (ys[b].view(4, 2) == torch.arange(4).view(4, 1)).all()
        assert (yq[b].view(4, 3) == torch.arange(4).view(4, 1)).all()
        ex = torch.cat([xs[b, :, 0, 0, 1].view(4, 2), xq[b, :, 0, 0, 1].view(4, 3)], 1)
        assert all(len(set(r.tolist())) == 5 for r in ex)


def test_sampling_is_uniform():
    # Every ordered 3-of-3 draw (a permutation) and each class->label pair equally likely.
    g = torch.Generator().manual_seed(0)
    perms = sample_without_replacement(3, 3, 6000, g)
    counts = {p: 0 for p in itertools.permutations(range(3))}
    for row in perms.tolist():
        counts[tuple(row)] += 1
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts
    draws = sample_without_replacement(10, 4, 20000, g)
    freq = torch.zeros(10, 4)
    freq.index_put_((draws.view(-1), torch.arange(4).repeat(20000)), torch.ones(80000), True)
    assert (freq - 2000).abs().max() < 250, freq


def test_bad_arguments():
    images = torch.zeros(6, 5, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ways=7.*6 classes"):
        FewShotTasks(images, ways=7, shots=1, test_shots=1)
    with pytest.raises(ValueError, match=r"3 \+ 3 = 6.*5 examples"):
        FewShotTasks(images, ways=2, shots=3, test_shots=3)
    with pytest.raises(ValueError, match="shots >= 1"):
        FewShotTasks(images, ways=2, shots=0, test_shots=1)


def test_seeding_and_state_dict_resume():
    images = torch.randint(0, 256, (40, 20, 28, 28), dtype=torch.uint8)
    a = FewShotTasks(images, 5, 1, 2, seed=7)
    b = FewShotTasks(images, 5, 1, 2, seed=7)
    for _ in range(3):
        assert_batches_equal(a.sample(4), b.sample(4))
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    later = [a.sample(4) for _ in range(2)]
    buffer.seek(0)
    c = FewShotTasks(images, 5, 1, 2, seed=7)
    c.load_state_dict(torch.load(buffer))
    for expected in later:
        assert_batches_equal(c.sample(4), expected)
    first = FewShotTasks(images, 5, 1, 2, seed=7).sample(4)["train"][0]
    for other in (FewShotTasks(images, 5, 1, 2, seed=8), FewShotTasks(images, 5, 1, 2, 7, rank=1)):
        assert not torch.equal(other.sample(4)["train"][0], first)
    with pytest.raises(ValueError, match="rank"):
        FewShotTasks(images, 5, 1, 2, seed=7, rank=1).load_state_dict(state)


def test_dataloader_workers_get_distinct_seeded_streams():
    tasks = FewShotTasks(id_images(20, 6), ways=3, shots=1, test_shots=1, seed=5)
    dataset = TaskDataset(tasks, meta_batch=4, num_batches=4)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(dataset) == 4
    xs = [b["train"][0] for b in batches]
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(xs, 2))
    # The loader alternates workers: batch i comes from worker i % 2, stream (seed, rank, 0, w).
    for w in (0, 1):
        stream = tasks.spawn(0, w)
        for i in (w, w + 2):
            assert_batches_equal(batches[i], stream.sample(4))
    assert_batches_equal(list(loader)[1], batches[1])  # reproducible
    dataset.set_epoch(1)
    assert not torch.equal(next(iter(loader))["train"][0], xs[0])


def test_rotate_classes():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    r = rotate_classes(x)
    assert r.shape == (8, 3, 4, 4)
    for k in range(4):
        assert torch.equal(r[2 * k : 2 * k + 2], torch.rot90(x, k, dims=(-2, -1)))


# ---- toy regression -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Sinusoid, Harmonic])
def test_toy_format_params_and_resume(cls):
    toy = cls(shots=5, test_shots=7, seed=1)
    batch, params = toy.sample_with_params(9)
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    assert xs.shape == ys.shape == (9, 5, 1) and xq.shape == yq.shape == (9, 7, 1)
    assert all(t.dtype == torch.float32 for t in (xs, ys, xq, yq))
    torch.testing.assert_close(cls.true_function(params, xs), ys)
    torch.testing.assert_close(cls.true_function(params, xq), yq)
    grid = torch.linspace(-5, 5, 100).expand(9, 100).unsqueeze(-1)  # e.g. for a plot
    assert cls.true_function(params, grid).shape == (9, 100, 1)
    state = toy.state_dict()
    later = toy.sample(3)
    toy.load_state_dict(state)
    assert_batches_equal(toy.sample(3), later)
    assert not torch.equal(cls(5, 7, seed=2).sample(9)["train"][1], ys)
    noisy = cls(5, 7, noise_std=0.5, seed=1).sample_with_params(9)
    assert not torch.allclose(
        cls.true_function(noisy[1], noisy[0]["train"][0]), noisy[0]["train"][1]
    )


def test_toy_ranges():
    batch, p = Sinusoid(50, 50).sample_with_params(500)
    assert p["amplitude"].min() >= 0.1 and p["amplitude"].max() <= 5.0
    assert p["phase"].min() >= 0 and p["phase"].max() <= math.pi
    x = torch.cat([batch["train"][0], batch["test"][0]])
    assert -5 <= x.min() < -4.9 and 4.9 < x.max() <= 5
    _, h = Harmonic(5, 5).sample_with_params(500)
    assert h["mean"].min() >= -4 and h["mean"].max() <= 4
    assert h["frequency"].min() >= 5 and h["frequency"].max() <= 7
    assert h["amplitude"].shape == h["phase"].shape == (500, 2)
    assert h["phase"].min() >= 0 and h["phase"].max() <= 2 * math.pi
    assert abs(h["amplitude"].std().item() - 1) < 0.1


# ---- Omniglot -----------------------------------------------------------------------------


@needs_omniglot
def test_omniglot_npz_array_and_tasks():
    data = load_omniglot(OMNIGLOT, "npz")
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.names[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert data.names[964].startswith("images_evaluation/")
    tasks = omniglot_tasks(OMNIGLOT, "train", ways=5, shots=1, test_shots=15)
    (xs, ys), (xq, yq) = tasks.sample(32).values()
    assert xs.shape == (32, 5, 1, 28, 28) and xq.shape == (32, 75, 1, 28, 28)
    assert ys.max() == yq.max() == 4 and xs.dtype == torch.float32
    # ink is 1.0 on a 0 background (mostly background)
    assert xs.max() == 1 and (xs < 0.5).float().mean() > 0.7


@needs_omniglot
def test_omniglot_hdf5_equals_npz_and_is_cached(tmp_path, monkeypatch):
    npz = load_omniglot(OMNIGLOT, "npz")
    hdf5 = load_omniglot(OMNIGLOT, "hdf5", cache_dir=tmp_path)  # all 1623 characters
    assert hdf5.names == npz.names
    np.testing.assert_array_equal(hdf5.images, npz.images)
    assert (tmp_path / "omniglot_28x28_hdf5.npz").is_file()
    omniglot_files.load_arrays.cache_clear()

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(omniglot_files, "read_hdf5", fail)
    np.testing.assert_array_equal(
        load_omniglot(OMNIGLOT, "hdf5", cache_dir=tmp_path).images, npz.images
    )


@needs_omniglot
def test_omniglot_zip_and_folders_equal_npz_on_some_characters(tmp_path):
    npz = load_omniglot(OMNIGLOT, "npz")
    picks = [npz.names[i] for i in (0, 77, 500, 963, 964, 1300, 1622)]
    zipped = load_omniglot(OMNIGLOT, "zip", characters=picks)
    assert zipped.names == tuple(picks)
    np.testing.assert_array_equal(zipped.images, npz.images[[npz.names.index(c) for c in picks]])
    # the same characters from extracted folders
    for s in omniglot_files.SETS:
        with zipfile.ZipFile(OMNIGLOT / f"{s}.zip") as z:
            z.extractall(tmp_path, [m for m in z.namelist() if m.startswith(tuple(picks))])
    folders = load_omniglot(tmp_path, "zip", characters=picks, cache=False)
    np.testing.assert_array_equal(folders.images, zipped.images)


@needs_omniglot
def test_omniglot_splits():
    names = load_omniglot(OMNIGLOT).names
    vinyals = [split_indices(names, s, "vinyals", OMNIGLOT) for s in og.SPLITS]
    assert [len(i) for i in vinyals] == [1028, 172, 423]
    assert len(np.unique(np.concatenate(vinyals))) == 1623
    background = [split_indices(names, s, "background") for s in og.SPLITS]
    assert [len(i) for i in background] == [964, 0, 659]
    maml = [split_indices(names, s, "maml") for s in og.SPLITS]
    assert [len(i) for i in maml] == [1200, 0, 423]
    assert len(np.unique(np.concatenate(maml))) == 1623
    np.testing.assert_array_equal(maml[0], np.random.default_rng(1).permutation(1623)[:1200])
    with pytest.raises(ValueError, match="no 'val' characters"):
        omniglot_tasks(OMNIGLOT, "val", 5, 1, 1, split_scheme="maml")


@needs_omniglot
def test_omniglot_rotations():
    base = omniglot_tasks(OMNIGLOT, "test", 5, 1, 1, rotations=False)
    rotated = omniglot_tasks(OMNIGLOT, "test", 5, 1, 1, rotations=True)
    n = base.num_classes
    assert n == 423 and rotated.num_classes == 4 * n
    for k in range(4):
        expected = torch.rot90(base.images, k, dims=(-2, -1))
        assert torch.equal(rotated.images[k * n : (k + 1) * n], expected)
    assert omniglot_tasks(OMNIGLOT, "train", 5, 1, 1).num_classes == 4 * 1028  # default: train
    assert omniglot_tasks(OMNIGLOT, "val", 5, 1, 1).num_classes == 172


def test_missing_root_says_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot(tmp_path / "nowhere")
    message = str(err.value)
    for expected in (
        "omniglot_28x28.npz",
        "data.hdf5",
        "images_background.zip",
        "images_evaluation.zip",
    ):
        assert expected in message
    assert "download=True" in message and "--download" in message


@needs_omniglot
def test_vinyals_without_json_names_the_files(tmp_path):
    shutil.copy(OMNIGLOT / "omniglot_28x28.npz", tmp_path)
    with pytest.raises(FileNotFoundError, match="vinyals_train_labels.json"):
        omniglot_tasks(tmp_path, "train", 5, 1, 1)
    assert (
        omniglot_tasks(tmp_path, "train", 5, 1, 1, split_scheme="background").num_classes == 4 * 964
    )


def test_corrupt_zip(tmp_path):
    for s in omniglot_files.SETS:
        (tmp_path / f"{s}.zip").write_bytes(b"not a zip at all" * 100)
    with pytest.raises(CorruptDataError, match="images_background.zip"):
        load_omniglot(tmp_path)


@needs_omniglot
def test_incomplete_zip(tmp_path):
    for s in omniglot_files.SETS:
        with (
            zipfile.ZipFile(OMNIGLOT / f"{s}.zip") as src,
            zipfile.ZipFile(tmp_path / f"{s}.zip", "w") as dst,
        ):
            for m in [m for m in src.namelist() if m.endswith(".png")][:45]:
                dst.writestr(m, src.read(m))
    with pytest.raises(CorruptDataError, match="characters in images_background, expected 964"):
        load_omniglot(tmp_path, cache=False)


@needs_omniglot
def test_truncated_npz_and_hdf5(tmp_path):
    data = (OMNIGLOT / "omniglot_28x28.npz").read_bytes()
    (tmp_path / "omniglot_28x28.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match="omniglot_28x28.npz"):
        load_omniglot(tmp_path)
    (tmp_path / "omniglot").mkdir()
    with open(OMNIGLOT / "torchmeta" / "omniglot" / "data.hdf5", "rb") as f:
        (tmp_path / "omniglot" / "data.hdf5").write_bytes(f.read(1 << 20))
    with pytest.raises(CorruptDataError, match="data.hdf5"):
        load_omniglot(tmp_path, "hdf5", cache=False)


def test_download_checks_md5_and_writes_atomically(tmp_path):
    src = tmp_path / "src.zip"
    src.write_bytes(b"payload" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CorruptDataError, match="md5"):
        omniglot_files.download_file(src.as_uri(), out / "a.zip", "0" * 32)
    assert list(out.iterdir()) == []  # no partial file left behind
    omniglot_files.download_file(src.as_uri(), out / "a.zip", md5)
    assert [p.name for p in out.iterdir()] == ["a.zip"] and (
        out / "a.zip"
    ).read_bytes() == src.read_bytes()


def write_npz(path, images: np.ndarray) -> list[str]:
    """A tiny Omniglot npz of ``len(images) // 20`` characters; returns their names."""
    names = [f"images_background/Alpha/character{i:02d}" for i in range(len(images) // 20)]
    np.savez(
        path,
        images=images,
        character=np.repeat(np.arange(len(names)), 20),
        drawer=np.tile(np.arange(1, 21), len(names)),
        character_names=np.array(names),
    )
    return names


def test_npz_of_floats_in_0_255_is_refused_and_in_0_1_scaled(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 28, 28)).astype(np.uint8)
    for folder, images in (("uint8", pixels), ("unit", pixels / 255.0)):
        (tmp_path / folder).mkdir()
        names = write_npz(tmp_path / folder / omniglot_files.NPZ_NAME, images)
    uint8 = load_omniglot(tmp_path / "uint8", characters=names)
    unit = load_omniglot(tmp_path / "unit", characters=names)
    assert unit.images.dtype == np.uint8
    np.testing.assert_array_equal(unit.images, uint8.images)
    for name, images in (
        ("float64 with values in [0, 255]", pixels.astype(np.float64)),
        ("float32 with values in [nan, nan]", np.full((40, 28, 28), np.nan, np.float32)),
        ("int64", pixels.astype(np.int64)),
    ):
        (tmp_path / name).mkdir()
        write_npz(tmp_path / name / omniglot_files.NPZ_NAME, images)
        with pytest.raises(CorruptDataError, match=re.escape(f"the images are {name}; expected")):
            load_omniglot(tmp_path / name, characters=names)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side,warnings_are_errors", [(20000, False), (10000, True)])
def test_decompression_bomb_png_is_a_corrupt_member(tmp_path, side, warnings_are_errors):
    """PIL refuses 20000^2 pixels (DecompressionBombError) and warns at 10000^2, which is an
    error where warnings are."""
    drawing = io.BytesIO()
    Image.new("1", (105, 105), 1).save(drawing, "PNG")
    characters = {s: f"{s}/Alpha/character01" for s in omniglot_files.SETS}
    for s, character in characters.items():
        with zipfile.ZipFile(tmp_path / f"{s}.zip", "w") as z:
            for d in range(1, 21):
                bomb = s == "images_background" and d == 20
                png = png_claiming(side, side) if bomb else drawing.getvalue()
                z.writestr(f"{character}/0001_{d:02d}.png", png)
    with warnings.catch_warnings():
        if warnings_are_errors:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(CorruptDataError, match="cannot decode .*0001_20.png"):
            load_omniglot(tmp_path, characters=[characters["images_background"]], cache=False)
