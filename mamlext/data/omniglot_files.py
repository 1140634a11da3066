"""Omniglot (Lake et al., 2015) from its files: one array of every character's drawings.

All sources give the same array: uint8 ``[characters, 20, 28, 28]``, **ink = 255 on a 0
background**, each 105x105 drawing inverted and then downscaled with Pillow's BILINEAR
``resize((28, 28))`` (what torchvision's ``Resize(28)`` does on a PIL image, and what
torchmeta's pipeline and ``omniglot_28x28.npz`` hold). Characters are ordered by their name
``"<images_background|images_evaluation>/<alphabet>/<characterNN>"`` (background first, 964 +
659 = 1623) and drawings by file name (drawer 01..20).

Sources under ``root``, tried in this order by ``source="auto"``:

- ``"npz"``: ``<root>/omniglot_28x28.npz`` (fastest, ~0.3 s); images uint8, or floats in
  [0, 1] (scaled to uint8); any other dtype or range is refused.
- ``"hdf5"``: torchmeta's ``<root>/omniglot/data.hdf5`` (``root`` is torchmeta's root; also
  found at ``<root>/torchmeta/omniglot/data.hdf5``).
- ``"zip"``: the public ``<root>/images_background.zip`` and ``<root>/images_evaluation.zip``
  (or the same folders extracted); ``download=True`` fetches them.

Decoding hdf5 or zip takes seconds, so the result is cached in ``omniglot_28x28_<source>.npz``
(in ``cache_dir``, by default next to the data; a read-only folder only gives a warning), keyed
by the source files' sizes and mtimes. Loaded arrays are also kept in memory per process.

Longer than 350 lines: the three readers, their checks of what they read, the download and
the decoded cache all serve one contract (the array above), and each is short.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
ZIP_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SETS = ("images_background", "images_evaluation")
SET_SIZES = {"images_background": 964, "images_evaluation": 659}
DRAWINGS = 20
SIZE = 28
NPZ_NAME = "omniglot_28x28.npz"
HDF5_DIRS = ("omniglot", "torchmeta/omniglot")
SOURCES = ("auto", "npz", "hdf5", "zip")


class CorruptDataError(RuntimeError):
    """A data file exists but is unreadable or incomplete (never loaded partially)."""


@dataclass(frozen=True)
class OmniglotData:
    """Decoded Omniglot.

    Attributes:
        images: uint8 ``[characters, 20, 28, 28]``, ink = 255, read-only (shared cache).
        names: ``"<set>/<alphabet>/<character>"`` of each row of ``images``.
        source: ``"npz"``, ``"hdf5"`` or ``"zip"``.
        path: the file (or, for zip, the folder) it was read from.
    """

    images: np.ndarray
    names: tuple[str, ...]
    source: str
    path: Path


# ---- decoding ----------------------------------------------------------------------------


def resize(drawing: np.ndarray) -> np.ndarray:
    """One ink-255 uint8 drawing ``[105, 105]`` -> ``[28, 28]`` (Pillow BILINEAR)."""
    return np.asarray(Image.fromarray(drawing).resize((SIZE, SIZE), Image.BILINEAR))


def decode_png(data: bytes) -> np.ndarray:
    """One original Omniglot PNG (black ink on white) -> uint8 ``[28, 28]``, ink = 255."""
    with Image.open(io.BytesIO(data)) as im:
        inverted = ImageOps.invert(im.convert("L"))
    return np.asarray(inverted.resize((SIZE, SIZE), Image.BILINEAR))


def corrupt_error(path: Path | str, problem: object) -> CorruptDataError:
    return CorruptDataError(
        f"{path}: {problem}. The file is corrupt or incomplete; delete it and fetch it again "
        f"(load_omniglot(..., download=True) / --download for the zips)."
    )


def _check_names(names: Sequence[str], where: Path) -> None:
    for s in SETS:
        n = sum(name.startswith(s + "/") for name in names)
        if n != SET_SIZES[s]:
            raise corrupt_error(where, f"{n} characters in {s}, expected {SET_SIZES[s]}")


def _select(names: list[str], characters: Sequence[str] | None, where: Path) -> list[str]:
    if characters is None:
        _check_names(names, where)
        return names
    missing = sorted(set(characters) - set(names))
    if missing:
        raise ValueError(f"characters not in {where}: {missing[:5]}{' ...' if missing[5:] else ''}")
    return list(characters)


def read_npz(path: Path, characters: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    try:
        with np.load(path) as z:
            images, char, drawer = z["images"], z["character"], z["drawer"]
            names = [str(n) for n in z["character_names"]]
    except (zipfile.BadZipFile, zlib.error, ValueError, KeyError, OSError, EOFError) as e:
        raise corrupt_error(path, f"not a complete Omniglot npz ({type(e).__name__}: {e})") from e
    images = _as_uint8(images, path)
    counts = np.bincount(char.astype(np.int64), minlength=len(names))
    if images.shape[1:] != (SIZE, SIZE) or len(char) != len(images) or (counts != DRAWINGS).any():
        raise corrupt_error(path, f"expected {DRAWINGS} images of {SIZE}x{SIZE} per character")
    images = images[np.lexsort((drawer, char))].reshape(len(names), DRAWINGS, SIZE, SIZE)
    chosen = _select(names, characters, path)
    if characters is not None:
        images = images[[names.index(c) for c in chosen]]
    return images, chosen


def _as_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """The npz's images as uint8 0..255: uint8 as is, floats in [0, 1] scaled (and rounded).

    Anything else (floats in [0, 255], other integers) is refused: scaled as it is, it
    would silently train on pixels outside [0, 1].
    """
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if low >= 0 and high <= 1:  # NaN fails both
            return np.rint(images * 255).astype(np.uint8)
        found = f"{images.dtype} with values in [{low:g}, {high:g}]"
    else:
        found = str(images.dtype)
    raise CorruptDataError(
        f"{path}: the images are {found}; expected uint8 (0..255, ink = 255) or floats in "
        f"[0, 1]. Convert the file, or delete it to use the zips or hdf5 instead."
    )


def read_hdf5(path: Path, characters: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            names = sorted(f"{s}/{a}/{c}" for s in SETS for a in f[s] for c in f[s][a])
            chosen = _select(names, characters, path)
            out = np.empty((len(chosen), DRAWINGS, SIZE, SIZE), np.uint8)
            for i, name in enumerate(chosen):
                raw = f[name][()]
                if raw.shape != (DRAWINGS, 105, 105) or raw.dtype != np.uint8:
                    raise corrupt_error(
                        path, f"{name} has {raw.dtype} {raw.shape}, not (20, 105, 105)"
                    )
                out[i] = [resize(d) for d in raw]
    except (OSError, KeyError) as e:
        raise corrupt_error(path, f"not a complete torchmeta Omniglot hdf5 ({e})") from e
    return out, chosen


def _read_file(base: Path, member: str) -> bytes:
    return (base / member).read_bytes()


def read_zips(
    paths: dict[str, Path], characters: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    files: dict[str, list[str]] = {}  # character -> member names
    readers: dict[str, Callable[[str], bytes]] = {}
    archives: list[zipfile.ZipFile] = []
    try:
        for s, p in paths.items():
            if p.is_dir():
                members = [q.relative_to(p.parent).as_posix() for q in p.rglob("*.png")]
                read = functools.partial(_read_file, p.parent)
            else:
                try:
                    archives.append(zipfile.ZipFile(p))
                except (zipfile.BadZipFile, OSError) as e:
                    raise corrupt_error(p, f"not a zip archive ({e})") from e
                members = [m for m in archives[-1].namelist() if m.endswith(".png")]
                read = archives[-1].read
            for m in members:
                if not m.startswith(s + "/") or m.count("/") != 3:
                    raise corrupt_error(
                        p, f"unexpected member {m!r}, expected {s}/<alphabet>/<char>/*.png"
                    )
                files.setdefault(m.rsplit("/", 1)[0], []).append(m)
                readers[m] = read
        chosen = _select(sorted(files), characters, Path(os.path.commonpath(list(paths.values()))))
        for name in chosen:
            if len(files[name]) != DRAWINGS:
                raise corrupt_error(
                    paths[name.split("/")[0]], f"{name} has {len(files[name])} drawings"
                )
        members = [m for name in chosen for m in sorted(files[name])]

        def decode(m: str) -> np.ndarray:
            try:
                return decode_png(readers[m](m))
            except (
                zipfile.BadZipFile,
                zlib.error,
                OSError,
                ValueError,
                Image.DecompressionBombError,  # a header claiming a huge image
                Image.DecompressionBombWarning,  # the same, where warnings are errors
            ) as e:
                raise corrupt_error(paths[m.split("/")[0]], f"cannot decode {m} ({e})") from e

        decoded = [decode(m) for m in members]
    finally:
        for a in archives:
            a.close()
    return np.stack(decoded).reshape(len(chosen), DRAWINGS, SIZE, SIZE), chosen


# ---- locating, downloading, caching ------------------------------------------------------


def _source_files(root: Path, source: str) -> tuple[Path, ...] | None:
    """The file(s) of one source under ``root`` (for zip: per set, a zip or a folder)."""
    if source == "npz":
        files = [root / NPZ_NAME] if (root / NPZ_NAME).is_file() else []
    elif source == "hdf5":
        files = [root / d / "data.hdf5" for d in HDF5_DIRS if (root / d / "data.hdf5").is_file()]
    else:
        options = [(root / f"{s}.zip", root / s) for s in SETS]
        files = [z if z.is_file() else d for z, d in options if z.is_file() or d.is_dir()]
        return tuple(files) if len(files) == len(SETS) else None
    return tuple(files[:1]) or None


def _not_found(root: Path, source: str) -> FileNotFoundError:
    expected = {
        "npz": f"  {root / NPZ_NAME}",
        "hdf5": f"  {root / 'omniglot' / 'data.hdf5'} (torchmeta layout; or "
        f"{root / 'torchmeta' / 'omniglot' / 'data.hdf5'})",
        "zip": f"  {root / 'images_background.zip'} and {root / 'images_evaluation.zip'} "
        "(or those folders extracted)",
    }
    lines = list(expected.values()) if source == "auto" else [expected[source]]
    return FileNotFoundError(
        f"Omniglot ({source} source) not found under {root}. Expected:\n"
        + "\n".join(lines)
        + f"\nPass download=True (command line: --download) to fetch images_background.zip and "
        f"images_evaluation.zip from {URL} into {root}."
    )


def download_file(url: str, dest: Path, md5: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise CorruptDataError(f"{url}: md5 {digest.hexdigest()} != expected {md5}")
        os.replace(tmp, dest)
    except urllib.error.URLError as e:
        raise OSError(f"cannot download {url} ({e}); fetch it by hand into {dest}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def download_omniglot(root: str | Path) -> dict[str, Path]:
    """Fetch the missing public zips into ``root`` (md5-checked, written atomically)."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for s in SETS:
        if not ((root / f"{s}.zip").is_file() or (root / s).is_dir()):
            download_file(f"{URL}{s}.zip", root / f"{s}.zip", ZIP_MD5[s])
    return dict(zip(SETS, _source_files(root, "zip") or ()))


def _stat_key(paths: Sequence[Path]) -> str:
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _cached_decode(
    source: str,
    paths: list[Path],
    cache_file: Path | None,
    read: Callable[[], tuple[np.ndarray, list[str]]],
) -> tuple[np.ndarray, list[str]]:
    key = _stat_key(paths)
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                if str(z["key"]) == key:
                    images, names = z["images"], [str(n) for n in z["names"]]
                    if images.shape == (len(names), DRAWINGS, SIZE, SIZE):
                        _check_names(names, cache_file)
                        return images, names
        except (
            zipfile.BadZipFile,
            zlib.error,
            ValueError,
            KeyError,
            OSError,
            EOFError,
            CorruptDataError,
        ):
            warnings.warn(f"ignoring unreadable cache {cache_file}; rebuilding it", stacklevel=3)
    images, names = read()
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_npz_atomic(cache_file, images=images, names=np.array(names), key=np.array(key))
        except OSError as e:
            warnings.warn(
                f"cannot write the Omniglot cache {cache_file} ({e}); the next load decodes "
                f"{source} again. Pass cache_dir= a writable folder.",
                stacklevel=3,
            )
    return images, names


@functools.lru_cache(maxsize=4)
def load_arrays(
    source: str,
    files: tuple[Path, ...],
    cache_dir: Path | None,
    cache: bool,
    characters: tuple[str, ...] | None,
    key: str,
) -> OmniglotData:
    del key  # part of the lru_cache key only: a changed file is read again
    if source == "npz":
        images, names = read_npz(files[0], characters)
    else:
        where = files[0].parent
        if source == "hdf5":
            read = functools.partial(read_hdf5, files[0], characters)
        else:
            read = functools.partial(read_zips, dict(zip(SETS, files)), characters)
        if characters is None and cache:
            cache_file = (cache_dir or where) / f"omniglot_28x28_{source}.npz"
            images, names = _cached_decode(source, list(files), cache_file, read)
        else:
            images, names = read()
    images.setflags(write=False)
    return OmniglotData(images, tuple(names), source, files[0] if source != "zip" else where)


def load_omniglot(
    root: str | Path,
    source: str = "auto",
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    characters: Sequence[str] | None = None,
) -> OmniglotData:
    """Load Omniglot as uint8 ``[characters, 20, 28, 28]`` (ink = 255) from ``root``.

    Args:
        root: folder holding one of the sources (see the module docstring).
        source: ``"auto"`` (npz, else hdf5, else zip), ``"npz"``, ``"hdf5"`` or ``"zip"``.
        download: fetch the public zips into ``root`` when the source is missing (auto/zip).
        cache_dir: where the decoded hdf5/zip array is cached (default: next to the data).
        cache: read/write that cache file at all.
        characters: only these names (``"<set>/<alphabet>/<character>"``), e.g. for a quick
            check; such partial loads are not cached on disk.

    Raises:
        FileNotFoundError: no source found; the message lists the files expected.
        CorruptDataError: a source file is unreadable or incomplete, or its images are not
            uint8 or floats in [0, 1].
    """
    root = Path(root).expanduser()
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    found = {s: _source_files(root, s) for s in ("npz", "hdf5", "zip")}
    chosen = next((s for s, f in found.items() if f), None) if source == "auto" else source
    files = found[chosen] if chosen is not None else None
    if files is None:
        if not (download and source in ("auto", "zip")):
            raise _not_found(root, source)
        download_omniglot(root)
        chosen, files = "zip", _source_files(root, "zip")
    assert chosen is not None and files is not None
    return load_arrays(
        chosen,
        tuple(f.resolve() for f in files),
        None if cache_dir is None else Path(cache_dir).expanduser().resolve(),
        cache,
        None if characters is None else tuple(characters),
        _stat_key(files),
    )
