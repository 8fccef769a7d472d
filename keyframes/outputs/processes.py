"""More than one process or GPU for one run or one sweep.

- `accelerate launch --num_processes N -m keyframes.run ...`: N processes share one run. The
  pipeline batches are dealt out in turn (batch k to process k mod N), so every batch holds
  the same images as in a single-process run: with seeds per image, the pixels are the same.
  Each process writes its images and its own manifest part; the main process merges the parts
  into manifest.json and alone talks to MLflow.
- Sweeps with several jobs at once on one machine (hydra/launcher=local_gpus): each job
  process claims a GPU of its own with a lock file in the sweep directory and keeps it for
  its lifetime (the cached pipeline lives on that GPU).

Imports neither Hydra nor MLflow; accelerate only when launched by it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("keyframes")


def part_name(index: int | str) -> str:
    """The manifest part a process writes while the run goes on."""
    return f"manifest.process-{index}.json"


PART_GLOB = part_name("*")


def manifest_paths(run_dir: Path) -> list[Path]:
    """manifest.json, then the parts of processes that stopped before they were merged."""
    return [run_dir / "manifest.json", *sorted(run_dir.glob(PART_GLOB))]


@dataclass(frozen=True)
class Processes:
    index: int = 0  # this process
    count: int = 1  # processes sharing the run
    state: Any = None  # accelerate's PartialState when count > 1

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Until every process gets here."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def from_main(self, value: T) -> T:
        """The main process's value, in every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def part_name(self) -> str:
        return part_name(self.index)


def launched_processes(device: str) -> Processes:
    """This process's place in an `accelerate launch` (or torchrun) group; one process
    otherwise. device is the run's `device` setting: CPU processes talk over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)  # "cuda" now means this process's GPU
    if not state.is_main_process:  # the main process reports for the run; others warn only
        log.setLevel(logging.WARNING)
    return Processes(state.process_index, state.num_processes, state)


_claimed: tuple[int, Any] | None = None  # (gpu, open lock file) held for the process lifetime


def claim_gpu(folder: Path) -> int | None:
    """A sweep job process on a machine with several GPUs: the first GPU no other job process
    holds (a lock file per GPU in `folder`), kept until this process ends. None with fewer
    than two GPUs."""
    global _claimed
    import torch

    if _claimed is not None:
        return _claimed[0]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in range(count):
            lock = open(folder / f".gpu-{gpu}.lock", "w")  # noqa: SIM115 - held on purpose
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            torch.cuda.set_device(gpu)
            _claimed = (gpu, lock)
            log.info("sweep job process %d runs on GPU %d", os.getpid(), gpu)
            return gpu
        time.sleep(1)  # more job processes than GPUs: wait for one to end
