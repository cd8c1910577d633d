"""The command line of chapter 10: ``python -m course_lib.train --config quick|cpu|gpu --out DIR``.

A run is one frozen ``RunConfig`` (the data, a ``ModelConfig`` and a ``TrainConfig``) from one of
the presets in ``presets.PRESETS``:

* ``quick``: CI's run, a few steps on 64 px images, on any CPU in well under a minute;
* ``cpu``: a learner's laptop, the CPU chapters' model for a few minutes;
* ``gpu``: the real run, ResNet-50-FPN at 512 px with mixed precision, ``channels_last``
  and DataLoader workers, on one GPU or several with
  ``torchrun --nproc_per_node=N -m course_lib.train --config gpu``.

Flags override a preset's fields (``--steps``, ``--batch-size``, ``--image-size``, ...). The run
writes into ``--out``: ``run.json`` (the settings, the command, the machine), ``metrics.jsonl``
(one line per step and per evaluation), ``last.pt`` and ``best.pt`` (checkpoints) and
``summary.json`` (final AP, wall time, images/s), and for COCO-format data ``split.json`` (the
image ids and file names trained and evaluated on). ``--resume`` continues from ``last.pt``
exactly: same schedule, optimizer, scaler, RNG and data order. A folder that already holds a run
is refused unless ``--resume`` or ``--overwrite``. Every bad input ends in one line naming it.

COCO-format data (``--data coco``) is evaluated on held-out images only: a separate set
(``--val-images``, ``--val-annotations``), or else a seeded ``--val-fraction`` of the training
set's images (default 0.1), never trained on. ``--eval-on-train`` evaluates on the training images
instead, and only when asked for by that name (such an AP measures memory, not detection).

Public names: ``build_parser``, ``make_run``, ``make_datasets``, ``coco_sets``, ``split_record``,
``run_training``, ``main``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from course_lib import data, distributed, model, presets, train, utils
from course_lib.config import RunConfig


CLI_FILES = ("run.json", "summary.json", "split.json")  # what a run writes beside ``train.RUN_FILES``


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib.train",
                                     description="Train the course's Mask R-CNN from a preset run and flags.")
    parser.add_argument("--config", choices=sorted(presets.PRESETS), default="quick", help="the preset run")
    parser.add_argument("--data", choices=("shapes", "coco"), help="shapes (generated) or coco (files)")
    parser.add_argument("--coco-images", help="folder of the COCO-format set's images")
    parser.add_argument("--coco-annotations", help="its instances json")
    parser.add_argument("--val-images", help="coco: folder of a separate validation set's images")
    parser.add_argument("--val-annotations", help="coco: the validation set's instances json")
    parser.add_argument("--val-fraction", type=float,
                        help="coco without --val-images: share of the images held out for evaluation, "
                             "seeded by the run's seed (default 0.1; OUT/split.json lists them)")
    parser.add_argument("--eval-on-train", action="store_true", default=None,
                        help="coco: evaluate on the training images themselves (no held-out split; the AP "
                             "then measures memory, not detection)")
    parser.add_argument("--image-size", type=int, help="shapes: side; coco: longest side (px); the preset's anchors stay")
    parser.add_argument("--batch-size", type=int, help="images per step over all processes")
    parser.add_argument("--steps", type=int, help="total SGD steps")
    parser.add_argument("--backbone", choices=("tiny", "resnet50"))
    parser.add_argument("--workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--device", choices=utils.DEVICES)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<config>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    parser.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def make_run(args: argparse.Namespace) -> RunConfig:
    """The preset named by ``--config`` with the given flags applied, checked before any work."""
    for flag in ("steps", "batch_size", "stop_at"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}; expected an int >= 1")
    if args.image_size is not None and args.image_size < 32:
        raise ValueError(f"--image-size={args.image_size}; expected at least 32 px")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers={args.workers}; expected >= 0")
    if out_dir(args).exists() and not out_dir(args).is_dir():
        raise ValueError(f"--out {str(out_dir(args))!r} is a file; give a folder for the run's checkpoints and metrics")
    run = presets.PRESETS[args.config]()
    flags = {"data": args.data, "coco_images": args.coco_images, "coco_annotations": args.coco_annotations,
             "image_size": args.image_size, "device": args.device, "val_coco_images": args.val_images,
             "val_coco_annotations": args.val_annotations, "eval_on_train": args.eval_on_train,
             "val_fraction": 0.0 if args.eval_on_train and args.val_fraction is None else args.val_fraction}
    coco_only = [f"--{k.replace('_', '-')}" for k in ("val_images", "val_annotations", "val_fraction", "eval_on_train")
                 if getattr(args, k) is not None]
    if coco_only and (args.data or run.data) != "coco":
        raise ValueError(f"{coco_only[0]} applies to --data coco only")
    fit_flags = {"batch_size": args.batch_size, "steps": args.steps, "workers": args.workers, "amp": args.amp,
                 "channels_last": args.channels_last, "compile": args.compile}
    train_config = dataclasses.replace(run.train, **{k: v for k, v in fit_flags.items() if v is not None})
    run = dataclasses.replace(run, train=train_config, **{k: v for k, v in flags.items() if v is not None})
    if args.backbone is not None:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, backbone=args.backbone))
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
    if run.val_coco_images is not None and not Path(run.val_coco_images).is_dir():
        raise FileNotFoundError(f"--val-images {run.val_coco_images!r}: no such folder")
    if run.val_coco_annotations is not None and not Path(run.val_coco_annotations).is_file():
        raise FileNotFoundError(f"--val-annotations {run.val_coco_annotations!r}: no such file")


def out_dir(args: argparse.Namespace) -> Path:
    """The run folder: ``--out``, or ``runs/<config>``."""
    return Path(args.out) if args.out else Path("runs") / args.config


def make_datasets(run: RunConfig):
    """``(train_set, val_set)``: shapes sets of two seeds, or the COCO-format sets (``coco_sets``) resized."""
    if run.data == "shapes":
        return (data.ShapesDataset(run.train_images, image_size=run.image_size, seed=run.train.seed),
                data.ShapesDataset(run.val_images, image_size=run.image_size, seed=run.train.seed + 1,
                                   image_id_offset=run.train_images))
    return tuple(data.Resized(dataset, run.image_size) for dataset in coco_sets(run))


def coco_sets(run: RunConfig):
    """``(train_set, val_set)`` of COCO-format data: the separate validation set when given, else a
    seeded split (``data.split_indices``) of the one set; the same images twice only for ``eval_on_train``."""
    full = data.CocoDataset(run.coco_images, run.coco_annotations)
    if run.eval_on_train:
        return full, full
    if run.val_coco_images is None:
        train_indices, val_indices = data.split_indices(len(full), run.val_fraction, run.train.seed)
        return data.Subset(full, train_indices), data.Subset(full, val_indices)
    val_set = data.CocoDataset(run.val_coco_images, run.val_coco_annotations)
    if (val_set.classes, val_set.label_to_cat_id) != (full.classes, full.label_to_cat_id):
        raise ValueError(f"--val-annotations declares the categories {_categories(val_set)}, --coco-annotations "
                         f"{_categories(full)}; labels would not mean the same class in both")
    seen = {os.path.abspath(Path(run.coco_images) / f["file_name"]) for f in _image_files(full)}
    shared = [f["file_name"] for f in _image_files(val_set)
              if os.path.abspath(Path(run.val_coco_images) / f["file_name"]) in seen]
    if shared:
        raise ValueError(f"--val-images and --coco-images share {len(shared)} image files (first: {shared[0]!r}); "
                         "a validation set must hold images the model does not train on")
    return full, val_set


def _categories(dataset: data.CocoDataset) -> dict:
    return {cat_id: dataset.classes[label - 1] for label, cat_id in dataset.label_to_cat_id.items()}


def _image_files(dataset) -> list[dict]:
    """``[{"id", "file_name"}]`` per image of a ``CocoDataset``, or of a ``Subset`` or ``Resized`` of one."""
    if isinstance(dataset, (data.Subset, data.Resized)):
        files = _image_files(dataset.dataset)
        return [files[i] for i in dataset.indices] if isinstance(dataset, data.Subset) else files
    return [{"id": image_id, "file_name": dataset.coco.imgs[image_id]["file_name"]} for image_id in dataset.ids]


def split_record(run: RunConfig, train_set, val_set) -> dict:
    """What ``split.json`` holds: how the images were split and each side's image ids and file names."""
    how = ("separate validation set" if run.val_coco_images is not None else
           "evaluated on the training images (--eval-on-train)" if run.eval_on_train else
           f"seeded split: val_fraction {run.val_fraction}, seed {run.train.seed}")
    return {"how": how, "train": _image_files(train_set), "val": _image_files(val_set)}


def _write_split(path: Path, record: dict, resume: bool) -> None:
    """Write ``split.json``; a resume refuses a split other than the one its run trained on."""
    if resume and path.exists() and json.loads(path.read_text()) != record:
        raise ValueError(f"{str(path)!r} records another split of the images than this run makes (another "
                         "--val-fraction, validation set or annotation file?); resume with the same data or start anew")
    _write_json(path, record)


def _run_settings(run: RunConfig) -> dict:
    """The settings that change the numbers a run computes (compared on resume): the data, not the
    device (``fit`` adds the model and the numeric training fields)."""
    keep = ("name", "data", "image_size", "train_images", "val_images", "coco_images", "coco_annotations",
            "val_coco_images", "val_coco_annotations", "val_fraction", "eval_on_train")
    return {k: getattr(run, k) for k in keep}


def run_training(run: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 stop_at: int | None = None, progress: bool = True) -> tuple[model.MaskRCNN, dict]:
    """Train ``run`` writing into ``out``; returns the model and ``fit``'s history (rank 0's
    when distributed)."""
    out, device = Path(out), utils.device(run.device, verbose=False)
    world = distributed.setup(device)
    utils.share_cores(run.train.workers, world)  # threads + workers = cores: none oversubscribed
    if run.train.batch_size % world:
        raise ValueError(f"--batch-size={run.train.batch_size} does not split over {world} processes")
    train_set, val_set = make_datasets(run)
    num_classes = len(getattr(train_set, "classes", data.CLASSES)) + 1
    utils.seed_everything(run.train.seed)
    net = model.MaskRCNN(dataclasses.replace(run.model, num_classes=num_classes))
    train.prepare_out(out, resume, overwrite, also_remove=CLI_FILES)
    if distributed.is_main():
        if resume and not (out / "last.pt").exists():
            print(f"--resume: no checkpoint last.pt in {out.name}/ yet, so a new run starts")
        if run.data == "coco":
            _write_split(out / "split.json", split_record(run, train_set, val_set), resume)
        _write_json(out / "run.json", {"command": sys.argv, "run": dataclasses.asdict(run), "device": str(device),
                                       "world_size": world, "machine": utils.machine_info(device)})
    start = time.perf_counter()
    history = train.fit(net, train_set, run.train, val_dataset=val_set, out=out, resume=resume, overwrite=overwrite,
                        stop_at=stop_at, device=device, run_settings=_run_settings(run),
                        progress=progress and distributed.is_main())
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


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, train, print the final AP; exit with a one-line message on a bad input."""
    args = build_parser().parse_args(argv)
    try:
        run = make_run(args)
        preset_size = presets.PRESETS[args.config]().image_size
        if run.image_size != preset_size and distributed.is_main():
            print(size_note(args.config, run, preset_size))
        _, history = run_training(run, out_dir(args), resume=args.resume,
                                  overwrite=args.overwrite, stop_at=args.stop_at, progress=not args.no_progress)
        is_main = distributed.is_main()
    except (ValueError, FileNotFoundError, utils.DeviceError, FloatingPointError) as error:
        raise SystemExit(f"course_lib.train: error: {_one_line(error)}") from None
    finally:
        distributed.cleanup()
    if is_main:
        print(_final_line(history))
    return history


def size_note(config: str, run: RunConfig, preset_size: int) -> str:
    """What ``--image-size`` leaves as it was: the preset's anchors and FPN level mapping, in px."""
    sizes = run.model.anchor_sizes
    return (f"note: --image-size {run.image_size} px keeps the {config} preset's anchors ({min(sizes)}-{max(sizes)} px) "
            f"and canonical RoI size ({run.model.canonical_size} px), chosen for its "
            f"{preset_size} px images; to scale them with the image, build the config in "
            "Python (e.g. presets.gpu_config(image_size))")


def _one_line(error: Exception) -> str:
    """The error's message on one line. A DataLoader worker re-raises a data set's error with the worker's
    traceback in front (``Caught ValueError in DataLoader worker process 0 ...``): keep its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1] + " (in a DataLoader worker)"
    return " ".join(lines)


def _final_line(history: dict) -> str:
    last = history["train"][-1] if history["train"] else {"step": 0, "loss": float("nan")}
    if not history["eval"] or history["eval"][-1]["step"] != last["step"]:
        return f"stopped after step {last['step']}, loss {last['loss']:.3f} (continue with --resume)"
    final = history["eval"][-1]
    masks = f", mask AP {final['segm']['AP']:.3f}" if "segm" in final else ""
    return f"step {final['step']}: box AP {final['bbox']['AP']:.3f}{masks}"


if __name__ == "__main__":
    main()
