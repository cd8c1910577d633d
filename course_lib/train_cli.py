"""The command line of chapter 10: ``python -m course_lib.train --config quick|cpu|gpu --out DIR``.

A run is one frozen ``RunConfig`` (the data, the schedule, the speed switches and a
``ModelConfig``) from one of three presets, each a function:

* ``quick_run``: CI's run, a few steps on 64 px images, on any CPU in well under a minute;
* ``cpu_run``: a learner's laptop, the CPU chapters' model for a few minutes;
* ``gpu_run``: the real run, ResNet-50-FPN at 512 px with mixed precision, ``channels_last``
  and DataLoader workers, on one GPU or several with
  ``torchrun --nproc_per_node=N -m course_lib.train --config gpu``.

Flags override a preset's fields (``--steps``, ``--batch-size``, ``--image-size``, ...). The run
writes into ``--out``: ``run.json`` (the settings, the command, the machine), ``metrics.jsonl``
(one line per step and per evaluation), ``last.pt`` and ``best.pt`` (checkpoints) and
``summary.json`` (final AP, wall time, images/s). ``--resume`` continues from ``last.pt``
exactly: same schedule, optimizer, scaler, RNG and data order.

Public names: ``RunConfig``, ``quick_run``, ``cpu_run``, ``gpu_run``, ``PRESETS``,
``build_parser``, ``make_run``, ``make_datasets``, ``Resized``, ``run_training``, ``main``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from course_lib import data, distributed, model, train, utils
from course_lib.config import ModelConfig


@dataclass(frozen=True)
class RunConfig:
    name: str                       # the preset it came from
    model: ModelConfig
    data: str = "shapes"            # "shapes" (drawn by code) or "coco" (any COCO-format set on disk)
    image_size: int = 128           # shapes: image side; coco: longest side after resizing (px)
    train_images: int = 2000        # shapes only; a COCO set brings its own
    val_images: int = 200           # shapes only (a different seed from the training set)
    batch_size: int = 8             # images per step, over all processes
    steps: int = 800
    lr: float = 0.02                # Mask R-CNN: 0.02 at batch 16
    warmup_steps: int = 50
    schedule: str = "onecycle"
    eval_every: int = 200           # steps between pycocotools evaluations (and at the end)
    checkpoint_every: int = 100
    workers: int = 0                # DataLoader worker processes
    amp: bool = False               # mixed precision (CUDA only: bf16, else fp16 + GradScaler)
    channels_last: bool = False     # NHWC layout (faster convolutions on tensor cores)
    compile: bool = False           # torch.compile the training forward
    device: str = "auto"            # "auto", "cpu" or "cuda"
    seed: int = 0
    coco_images: str | None = None
    coco_annotations: str | None = None


def quick_run() -> RunConfig:
    """CI and the notebook's quick mode: a narrow model, 6 steps of 2 images of 64 px, on the CPU."""
    small = model.quick_config(width=16, representation_size=64, mask_conv_channels=16, mask_num_convs=2,
                               rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                               rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50)
    return RunConfig("quick", small, image_size=64, train_images=24, val_images=8, batch_size=2,
                     steps=6, lr=0.01, warmup_steps=2, eval_every=6, checkpoint_every=3, device="cpu")


def cpu_run() -> RunConfig:
    """A learner's laptop: chapter 06's model and schedule on 128 px shapes, about 8 minutes on 2 cores."""
    return RunConfig("cpu", model.cpu_config(), image_size=128, train_images=19200, val_images=100,
                     batch_size=8, steps=2400, lr=0.06, warmup_steps=100, eval_every=600,
                     checkpoint_every=200, workers=1)


def gpu_run() -> RunConfig:
    """The real run: ResNet-50-FPN (from scratch, no pretrained weights) on 512 px shapes.

    Paper-sized heads (FPN 256 channels, 1024-d box head, 256-channel mask convs, 512 RoIs per
    image), anchors 32..512 px on P2..P6 and the FPN level mapping scaled from 224 px at 800 px
    images to 144 px at 512 px. Mixed precision, ``channels_last`` and 8 workers.
    """
    gpu_model = dataclasses.replace(
        model.ModelConfig(), backbone="resnet50", fpn=True, fpn_channels=256, representation_size=1024,
        mask_conv_channels=256, anchor_sizes=(32, 64, 128, 256, 512), canonical_size=144,
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512)
    return RunConfig("gpu", gpu_model, image_size=512, train_images=20000, val_images=500,
                     batch_size=8, steps=6000, lr=0.02, warmup_steps=500, eval_every=1000,
                     checkpoint_every=500, workers=8, amp=True, channels_last=True, device="cuda")


PRESETS = {"quick": quick_run, "cpu": cpu_run, "gpu": gpu_run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib.train",
                                     description="Train the course's Mask R-CNN from a preset run and flags.")
    parser.add_argument("--config", choices=sorted(PRESETS), default="quick", help="the preset run")
    parser.add_argument("--data", choices=("shapes", "coco"), help="shapes (generated) or coco (files)")
    parser.add_argument("--coco-images", help="folder of the COCO-format set's images")
    parser.add_argument("--coco-annotations", help="its instances json")
    parser.add_argument("--image-size", type=int, help="shapes: side; coco: longest side (px)")
    parser.add_argument("--batch-size", type=int, help="images per step over all processes")
    parser.add_argument("--steps", type=int, help="total SGD steps")
    parser.add_argument("--backbone", choices=("tiny", "resnet50"))
    parser.add_argument("--workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--device", choices=distributed.DEVICES)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<config>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def make_run(args: argparse.Namespace) -> RunConfig:
    """The preset named by ``--config`` with the given flags applied, checked."""
    run = PRESETS[args.config]()
    flags = {"data": args.data, "coco_images": args.coco_images, "coco_annotations": args.coco_annotations,
             "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
             "workers": args.workers, "device": args.device, "amp": args.amp,
             "channels_last": args.channels_last, "compile": args.compile}
    run = dataclasses.replace(run, **{k: v for k, v in flags.items() if v is not None})
    if args.backbone is not None:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, backbone=args.backbone))
    for field in ("image_size", "batch_size", "steps"):
        if getattr(run, field) < (32 if field == "image_size" else 1):
            raise ValueError(f"--{field.replace('_', '-')}={getattr(run, field)} is too small")
    if run.workers < 0:
        raise ValueError(f"--workers={run.workers}; expected >= 0")
    if run.data == "coco":
        _check_coco_paths(run)
    return run


def _check_coco_paths(run: RunConfig) -> None:
    if run.coco_images is None or run.coco_annotations is None:
        raise ValueError("--data coco needs --coco-images DIR and --coco-annotations FILE")
    if not Path(run.coco_images).is_dir():
        raise FileNotFoundError(f"--coco-images {run.coco_images!r}: no such folder")
    if not Path(run.coco_annotations).is_file():
        raise FileNotFoundError(f"--coco-annotations {run.coco_annotations!r}: no such file")


class Resized(torch.utils.data.Dataset):
    """A data set whose images are shrunk so the longest side is at most ``max_size`` pixels.

    Boxes scale with the image, masks are resized nearest-neighbour (they stay 0/1). Smaller
    images are left as they are. ``classes`` is kept, so ``data.to_coco`` can build the ground
    truth of the resized images for evaluation.
    """

    def __init__(self, dataset, max_size: int):
        self.dataset, self.max_size = dataset, max_size
        self.classes = getattr(dataset, "classes", data.CLASSES)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        height, width = image.shape[-2:]
        scale = self.max_size / max(height, width)
        if scale >= 1:
            return image, target
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # [3, h, w]
        masks = target["masks"].new_zeros((0, *size))                                         # [0, h, w]
        if len(target["masks"]):
            masks = F.interpolate(target["masks"][None].float(), size=size, mode="nearest")[0]  # [N, h, w]
        factors = torch.tensor([size[1] / width, size[0] / height] * 2)
        return image, {**target, "boxes": target["boxes"] * factors, "masks": masks.to(torch.uint8)}


def make_datasets(run: RunConfig):
    """``(train_set, val_set)``: shapes sets of two seeds, or the COCO-format set (resized) for both."""
    if run.data == "shapes":
        return (data.ShapesDataset(run.train_images, image_size=run.image_size, seed=run.seed),
                data.ShapesDataset(run.val_images, image_size=run.image_size, seed=run.seed + 1,
                                   image_id_offset=run.train_images))
    coco = Resized(data.CocoDataset(run.coco_images, run.coco_annotations), run.image_size)
    return coco, coco


def _run_settings(run: RunConfig) -> dict:
    """The settings that change the numbers a run computes (compared on resume): not the device,
    workers, AMP, layout, compilation or logging intervals."""
    keep = ("name", "data", "image_size", "train_images", "val_images", "coco_images", "coco_annotations")
    return {k: getattr(run, k) for k in keep}


def run_training(run: RunConfig, out: str | Path, resume: bool = False, stop_at: int | None = None,
                 progress: bool = True) -> tuple[model.MaskRCNN, dict]:
    """Train ``run`` writing into ``out``; returns the model and ``fit``'s history (rank 0's
    when distributed)."""
    out, device = Path(out), distributed.resolve_device(run.device)
    world = distributed.setup(device)
    if run.batch_size % world:
        raise ValueError(f"--batch-size={run.batch_size} does not split over {world} processes")
    train_set, val_set = make_datasets(run)
    num_classes = len(getattr(train_set, "classes", data.CLASSES)) + 1
    utils.seed_everything(run.seed)
    net = model.MaskRCNN(dataclasses.replace(run.model, num_classes=num_classes))
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if resume and not (out / "last.pt").exists():
            print(f"--resume: no checkpoint last.pt in {out.name}/ yet, so a new run starts")
        _write_json(out / "run.json", {"command": sys.argv, "run": dataclasses.asdict(run), "device": str(device),
                                       "world_size": world, "machine": _machine(device)})
    start = time.perf_counter()
    history = train.fit(
        net, train_set, run.steps, batch_size=run.batch_size, lr=run.lr, warmup_steps=run.warmup_steps,
        schedule=run.schedule, val_dataset=val_set, eval_every=run.eval_every, device=device, seed=run.seed,
        checkpoint_path=out / "last.pt", checkpoint_every=run.checkpoint_every, resume=resume, stop_at=stop_at,
        best_checkpoint_path=out / "best.pt", metrics_path=out / "metrics.jsonl", amp=run.amp,
        channels_last=run.channels_last, workers=run.workers, compile_model=run.compile,
        run_settings=_run_settings(run), progress=progress and distributed.is_main())
    if distributed.is_main():
        _write_json(out / "summary.json", _summary(history, time.perf_counter() - start))
    return net, history


def _summary(history: dict, seconds: float) -> dict:
    steps = history["train"]
    speeds = [s["images_per_s"] for s in steps[1:]] or [s["images_per_s"] for s in steps]  # step 1 warms up
    last_eval = history["eval"][-1] if history["eval"] else {}
    return {"steps": steps[-1]["step"] if steps else 0, "final_loss": steps[-1]["loss"] if steps else None,
            "wall_s_this_session": round(seconds, 1), "images_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "box_AP": last_eval.get("bbox", {}).get("AP"), "mask_AP": last_eval.get("segm", {}).get("AP"),
            "box_AP50": last_eval.get("bbox", {}).get("AP50"), "mask_AP50": last_eval.get("segm", {}).get("AP50")}


def _machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, train, print the final AP; exit with a one-line message on a bad input."""
    args = build_parser().parse_args(argv)
    try:
        run = make_run(args)
        _, history = run_training(run, args.out or Path("runs") / args.config, resume=args.resume,
                               stop_at=args.stop_at, progress=not args.no_progress)
        is_main = distributed.is_main()
    except (ValueError, FileNotFoundError, distributed.DeviceError, FloatingPointError) as error:
        raise SystemExit(f"course_lib.train: error: {error}") from None
    finally:
        distributed.cleanup()
    if is_main:
        print(_final_line(history))
    return history


def _final_line(history: dict) -> str:
    last = history["train"][-1] if history["train"] else {"step": 0, "loss": float("nan")}
    if not history["eval"] or history["eval"][-1]["step"] != last["step"]:
        return f"stopped after step {last['step']}, loss {last['loss']:.3f} (continue with --resume)"
    final = history["eval"][-1]
    masks = f", mask AP {final['segm']['AP']:.3f}" if "segm" in final else ""
    return f"step {final['step']}: box AP {final['bbox']['AP']:.3f}{masks}"


if __name__ == "__main__":
    main()
