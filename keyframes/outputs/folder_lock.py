"""One run at a time in a run folder: two runs writing one folder would each log an MLflow run
of it and overwrite each other's manifest. The lock is an flock on a hidden file in the folder,
so it ends with its process, also on a SIGKILL; the file stays (deleting it would let a third
run lock a new file while a second still waits on the old one)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from keyframes.errors import FolderInUse

LOCK_NAME = ".keyframes.lock"


@contextlib.contextmanager
def hold_folder(run_dir: Path):
    """The run folder for this process until the block ends; FolderInUse (exit 2, naming the
    holder) when another run has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise FolderInUse(
                f"{run_dir} is in use by another keyframes run ({holder}). Wait for it to end "
                "(then run this again to continue it), or drop hydra.run.dir for a new folder."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        lock.flush()
        yield


def in_use(run_dir: Path) -> bool:
    """Another process holds the folder now."""
    try:
        with open(run_dir / LOCK_NAME) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
