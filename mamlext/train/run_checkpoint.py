"""A run's checkpoint (``checkpoint.pt`` of ``mamlext train``): written atomically, read
back only if it is whole, finite and of this run, and what resuming may change."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from mamlext.train.build import build_maml
from mamlext.train.config import TrainConfig, meta_lr_at

CHECKPOINT_ENTRIES = ("iteration", "config", "maml", "optimizer", "samplers", "torch_rng")
OPTIONAL_ENTRIES = ("seconds",)  # absent from checkpoints of mamlext before 2026-12-01


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


def load_run_checkpoint(path: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """Read a checkpoint of ``mamlext train`` and check that it is one, whole and finite.

    Returns:
        The checkpoint (as :func:`_state` writes it) and its run's config, resolved.

    Raises:
        CheckpointError: the file is unreadable, or the message names the entry that is
            missing, unknown, of the wrong shape or not finite.
    """
    state = load_checkpoint(path)

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable checkpoint of mamlext train: {problem}")

    missing = [k for k in CHECKPOINT_ENTRIES if k not in state]
    unknown = [k for k in state if k not in CHECKPOINT_ENTRIES + OPTIONAL_ENTRIES]
    if missing or unknown:
        raise refuse(f"entries missing {missing}, unknown {unknown}")
    saved = state["config"]
    if not isinstance(saved, dict):
        raise refuse(f"its config is a {type(saved).__name__}, not a dict")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in saved if k not in fields]  # older checkpoints may lack new fields
    if unknown:
        raise refuse(f"its config has settings this mamlext does not know: {unknown}")
    try:
        config = TrainConfig(**settings_of_earlier_runs(saved)).resolved()
        model = build_maml(config)
    except (TypeError, ValueError) as error:
        raise refuse(f"its config is invalid ({error})") from None
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise refuse(f"iteration {state['iteration']!r} is not a count of steps")
    weights = state["maml"]
    expected = model.state_dict()
    if not isinstance(weights, dict) or weights.keys() != expected.keys():
        found = list(weights) if isinstance(weights, dict) else type(weights).__name__
        raise refuse(f"its model holds {found}, expected {list(expected)}")
    for name, tensor in expected.items():
        found = weights[name]
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
            raise refuse(f"{name} is {shape}, expected {tuple(tensor.shape)} for this config")
        if found.is_floating_point() and not found.isfinite().all():
            raise refuse(f"{name} is not finite (the run diverged)")
    params = list(model.parameters())  # the optimizer's order
    try:
        adam = state["optimizer"]["state"]
        moments = [(i, s[k]) for i, s in adam.items() for k in ("exp_avg", "exp_avg_sq")]
        fits = all(m.shape == params[i].shape for i, m in moments)
    except (KeyError, TypeError, IndexError, AttributeError):
        fits = False
    if not fits:
        raise refuse("its optimizer state does not fit the model's parameters")
    if not isinstance(state["samplers"], list) or not isinstance(state["torch_rng"], torch.Tensor):
        raise refuse("its task stream or RNG state is not what mamlext train writes")
    seconds = state.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise refuse(f"its training time {seconds!r} is not a number of seconds >= 0")
    return state, config


def drop_metrics_after(path: Path, iteration: int) -> None:
    """Keep the records up to the checkpoint's iteration (an interrupted run wrote more)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the interruption
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def settings_of_earlier_runs(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings added since it was written set as its run had them.

    ``bn_query_row`` and ``schedule_epoch`` came with MAML++ as its authors compute it; a
    run without them had a query row of its own, schedules moving every iteration and (with
    ``algorithm="mamlpp"``) the MAML paper's strided Conv-4.
    """
    if "bn_query_row" in saved:
        return saved
    earlier = {"bn_query_row": "own", "schedule_epoch": 1}
    if saved.get("algorithm") == "mamlpp" and saved.get("model") is None:
        earlier["model"] = "mamlext.models:conv4"
    return {**saved, **earlier}


def check_same_run(before: TrainConfig, config: TrainConfig, iteration: int) -> None:
    """Refuse to resume with a non-resumable setting or an earlier schedule unlike the saved."""
    saved, current = dataclasses.asdict(before), dataclasses.asdict(config)
    fixed = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("resumable")]
    differ = {k: (saved[k], current[k]) for k in fixed if saved[k] != current[k]}
    changes = {0, *before.meta_lr_milestones, *config.meta_lr_milestones}
    if "cosine" in (before.meta_lr_schedule, config.meta_lr_schedule):
        changes = range(iteration)  # a cosine moves at every iteration
    if any(meta_lr_at(before, i) != meta_lr_at(config, i) for i in changes if i < iteration):
        differ["meta_lr schedule before iteration " + str(iteration)] = tuple(
            (c.meta_lr_schedule, list(c.meta_lr_milestones), c.meta_lr_gamma, c.meta_lr_min)
            for c in (before, config)
        )
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(
            f"--resume with different settings than the checkpoint's run ({details})"
        )
