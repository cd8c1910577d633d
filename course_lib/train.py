"""Training: ``fit`` runs SGD on a detection data set with warm-up, decay, clipping and checkpoints.

The recipe is Mask R-CNN's (He et al. 2017, §3.1: SGD, momentum 0.9, weight decay 1e-4, linear
warm-up as in Goyal et al. 2017) shrunk to a CPU: few steps, a cosine or one-cycle decay instead
of step drops. A run is exactly reproducible and resumable: each step's batch is a function of
(seed, step) only, and a checkpoint holds the model, optimizer, scheduler, step, history and every
RNG state, so "train 2N steps" equals "train N, stop, resume, train N" bit for bit.

The same ``fit`` runs chapter 10 on a GPU: mixed precision (bf16, or fp16 with a grad scaler),
``channels_last``, DataLoader ``workers``, ``torch.compile``, DDP under torchrun (``distributed``),
a JSON-lines metrics file, best and last checkpoints, and a resume that refuses a checkpoint of
another configuration. ``python -m course_lib.train`` is its command line (``train_cli``).

Public names: ``fit``, ``lr_factor``, ``batch_indices``, ``StepBatchSampler``, ``amp_dtype``,
``save_checkpoint``, ``load_checkpoint``, ``config_mismatch``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib import data, distributed, evaluate, utils

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


class StepBatchSampler(torch.utils.data.Sampler):
    """The batches of steps ``start .. stop - 1`` as ``batch_indices`` gives them (this rank's shard).

    As a DataLoader's ``batch_sampler`` it makes the workers prepare exactly the plain loop's
    batches, in order: workers, a resume or several processes never change what a step trains
    on. It spans the run, so workers start once (``persistent_workers`` for an epoch loop)."""

    def __init__(self, num_images: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield distributed.shard(batch_indices(step, self.num_images, self.batch_size, self.seed),
                                    self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a mixed-precision run, or None for plain fp32 (amp off, or a CPU).

    bf16 where the GPU supports it (Ampere and later): fp32's exponent range, so gradients never
    underflow and need no loss scaling. Older GPUs get fp16, whose small range needs
    ``torch.amp.GradScaler`` (Micikevicius et al. 2018)."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
                    history: dict, extra: dict | None = None) -> None:
    """Write everything a resume needs, atomically: a temp file in the same folder, then
    ``os.replace`` (atomic on POSIX), so a crash mid-write never leaves a truncated checkpoint.
    ``extra`` adds entries (``fit``: the grad scaler, the configuration, each rank's RNG state)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "history": history,
             "rng": _rng_state(), **(extra or {})}
    utils.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler, RNG states) from ``path``; returns the checkpoint dict.

    Under DDP each rank restores its own RNG state (when the checkpoint has one per rank)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or []
    _set_rng_state(per_rank[distributed.rank()] if len(per_rank) == distributed.world_size() else state["rng"])
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


def _resume(path: Path, model, optimizer, scheduler, scaler, config_record: dict) -> tuple[dict, int]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "config" in state and (diff := config_mismatch(state["config"], config_record)):
        raise ValueError(f"checkpoint {path.name!r} was written by another configuration; differing fields: "
                         f"{'; '.join(diff)}. Resume with its settings, or start a new run in another folder.")
    state = load_checkpoint(path, model, optimizer, scheduler)
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["step"]


def _make_optimizer(model: nn.Module, lr: float, steps: int, warmup: int, schedule: str):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup, schedule))
    return optimizer, scheduler


def _check_finite(step: int, losses: dict, device: torch.device) -> None:
    """Stop, on every rank at once, when a loss is NaN or infinite, naming the step and the loss."""
    bad = {name: value.item() for name, value in losses.items() if not torch.isfinite(value)}
    if distributed.any_across_ranks(bool(bad), device):
        where = ", ".join(f"{name} = {value}" for name, value in bad.items()) or "on another rank"
        raise FloatingPointError(f"step {step}: loss went bad: {where} (all: "
                                 f"{ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                                 "try a lower lr, a longer warm-up or grad_clip")


def _train_step(net, images, targets, device, optimizer, scheduler, grad_clip, dtype, scaler,
                step: int) -> dict:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        losses = net(images, targets)
    loss = sum(losses.values())
    _check_finite(step, losses, device)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()      # a disabled scaler (all but fp16) passes everything through
    scaler.unscale_(optimizer)         # clip the true gradients, not the scaled ones
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)             # skipped when fp16 gradients overflowed; S is then halved
    scaler.update()
    scheduler.step()
    values = distributed.mean_across_ranks(torch.stack([v.detach().float() for v in (loss, *losses.values())]))
    values = values.tolist()                                                                  # 1 + L floats
    return {"loss": values[0], **dict(zip(losses, values[1:])), "lr": lr}


def _wrap(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """DDP under torchrun (gradients averaged in ``backward``), then ``torch.compile`` if asked."""
    net = model
    if distributed.world_size() > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if compile_model else net


def _write_metrics(path: str | Path | None, history: dict) -> None:
    """Start the JSONL metrics file from ``history`` (empty for a new run; a resumed run drops
    lines written after its checkpoint, so the file always matches the restored history)."""
    if path is None or not distributed.is_main():
        return
    Path(path).write_text("")
    records = [("train", r) for r in history["train"]] + [("eval", r) for r in history["eval"]]
    for kind, record in sorted(records, key=lambda kr: (kr[1]["step"], kr[0] == "eval")):
        _log(path, kind, record)


def _loader(dataset, sampler: StepBatchSampler, workers: int, device: torch.device, seed: int):
    """A DataLoader over ``sampler``'s batches; its own generator, so creating it draws nothing
    from the global RNG (a resumed run would otherwise drift from an uninterrupted one)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=data.collate_fn, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


def _log(path: str | Path | None, kind: str, record: dict) -> None:
    if path is not None:  # rank 0 only (append_jsonl)
        distributed.append_jsonl(path, {"kind": kind, **record})


def _after_step(done: int, run: dict, model, optimizer, scheduler, scaler, history: dict) -> None:
    """Evaluate (rank 0), then write the last checkpoint when due and the best one when the
    evaluation beat every earlier one (mask AP when the model predicts masks, else box AP)."""
    evaluated = run["val_dataset"] is not None and run["eval_every"] and (
        done % run["eval_every"] == 0 or done == run["steps"])
    if evaluated:
        if distributed.is_main():
            metrics = evaluate.coco_evaluate(model, run["val_dataset"], run["batch_size"], run["device"])
            history["eval"].append({"step": done, **metrics})
            _log(run["metrics_path"], "eval", history["eval"][-1])
        distributed.barrier()
    due = done in (run["steps"], run["stop_at"]) or (run["checkpoint_every"] and done % run["checkpoint_every"] == 0)
    save_last, may_save_best = run["checkpoint_path"] is not None and due, run["best_path"] is not None and evaluated
    if not (save_last or may_save_best):
        return
    extra = {"scaler": scaler.state_dict(), "config": run["config"],
             "rng_per_rank": distributed.gather_objects(_rng_state())}   # a collective: all ranks
    if not distributed.is_main():
        return
    if save_last:
        save_checkpoint(run["checkpoint_path"], model, optimizer, scheduler, done, history, extra)
    scores = [e.get("segm", e["bbox"])["AP"] for e in history["eval"]]
    if may_save_best and scores[-1] >= max(scores):
        save_checkpoint(run["best_path"], model, optimizer, scheduler, done, history, extra)


def fit(model: nn.Module, dataset, steps: int, batch_size: int = 8, lr: float = 0.02,
        warmup_steps: int = 50, schedule: str = "cosine", grad_clip: float | None = 10.0,
        val_dataset=None, eval_every: int = 0, checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, device: str | torch.device | None = None,
        seed: int = 0, amp: bool = False, progress: bool = True, stop_at: int | None = None,
        channels_last: bool = False, workers: int = 0, compile_model: bool = False,
        metrics_path: str | Path | None = None, best_checkpoint_path: str | Path | None = None,
        run_settings: dict | None = None) -> dict:
    """Train ``model`` for ``steps`` SGD steps; returns the history.

    Args:
        dataset: map-style, ``ds[i] -> (image Tensor[3, H, W], target dict)``.
        steps: total steps of the run (a resumed run continues up to the same total).
        batch_size: images per step over all processes (each of N DDP processes takes 1/N).
        lr, warmup_steps, schedule: peak learning rate and its shape (see ``lr_factor``).
        grad_clip: max global gradient norm (None: no clipping); guards early spikes.
        val_dataset, eval_every: every ``eval_every`` steps (and at the end) run
            ``evaluate.coco_evaluate`` on ``val_dataset``.
        checkpoint_path, checkpoint_every: write a checkpoint every N steps and at the end.
        resume: continue from ``checkpoint_path`` when it exists (same model, data and arguments;
            a checkpoint from another configuration raises ``ValueError`` naming the fields).
        amp, channels_last, workers, compile_model: speed switches: mixed precision on CUDA
            (``amp_dtype``), NHWC layout, DataLoader processes, ``torch.compile``.
        stop_at: leave after this step (with a checkpoint) as if interrupted; ``resume`` goes on.
        metrics_path: JSON lines, ``{"kind": "train", ...}`` per step, ``{"kind": "eval", ...}`` per evaluation.
        best_checkpoint_path: also keep the checkpoint of the best evaluation (mask AP, else box AP).
        run_settings: the caller's settings (data, sizes), stored and compared on resume.
    Returns:
        ``{"train": [per step {"step", "lr", "loss", "loss_*", "time", "images_per_s"}], "eval": [{"step", "bbox": {...}, ...}]}``
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer, scheduler = _make_optimizer(model, lr, steps, warmup_steps, schedule)
    dtype = amp_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    model_config = getattr(model, "config", None)
    config = {"model": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else {},
              "run": dict(run_settings or {}),
              "fit": dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                          schedule=schedule, grad_clip=grad_clip, seed=seed)}
    run = dict(val_dataset=val_dataset, eval_every=eval_every, device=device, steps=steps, stop_at=stop_at,
               batch_size=batch_size, checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path,
               best_path=best_checkpoint_path, metrics_path=metrics_path, config=config)
    history, start = {"train": [], "eval": []}, 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        history, start = _resume(Path(checkpoint_path), model, optimizer, scheduler, scaler, config)
    _write_metrics(metrics_path, history)
    net = _wrap(model, device, compile_model)
    stop = steps if stop_at is None else min(stop_at, steps)
    loader = _loader(dataset, StepBatchSampler(len(dataset), batch_size, seed, start, stop, distributed.rank(),
                                               distributed.world_size()), workers, device, seed)
    bar = tqdm(total=steps, initial=start, desc="train", disable=not progress or not distributed.is_main())
    model.train()
    tick = time.perf_counter()
    for step, (images, targets) in zip(range(start, stop), loader):
        record = _train_step(net, images, targets, device, optimizer, scheduler, grad_clip, dtype, scaler, step + 1)
        seconds = time.perf_counter() - tick
        history["train"].append({"step": step + 1, **record, "time": seconds, "images_per_s": batch_size / seconds})
        _log(metrics_path, "train", history["train"][-1])
        bar.update(1)
        bar.set_postfix({"img/s": f"{batch_size / seconds:.1f}",
                         **{k.replace("loss_", ""): f"{v:.3f}" for k, v in record.items() if "loss" in k}})
        _after_step(step + 1, run, model, optimizer, scheduler, scaler, history)
        tick = time.perf_counter()
    bar.close()
    model.eval()
    return history


if __name__ == "__main__":
    from course_lib.train_cli import main
    main()
