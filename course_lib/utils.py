"""Small helpers every chapter uses: seeding, quick mode, the device, showing library source.

Public names: ``seed_everything``, ``quick_mode``, ``DEVICES``, ``DeviceError``, ``device``,
``machine_info``, ``workers_and_threads``, ``share_cores``, ``show_source``, ``repo_root``, ``generated_dir``, ``atomic_write``.
"""
from __future__ import annotations

import inspect
import os
import platform
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_TRUE = {"1", "true", "yes", "on"}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) so a rerun prints the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def quick_mode() -> bool:
    """True when ``COURSE_QUICK`` is set to 1/true/yes: CI's shrunken runs of every notebook."""
    return os.environ.get("COURSE_QUICK", "").strip().lower() in _TRUE


DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The device asked for is not there (CUDA without a GPU, a LOCAL_RANK without its GPU)."""


def device(requested: str = "auto", verbose: bool = True) -> torch.device:
    """The device to compute on: ``"auto"`` (CUDA when a GPU is visible, else the CPU), ``"cpu"``, ``"cuda"``.

    Under torchrun each process takes GPU ``LOCAL_RANK``. Asking for ``"cuda"`` on a machine
    without one is an error, not a silent fall-back to a run 50x slower. With ``verbose``, one
    line says which device and why.
    """
    if requested not in DEVICES:
        raise ValueError(f"device={requested!r}; expected one of {DEVICES}")
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise DeviceError("device='cuda' was asked for but no CUDA GPU is visible "
                          f"(torch {torch.__version__}, cuda build {torch.version.cuda}); "
                          "use --device cpu or --device auto")
    if requested == "cpu" or not has_gpu:
        dev = torch.device("cpu")
        reason = "asked for" if requested == "cpu" else "no CUDA GPU visible, so the CPU (every chapter but 10 is sized for it)"
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        reason = f"CUDA GPU found: {torch.cuda.get_device_name(local_rank)}"
    if verbose:
        print(f"device: {dev} ({reason}; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return dev


def machine_info(dev: torch.device | None = None) -> dict:
    """Where a run happened, recorded beside its results: CPU, cores, threads, GPU, versions."""
    gpu = torch.cuda.get_device_name(dev if dev is not None and dev.type == "cuda" else 0) \
        if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def workers_and_threads(cores: int | None = None, gpu: bool = False) -> tuple[int, int]:
    """DataLoader workers and PyTorch threads that share ``cores`` (default: this machine's) without
    oversubscribing them: ``workers + threads == cores`` (at least one thread).

    On a CPU run the main process computes the model with ``threads`` cores while ``workers``
    processes make the next batches. With 2 cores or fewer no core can be spared: a worker took one
    of the two the model needs (issue 15 measured 80 steps of the ``cpu`` preset on 2 cores: 38 s with
    1 worker, 33 s with 0), so the batches are made in the main process. From 3 cores a quarter of them (at
    least 1, at most 8) make data. With ``gpu`` the GPU does the model's arithmetic and the CPU
    mostly makes data: half the cores (at least 1, at most 8) are workers.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if cores < 1:
        raise ValueError(f"cores={cores}; expected at least 1")
    if gpu:
        workers = min(8, max(1, cores // 2)) if cores > 1 else 0
    else:
        workers = 0 if cores <= 2 else min(8, max(1, cores // 4))
    return workers, cores - workers


def share_cores(workers: int, processes: int = 1, cores: int | None = None) -> int:
    """Give PyTorch the cores ``processes`` training processes with ``workers`` DataLoader workers each
    leave free (at least one thread); returns that thread count. A worker computes with one thread."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, processes) - workers)
    torch.set_num_threads(threads)
    return threads


def show_source(obj) -> None:
    """Print the source of a library function or class, so a notebook shows the code it uses
    without pasting it (pasted code would drift from the library)."""
    print(inspect.getsource(obj))


def repo_root() -> Path:
    """The repository root (the folder holding ``course_lib/``)."""
    return Path(__file__).resolve().parent.parent


def generated_dir(*parts: str) -> Path:
    """A folder under ``data/generated/`` (git-ignored), created if missing."""
    path = repo_root().joinpath("data", "generated", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then ``os.replace`` it into place.

    The rename is atomic on POSIX, so a crash mid-write leaves the old file whole, never a
    truncated one (checkpoints, experiment results); a failed write leaves no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
