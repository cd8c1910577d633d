"""Checkpoints: a run saved and resumed exactly, the best one kept, a trained model loaded from its file.

A training checkpoint (``last.pt``, ``best.pt``) holds everything a resume needs: the model,
optimizer, scheduler and grad-scaler states, the step, the history, every RNG state, and the
configuration that wrote it (a resume compares it field by field, ``config_mismatch``). Every
checkpoint also holds the model's ``ModelConfig`` as plain data (``model_config``), so
``load_model(path)`` rebuilds the exact network from the file alone, refiner included.

Safety: ``torch.load`` runs arbitrary code hidden in a pickle unless ``weights_only=True``. Ours
stores only tensors and plain Python data (RNG states converted to tensors and lists), so every
load here is ``weights_only=True``: a crafted ``last.pt`` is refused before any of its code runs,
and a truncated or corrupt file is a ``CheckpointError`` naming the file, never a deep traceback.
Writes are atomic (``utils.atomic_write``): a crash mid-write leaves the old checkpoint whole.

Public names: ``FORMAT``, ``CheckpointError``, ``rng_state``, ``set_rng_state``, ``save_checkpoint``,
``read_checkpoint``, ``load_checkpoint``, ``resume``, ``config_mismatch``, ``is_best``, ``save_model``, ``load_model``.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from course_lib import distributed, model as model_lib, utils
from course_lib.config import ModelConfig

FORMAT = "course_lib checkpoint 1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe, or from another configuration."""


def rng_state() -> dict:
    """Every RNG state as tensors and plain data (``weights_only`` loads accept nothing else)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return dataclasses.asdict(config) if isinstance(config, ModelConfig) else None


def save_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler, step: int,
                    history: dict, extra: dict | None = None) -> None:
    """Write everything a resume needs, atomically. ``extra`` adds entries (``train.fit``: the grad
    scaler, the configuration, each rank's RNG state, ``info`` such as the class names)."""
    state = {"format": FORMAT, "model_config": _model_config(model), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "history": history, "rng": rng_state(), **(extra or {})}
    utils.atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents, loaded safely (``weights_only=True``); ``CheckpointError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_refusal(path, str(err))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (truncated or corrupt?): "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a course_lib checkpoint (expected format {FORMAT!r})")
    return state


def _refusal(path: Path, reason: str) -> str:
    """One line for torch's ``weights_only`` refusal: the Python object the file asks for, without
    torch's advice to reload with ``weights_only=False`` (which would run that object's code)."""
    asked = re.search(r"GLOBAL ([\w.]+)", reason)
    if asked:
        return (f"checkpoint {str(path)!r} refused: it asks to load the Python object {asked.group(1)}, and "
                "unpickling it could run code (a course_lib checkpoint holds only tensors and plain data)")
    return f"checkpoint {str(path)!r} cannot be read: not a PyTorch checkpoint (corrupt, or another format)"


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler, RNG states) from ``path``; returns the checkpoint dict.

    Under DDP each rank restores its own RNG state (when the checkpoint has one per rank)."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or []
    set_rng_state(per_rank[distributed.rank()] if len(per_rank) == distributed.world_size() else state["rng"])
    return state


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                    else {prefix + key: list(value) if isinstance(value, tuple) else value})
    return flat


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """The fields (``"model.backbone"``, ``"fit.lr"``, ...) whose values differ, as readable lines."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key}: checkpoint {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def resume(path: str | Path, model: nn.Module, optimizer, scheduler, scaler, config_record: dict) -> tuple[dict, int]:
    """Continue a run from ``path``: ``(history, step)``; refuses a checkpoint of another configuration."""
    state = read_checkpoint(path)
    if "config" in state and (diff := config_mismatch(state["config"], config_record)):
        raise CheckpointError(f"checkpoint {Path(path).name!r} was written by another configuration; differing "
                              f"fields: {'; '.join(diff)}. Resume with its settings, or start a new run in another folder.")
    state = load_checkpoint(path, model, optimizer, scheduler)
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["step"]


def is_best(evaluations: list[dict]) -> bool:
    """True when the last evaluation is at least as good as every earlier one: mask AP when the
    model predicts masks, else box AP (the metric the paper reports for each task)."""
    scores = [e.get("segm", e["bbox"])["AP"] for e in evaluations]
    return bool(scores) and scores[-1] >= max(scores)


def save_model(path: str | Path, model: nn.Module, **info) -> None:
    """Save a trained model alone (no optimizer): its weights, its ``ModelConfig`` and ``info``
    (plain data: class names, training image size, the mode that trained it...), atomically."""
    config = _model_config(model)
    if config is None:
        raise ValueError(f"save_model needs a course_lib model with a ModelConfig, got {type(model).__name__}")
    state = {"format": FORMAT, "model_config": config, "model": model.state_dict(), "info": info}
    utils.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[model_lib.MaskRCNN, dict]:
    """``(model in eval mode, info)`` from any course checkpoint (``save_model``'s or a run's
    ``last.pt``/``best.pt``): the network is rebuilt from the ``ModelConfig`` stored in the file."""
    state = read_checkpoint(path)
    if not state.get("model_config"):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no model_config, so the network cannot be rebuilt")
    try:
        config = ModelConfig.from_dict(state["model_config"])
        net = model_lib.MaskRCNN(config)
        net.load_state_dict(state["model"])
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: its weights do not rebuild a model: {err}") from None
    info = {**state.get("info", {}), **({"step": state["step"]} if "step" in state else {})}
    return net.to(device).eval(), info
