"""The output folder of a run: writable, and used by one ``mamlext train`` at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "train.lock"


class OutFolderInUse(RuntimeError):
    """Another ``mamlext train`` holds the output folder."""


@contextlib.contextmanager
def exclusive_use(out: Path) -> Iterator[None]:
    """Hold a lock on ``out`` (``fcntl.flock`` on ``out/train.lock``) while the block runs.

    Raises OutFolderInUse where another process holds it. The kernel releases the lock when
    its process ends, however it ends, so a crashed run never leaves the folder locked. The
    file stays, naming its last holder (removing it would let two runs lock two files).
    """
    check_writable(out)
    with open(out / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process"
            raise OutFolderInUse(
                f"{out} is in use by another mamlext train ({holder}); wait for it to end, "
                f"or choose another --out"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"cannot write to the output folder {out}: {error.strerror}"
        ) from None
