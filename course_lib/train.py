"""Training: ``fit`` runs SGD on a detection data set with warm-up, decay, clipping and checkpoints.

The recipe is Mask R-CNN's (He et al. 2017, §3.1: SGD, momentum 0.9, weight decay 1e-4, linear
warm-up as in Goyal et al. 2017) shrunk to a CPU: few steps, a cosine or one-cycle decay instead
of step drops. One frozen ``TrainConfig`` describes a run. A run is exactly reproducible and
resumable: each step's batch is a function of (seed, step) only, and a checkpoint
(``checkpoints``) holds the model, optimizer, scheduler, step, history and every RNG state, so
"train 2N steps" equals "train N, stop, resume, train N" bit for bit.

The same ``fit`` runs chapter 10 on a GPU: mixed precision (bf16, or fp16 with a grad scaler),
``channels_last``, DataLoader ``workers``, ``torch.compile``, DDP under torchrun (``distributed``),
a JSON-lines metrics file, best and last checkpoints, and a resume that refuses a checkpoint of
another configuration. It also trains chapter 09's refiner on a frozen detector
(``TrainConfig(stage="refiner")``). ``python -m course_lib.train`` is its command line (``train_cli``).

Public names: ``fit``, ``prepare_out``, ``lr_factor``, ``batch_indices``, ``StepBatchSampler``, ``amp_dtype``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib import checkpoints, data, distributed, evaluate, refinement
from course_lib.config import SCHEDULES, TrainConfig
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what ``fit`` writes into its ``out`` folder


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


def _make_optimizer(parameters, config: TrainConfig):
    """SGD with momentum 0.9 and weight decay 1e-4 (the paper), or Adam (the refiner, as the released
    code); the learning rate follows ``lr_factor`` step by step."""
    parameters = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.steps, config.warmup_steps, config.schedule))
    return optimizer, scheduler


def _check_finite(step: int, losses: dict, device: torch.device) -> None:
    """Stop, on every rank at once, when a loss is NaN or infinite, naming the step and the loss."""
    bad = {name: value.item() for name, value in losses.items() if not torch.isfinite(value)}
    if distributed.any_across_ranks(bool(bad), device):
        where = ", ".join(f"{name} = {value}" for name, value in bad.items()) or "on another rank"
        raise FloatingPointError(f"step {step}: loss went bad: {where} (all: "
                                 f"{ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                                 "try a lower lr, a longer warm-up or grad_clip")


def _losses(net: nn.Module, model: nn.Module, images, targets, config: TrainConfig, step: int) -> dict:
    """The step's named losses: the detector's, or (``stage="refiner"``) the refiner's on the frozen
    detector's view of the ground-truth objects, boxes jittered by a generator of (seed, step)."""
    if config.stage == "detector":
        return net(images, targets)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    inputs = refinement.ground_truth_inputs(model, images, targets, model.refiner.config.sizes, 0.1, generator)
    return model.refiner(inputs["features"], inputs["coarse_mask_logits"], inputs["gt_masks"])


def _train_step(net, model, batch, run: dict, optimizer, scheduler, scaler, step: int) -> dict:
    device, config = run["device"], run["config"]
    images = [img.to(device, non_blocking=True) for img in batch[0]]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in batch[1]]
    with torch.autocast(device.type, dtype=run["dtype"]) if run["dtype"] else contextlib.nullcontext():
        losses = _losses(net, model, images, targets, config, step)
    loss = sum(losses.values())
    _check_finite(step, losses, device)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()      # a disabled scaler (all but fp16) passes everything through
    scaler.unscale_(optimizer)         # clip the true gradients, not the scaled ones
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)             # skipped when fp16 gradients overflowed; S is then halved
    scaler.update()
    scheduler.step()
    values = distributed.mean_across_ranks(torch.stack([v.detach().float() for v in (loss, *losses.values())]))
    values = values.tolist()                                                                  # 1 + L floats
    return {"loss": values[0], **dict(zip(losses, values[1:])), "lr": lr}


def _wrap(model: nn.Module, device: torch.device, config: TrainConfig) -> nn.Module:
    """DDP under torchrun (gradients averaged in ``backward``), then ``torch.compile`` if asked.
    The refiner stage calls the model's parts directly, so it runs in one process, unwrapped."""
    if config.stage == "refiner":
        return model
    net = model
    if distributed.world_size() > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if config.compile else net


def _write_metrics(path: Path | None, history: dict) -> None:
    """Start the JSONL metrics file from ``history`` (empty for a new run; a resumed run drops
    lines written after its checkpoint, so the file always matches the restored history)."""
    if path is None or not distributed.is_main():
        return
    path.write_text("")
    records = [("train", r) for r in history["train"]] + [("eval", r) for r in history["eval"]]
    for kind, record in sorted(records, key=lambda kr: (kr[1]["step"], kr[0] == "eval")):
        _log(path, kind, record)


def _loader(dataset, sampler: StepBatchSampler, workers: int, device: torch.device, seed: int):
    """A DataLoader over ``sampler``'s batches; its own generator, so creating it draws nothing
    from the global RNG (a resumed run would otherwise drift from an uninterrupted one)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=data.collate_fn, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


def _log(path: Path | None, kind: str, record: dict) -> None:
    if path is not None:  # rank 0 only (append_jsonl)
        distributed.append_jsonl(path, {"kind": kind, **record})


def _after_step(done: int, run: dict, model, optimizer, scheduler, scaler, history: dict) -> None:
    """Evaluate (rank 0), then write the last checkpoint when due and the best one when the
    evaluation beat every earlier one (``checkpoints.is_best``)."""
    config, out = run["config"], run["out"]
    evaluated = run["val_dataset"] is not None and config.eval_every and (
        done % config.eval_every == 0 or done == config.steps)
    if evaluated:
        if distributed.is_main():
            metrics = evaluate.coco_evaluate(model, run["val_dataset"], config.batch_size, run["device"])
            history["eval"].append({"step": done, **metrics})
            _log(run["metrics_path"], "eval", history["eval"][-1])
        distributed.barrier()
    due = done in (config.steps, run["stop_at"]) or (config.checkpoint_every and done % config.checkpoint_every == 0)
    if out is None or not (due or evaluated):
        return
    extra = {"scaler": scaler.state_dict(), "config": run["record"], "info": run["info"],
             "rng_per_rank": distributed.gather_objects(checkpoints.rng_state())}   # a collective: all ranks
    if not distributed.is_main():
        return
    if due:
        checkpoints.save_checkpoint(out / "last.pt", model, optimizer, scheduler, done, history, extra)
    if evaluated and checkpoints.is_best(history["eval"]):
        checkpoints.save_checkpoint(out / "best.pt", model, optimizer, scheduler, done, history, extra)


def prepare_out(out: Path, resume: bool, overwrite: bool, also_remove: tuple[str, ...] = ()) -> None:
    """Make the run folder ``out``; refuse to write a new run over an old one (its checkpoints would
    be lost) unless ``resume`` or ``overwrite`` (which deletes the old run's files, and the files
    ``also_remove`` names that a caller writes beside them, so none outlives the run it describes)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; give a folder for the run's checkpoints and metrics")
    if found and not resume and not overwrite:
        raise ValueError(f"{str(out)!r} already holds a run ({', '.join(found)}): resume it (resume=True, "
                         "--resume) or replace it (overwrite=True, --overwrite), or choose another folder")
    distributed.barrier()  # every rank has looked before rank 0 changes the folder (or writes the new run's files)
    if distributed.is_main():
        if overwrite and not resume:
            for name in found + [n for n in also_remove if (out / n).exists()]:
                (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # ... and none goes on before the folder is ready


def _run_record(model: nn.Module, config: TrainConfig, run_settings: dict | None) -> dict:
    """The configuration a checkpoint stores and a resume compares, field by field."""
    model_config = getattr(model, "config", None)
    return {"model": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else {},
            "run": dict(run_settings or {}), "fit": config.numeric_fields()}


def _trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The module whose parameters the run optimises: the whole model, or only its refiner."""
    if config.stage == "detector":
        return model
    if getattr(model, "refiner", None) is None:
        raise ValueError("TrainConfig(stage='refiner') needs a model with a refiner (model.add_refiner(net))")
    return model.refiner


def fit(model: nn.Module, dataset, config: TrainConfig, *, val_dataset=None, out: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
        device: str | torch.device | None = None, progress: bool = True, run_settings: dict | None = None) -> dict:
    """Train ``model`` for ``config.steps`` steps; returns the history.

    Args:
        dataset: map-style, ``ds[i] -> (image Tensor[3, H, W], target dict)``.
        config: the run (``TrainConfig``): steps, batch, schedule, seed, stage, speed switches.
        val_dataset: evaluated with pycocotools every ``config.eval_every`` steps and at the end.
        out: a folder for ``last.pt`` (every ``config.checkpoint_every`` steps and at the end),
            ``best.pt`` (the best evaluation) and ``metrics.jsonl``; None writes nothing. A folder
            that already holds a run is refused unless ``resume`` or ``overwrite``.
        resume: continue from ``out/last.pt`` when it exists (same model, data and config; another
            configuration raises ``checkpoints.CheckpointError`` naming the fields).
        stop_at: leave after this step (with a checkpoint) as if interrupted; ``resume`` goes on.
        device: where to train (default: where the model is).
        run_settings: the caller's settings (data, sizes), stored and compared on resume.
    Returns:
        ``{"train": [per step {"step", "lr", "loss", "loss_*", "time", "images_per_s"}], "eval": [{"step", "bbox": {...}, ...}],
        "resumed_from": the step this call went on from (0 for a new run)}``
    """
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at={stop_at!r}; expected a step >= 1")
    if len(dataset) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({len(dataset)} images)")
    out = Path(out) if out is not None else None
    if out is not None:
        prepare_out(out, resume, overwrite)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    optimizer, scheduler = _make_optimizer(_trainable(model, config).parameters(), config)
    dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    run = dict(config=config, val_dataset=val_dataset, device=device, dtype=dtype, stop_at=stop_at, out=out,
               metrics_path=out / "metrics.jsonl" if out is not None else None,
               record=_run_record(model, config, run_settings), info=_info(dataset))
    history, start = {"train": [], "eval": []}, 0
    if resume and out is not None and (out / "last.pt").exists():
        history, start = checkpoints.resume(out / "last.pt", model, optimizer, scheduler, scaler, run["record"])
    history["resumed_from"] = start
    _write_metrics(run["metrics_path"], history)
    _loop(model, dataset, run, optimizer, scheduler, scaler, history, start, progress)
    model.eval()
    return history


def _info(dataset) -> dict:
    """What a checkpoint tells about its data: class names and training image size (``load_model``)."""
    return {"classes": list(getattr(dataset, "classes", data.CLASSES)),
            "image_size": getattr(dataset, "image_size", None)}


def _loop(model, dataset, run: dict, optimizer, scheduler, scaler, history: dict, start: int, progress: bool) -> None:
    """Steps ``start + 1 .. stop`` with a progress bar: train, log, then evaluate and checkpoint."""
    config = run["config"]
    net = _wrap(model, run["device"], config)
    stop = config.steps if run["stop_at"] is None else min(run["stop_at"], config.steps)
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start, stop, distributed.rank(),
                               distributed.world_size())
    loader = _loader(dataset, sampler, config.workers, run["device"], config.seed)
    bar = tqdm(total=config.steps, initial=start, desc=config.stage, disable=not progress or not distributed.is_main())
    model.train()
    if config.stage == "refiner":
        model.eval()            # the detector is frozen: BatchNorm statistics stay, no dropout
        model.refiner.train()
    tick = time.perf_counter()
    for step, batch in zip(range(start, stop), loader):
        record = _train_step(net, model, batch, run, optimizer, scheduler, scaler, step + 1)
        seconds = time.perf_counter() - tick
        history["train"].append({"step": step + 1, **record, "time": seconds,
                                 "images_per_s": config.batch_size / seconds})
        _log(run["metrics_path"], "train", history["train"][-1])
        bar.update(1)
        bar.set_postfix({"img/s": f"{config.batch_size / seconds:.1f}",
                         **{k.replace("loss_", ""): f"{v:.3f}" for k, v in record.items() if "loss" in k}})
        _after_step(step + 1, run, model, optimizer, scheduler, scaler, history)
        tick = time.perf_counter()
    bar.close()


if __name__ == "__main__":
    from course_lib.train_cli import main
    main()
