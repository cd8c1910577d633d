"""Small helpers every chapter uses: seeding, quick mode, the device, showing library source.

Public names: ``seed_everything``, ``quick_mode``, ``device``, ``show_source``, ``repo_root``,
``generated_dir``, ``atomic_write``.
"""
from __future__ import annotations

import inspect
import os
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


def device(verbose: bool = True) -> torch.device:
    """CUDA when a GPU is visible, else the CPU; with ``verbose``, one line says which and why."""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        reason = f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    else:
        dev = torch.device("cpu")
        reason = "no CUDA GPU visible, so the CPU (every chapter but 10 is sized for it)"
    if verbose:
        print(f"device: {dev} ({reason}; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return dev


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
