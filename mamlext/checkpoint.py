"""Checkpoints written atomically: an interrupted write never destroys the last good one."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, flush it, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors, numbers, strings and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise CheckpointError(
                f"{path} holds code or Python objects ({refused.group(1)}) that mamlext will "
                f"not load: unpickling them could run arbitrary code, so only tensors, numbers, "
                f"strings and containers are read (a checkpoint of mamlext train holds nothing "
                f"else)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: "
            f"{_reason(error)[:120]})"
        ) from None
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(f"{path} is not a mamlext checkpoint")
    return state


def _reason(error: Exception) -> str:
    """The line of ``error`` that says what is wrong (torch.load's weights-only errors begin
    with a generic paragraph and name the problem after "WeightsUnpickler error:")."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
