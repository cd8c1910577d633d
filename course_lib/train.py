"""Training: ``fit`` runs SGD on a detection data set with warm-up, decay, clipping and checkpoints.

The recipe is Mask R-CNN's (He et al. 2017, §3.1: SGD, momentum 0.9, weight decay 1e-4, linear
warm-up as in Goyal et al. 2017) shrunk to a CPU: few steps, a cosine or one-cycle decay instead
of step drops. A run is exactly reproducible and resumable: each step's batch is a function of
(seed, step) only, and a checkpoint holds the model, optimizer, scheduler, step, history and every
RNG state, so "train 2N steps" equals "train N, stop, resume, train N" bit for bit.

Public names: ``fit``, ``lr_factor``, ``batch_indices``, ``save_checkpoint``, ``load_checkpoint``.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib import data, evaluate

SCHEDULES = ("cosine", "onecycle", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then the decay.

    Warm-up rises linearly from 0.001 ("cosine", Goyal et al.) or 1/25 ("onecycle", Smith's
    one-cycle policy, as ``torch.optim.lr_scheduler.OneCycleLR``'s start) to 1 over
    ``warmup_steps``; then "cosine" and "onecycle" fall along a half cosine to 0 at
    ``total_steps``, "constant" stays at 1. Warm-up matters: a from-scratch detector at full lr
    in step 1 sees huge box-regression gradients and diverges.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        start = 0.001 if schedule != "onecycle" else 1 / 25
        return start + (1 - start) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> list[int]:
    """The data set indices of ``step``'s batch: a fresh permutation per epoch from (seed, epoch).

    Drops the last partial batch of each epoch. A pure function of its arguments, so a resumed
    run needs no sampler state to continue the exact data order.
    """
    per_epoch = num_images // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({num_images} images)")
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler, step: int,
                    history: dict) -> None:
    """Write everything a resume needs, atomically: a temp file in the same folder, then
    ``os.replace`` (atomic on POSIX), so a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "history": history,
             "rng": _rng_state()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler, RNG states) from ``path``; returns the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def _make_optimizer(model: nn.Module, lr: float, steps: int, warmup: int, schedule: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup, schedule))
    return optimizer, scheduler


def _train_step(model, dataset, indices, device, optimizer, scheduler, grad_clip, amp) -> dict:
    images, targets = data.collate_fn([dataset[i] for i in indices])
    images = [img.to(device) for img in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}, "lr": lr}


def fit(model: nn.Module, dataset, steps: int, batch_size: int = 8, lr: float = 0.02,
        warmup_steps: int = 50, schedule: str = "cosine", grad_clip: float | None = 10.0,
        val_dataset=None, eval_every: int = 0, checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, device: str | torch.device | None = None,
        seed: int = 0, amp: bool = False, progress: bool = True, stop_at: int | None = None) -> dict:
    """Train ``model`` for ``steps`` SGD steps; returns the history.

    Args:
        dataset: map-style, ``ds[i] -> (image Tensor[3, H, W], target dict)``.
        steps: total steps of the run (a resumed run continues up to the same total).
        lr, warmup_steps, schedule: peak learning rate and its shape (see ``lr_factor``).
        grad_clip: max global gradient norm (None: no clipping); guards early spikes.
        val_dataset, eval_every: every ``eval_every`` steps (and at the end) run
            ``evaluate.coco_evaluate`` on ``val_dataset``.
        checkpoint_path, checkpoint_every: write a checkpoint every N steps and at the end.
        resume: continue from ``checkpoint_path`` when it exists (same model, data and arguments).
        amp: mixed precision (CUDA only).
        stop_at: leave after this step (with a checkpoint) as if interrupted; ``resume`` goes on.
    Returns:
        ``{"train": [per step {"step", "lr", "loss", "loss_*", "time"}], "eval": [{"step", "bbox": {...}, ...}]}``
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    optimizer, scheduler = _make_optimizer(model, lr, steps, warmup_steps, schedule)
    history, start = {"train": [], "eval": []}, 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, model, optimizer, scheduler)
        history, start = state["history"], state["step"]
    bar = tqdm(range(start, steps), desc="train", disable=not progress, initial=start, total=steps)
    for step in bar:
        model.train()
        tick = time.perf_counter()
        indices = batch_indices(step, len(dataset), batch_size, seed)
        record = _train_step(model, dataset, indices, device, optimizer, scheduler, grad_clip, amp)
        history["train"].append({"step": step + 1, **record, "time": time.perf_counter() - tick})
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in record.items() if "loss" in k})
        done = step + 1
        if val_dataset is not None and eval_every and (done % eval_every == 0 or done == steps):
            metrics = evaluate.coco_evaluate(model, val_dataset, batch_size=batch_size, device=device)
            history["eval"].append({"step": done, **metrics})
        last = done == steps or done == stop_at
        if checkpoint_path is not None and (last or (checkpoint_every and done % checkpoint_every == 0)):
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, done, history)
        if done == stop_at:
            break
    bar.close()
    model.eval()
    return history
