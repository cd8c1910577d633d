"""The paper's Table 2 reproduced in miniature: a grid of ``ModelConfig`` variants, each trained and
evaluated with several seeds, one JSON record per run.

Mask R-CNN's argument rests on its ablations (He et al. 2017, Table 2): the mask loss (2b: per-class
sigmoid, softmax, class-agnostic sigmoid), the RoI pooler at stride 16 (2c: RoIPool, RoIWarp,
RoIAlign with max or average pooling of its samples) and at stride 32 (2d: RoIPool against
RoIAlign, box and mask AP). Every variant changes one or two fields of the same base config
(``presets.ablation_config``); data, schedule and seeds are shared, so the stride is the only
thing that changes between 2c and 2d. Each run records a learning curve (box and mask AP at 25,
50, 75 and 100 % of its steps), and one seed of each variant is also trained 1.5 times as long:
a decaying learning rate flattens any curve, so only a longer run shows a plateau.

Command line (``--device cuda`` and ``--jobs N`` run many small runs at once on one GPU)::

    python -m course_lib.experiments ablations --out data/results/ablations.json [--quick] [--jobs 2]

The output file is rewritten atomically after every run, so a stopped grid resumes where it was:
finished runs (status "ok" or "failed") are skipped on the next call, and a run stopped midway goes
on from its last checkpoint (``--checkpoints``, every 200 steps). A run that raises is recorded
with status "failed" and its error, and the grid goes on. A file written with other ``Settings``
is refused rather than mixed; when only the schedule grows, ``--reuse OLD.json`` keeps the old
file's runs of the new grid's lengths (``reusable``: a run depends on its own steps, not the base).

Object sizes: pycocotools' APs/APm/APl use COCO's fixed area ranges (32^2 and 96^2 px^2), made for
COCO images of about 640 px. Each record also carries ``APs``/``APm``/``APl`` with the ranges scaled
by (image_size / 640)^2 (``scaled_area_ranges``), under ``box_scaled`` and ``mask_scaled``.

Every run starts from one trunk pretrained on image-level labels (``pretrain``, the paper's ImageNet
initialisation in miniature; trained once, ``--pretrain-steps 0`` starts from scratch) and trains for
24 epochs of a small training set (1,600 images, the paper's ~22 epochs of COCO): the models end where
their data stops teaching them, a plateau a CPU can reach (chapter 08, §5).

The paper's numbers and the statistics over seeds (mean ± s.e., paired gaps, the plateau test) are
in ``table2``.

Public names: ``ablation_grid``, ``Settings``, ``ADDED_FIELDS``, ``same_settings``, ``datasets``, ``pretrained_trunk``,
``train_variant``, ``run_one``, ``reusable``, ``plan``, ``run_grid``, ``scaled_area_ranges``,
``scaled_area_metrics``, ``load_records``, ``save_records``, ``main``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib import data, evaluate, model, presets, pretrain, train, utils
from course_lib.config import OPTIMIZERS, SCHEDULES, TrainConfig

SIZE_METRICS = ("APs", "APm", "APl")
CHECKPOINT_EVERY = 200    # steps between a grid run's checkpoints: a stopped run loses at most this many
COCO_IMAGE_SIZE = 640     # px, the long side of a typical COCO image, where 32^2 / 96^2 were set
PRETRAINED_DIR = "runs/pretrained"  # pretrained trunks, under the repository root (git-ignored)

def ablation_grid() -> dict[str, dict]:
    """The variants of Table 2 (b, c, d): name -> the ``ModelConfig`` fields it changes."""
    return {
        "s16-roi_align": dict(stride=16),                              # 2b sigmoid = 2c RoIAlign (average)
        "s16-softmax": dict(stride=16, mask_loss="softmax"),           # 2b
        "s16-agnostic": dict(stride=16, mask_loss="sigmoid_agnostic"),  # 2b
        "s16-roi_pool": dict(stride=16, pooler="roi_pool"),            # 2c
        "s16-roi_warp": dict(stride=16, pooler="roi_warp"),            # 2c
        "s16-roi_align_max": dict(stride=16, pooler="roi_align_max"),  # 2c
        "s32-roi_pool": dict(stride=32, pooler="roi_pool"),            # 2d
        "s32-roi_align": dict(stride=32),                              # 2d
    }


def load_records(path: Path) -> list[dict]:
    """The records already in ``path`` (an empty list when it does not exist yet)."""
    return _load(Path(path)).get("runs", [])


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
        content["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an experiments results file ({err})") from err
    return content


def save_records(path: Path, records: list[dict], header: dict) -> None:
    """Write all records atomically: a crash mid-write never leaves a half file."""
    utils.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({**header, "runs": records}, indent=1)))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of a grid shares: data, schedule (its seed is each run's) and evaluation."""
    train: TrainConfig = TrainConfig(steps=4800, batch_size=8, lr=0.002, warmup_steps=100, optimizer="adam")
    num_train: int = 1600      # cycled: each image seen 24 times in 4,800 steps of 8
    num_val: int = 300
    image_size: int = 192      # px, the shapes images' side
    min_size: float = 56       # px, object sizes: 1.75 to 4.7 cells at stride 32 (see chapter 08)
    max_size: float = 150
    data_seed: int = 0         # the training images; validation uses data_seed + 1
    preset: str = "ablation"   # the base config: presets.ablation_config, or "quick" (CI)
    curve_points: int = 4      # evaluations along each run: at 25, 50, 75 and 100 % of its steps
    plateau_factor: float = 1.5  # one seed of each variant also runs this many times as long
    pretrain_steps: int = 2000  # every run starts from one trunk pretrained this long (``pretrain``); 0: from scratch

    @staticmethod
    def quick() -> "Settings":
        return Settings(TrainConfig(steps=4, batch_size=2, warmup_steps=0), num_train=8, num_val=2,
                        image_size=64, min_size=12, max_size=40, preset="quick", curve_points=2, pretrain_steps=0)


# Fields added to Settings after results files were written, with the value those files' runs used
# (not the field's default: a default may change, what an old run did does not).
ADDED_FIELDS = {"pretrain_steps": 0}


def same_settings(stored: dict, settings: Settings) -> bool:
    """Whether a results file's ``stored`` settings are ``settings``; a field the file lacks counts as
    its value in ``ADDED_FIELDS``."""
    return {**ADDED_FIELDS, **stored} == _as_json(settings)


def datasets(settings: Settings) -> tuple[data.ShapesDataset, data.ShapesDataset]:
    """``(train_set, val_set)`` of the grid: shapes of ``min_size``..``max_size`` px, two seeds."""
    sizes = dict(image_size=settings.image_size, min_size=settings.min_size, max_size=settings.max_size)
    return (data.ShapesDataset(settings.num_train, seed=settings.data_seed, **sizes),
            data.ShapesDataset(settings.num_val, seed=settings.data_seed + 1, image_id_offset=settings.num_train,
                               **sizes))


def _base(settings: Settings) -> model.ModelConfig:
    return presets.quick_config() if settings.preset == "quick" else presets.ablation_config()


def train_variant(changes: dict, seed: int, settings: Settings, steps_factor: float = 1.0,
                  device: str | torch.device | None = None, run_dir: str | Path | None = None,
                  stop_at: int | None = None) -> tuple[model.MaskRCNN, dict, float, int]:
    """Train one variant with one seed, as the grid does: ``(model in eval mode, train.fit's history,
    seconds, the step it resumed from)``; the history's ``eval`` holds the learning curve on the
    validation set, and its ``trunk`` the fingerprint of the pretrained trunk the run started from.

    ``run_dir``: a folder for the run's checkpoints (every ``CHECKPOINT_EVERY`` steps), so a run
    stopped midway (a session's end) goes on from its last checkpoint, bit for bit, when called
    again. ``stop_at`` leaves after that step with a checkpoint, as if stopped (``train.fit``).
    """
    steps = round(settings.train.steps * steps_factor)
    config = dataclasses.replace(settings.train, steps=steps, seed=seed, checkpoint_every=CHECKPOINT_EVERY,
                                 eval_every=max(1, steps // settings.curve_points))
    utils.seed_everything(seed)  # the model's initial weights depend on the seed
    net = model.MaskRCNN(dataclasses.replace(_base(settings), **changes))
    if settings.pretrain_steps:
        trunk, report = pretrained_trunk(settings)
        pretrain.load_trunk(net, trunk)
    train_set, val_set = datasets(settings)
    # The trunk's fingerprint is part of what a resume compares: a trunk pretrained again (another CPU or
    # thread count) has other weights, and a checkpoint started from the old one must not go on as the new.
    run_settings = {**_as_json(settings), **({"trunk": report["trunk"]} if settings.pretrain_steps else {})}
    tick = time.perf_counter()
    history = train.fit(net, train_set, config, val_dataset=val_set, device=device, progress=False, out=run_dir,
                        resume=True, stop_at=stop_at, run_settings=run_settings)
    if settings.pretrain_steps:
        history["trunk"] = report["trunk"]   # which pretrained trunk this run started from
    return net.eval(), history, time.perf_counter() - tick, history["resumed_from"]


def pretrained_trunk(settings: Settings, progress: bool = False,
                     device: str | torch.device | None = None) -> tuple[dict, dict]:
    """``(trunk state_dict, report)`` pretrained for ``settings.pretrain_steps`` steps (``pretrain``) on
    shapes images of seed ``data_seed + 2`` (validation ``+ 3``), the grid's sizes. Trained once (on
    ``device``) and kept in ``PRETRAINED_DIR`` under a name that holds everything it depends on, so
    every run shares it; the device is not in that name: a trunk is the same recipe on any device.
    The report holds its ``pretrain.fingerprint`` as ``trunk``."""
    sizes = dict(image_size=settings.image_size, min_size=settings.min_size, max_size=settings.max_size)
    key = json.dumps([dataclasses.asdict(_base(settings)), sizes, settings.data_seed, settings.pretrain_steps,
                      pretrain.PRETRAIN], sort_keys=True)
    path = utils.repo_root() / PRETRAINED_DIR / f"trunk-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if not path.exists():
        batch = pretrain.PRETRAIN["batch_size"]
        images = data.ShapesDataset(settings.pretrain_steps * batch, seed=settings.data_seed + 2, **sizes)
        val = data.ShapesDataset(settings.num_val, seed=settings.data_seed + 3, **sizes)
        trunk, report = pretrain.pretrain_trunk(_base(settings), images, settings.pretrain_steps, val_dataset=val,
                                                progress=progress, device=device)
        utils.atomic_write(path, lambda tmp: torch.save({"trunk": trunk, "report": report, "key": key}, tmp))
    saved = torch.load(path, weights_only=True)
    return saved["trunk"], {**saved["report"], "trunk": pretrain.fingerprint(saved["trunk"])}


def scaled_area_ranges(image_size: int) -> dict[str, tuple[float, float]]:
    """COCO's area ranges (all, small < 32^2, medium < 96^2, large) scaled by (image_size / 640)^2.

    An object that is "small" on a 640 px COCO image covers the same fraction of a 192 px image
    when its area is (640 / 192)^2 = 11 times smaller: small < 9.6^2 px^2, medium < 28.8^2 px^2.
    """
    scale = (image_size / COCO_IMAGE_SIZE) ** 2
    return {"all": (0.0, 1e10), "small": (0.0, 32 ** 2 * scale),
            "medium": (32 ** 2 * scale, 96 ** 2 * scale), "large": (96 ** 2 * scale, 1e10)}


def scaled_area_metrics(coco_gt: dict, results: list[dict], iou_type: str, image_size: int) -> dict[str, float]:
    """APs, APm, APl with ``scaled_area_ranges(image_size)``: pycocotools' COCOeval, our ``areaRng``.

    A range with no ground truth gives -1 (pycocotools' "not applicable"); no results give 0.
    """
    metrics = evaluate.coco_metrics(coco_gt, results, iou_type, area_ranges=scaled_area_ranges(image_size))
    return {name: metrics[name] for name in SIZE_METRICS}


def _metrics(net: model.MaskRCNN, val_set, settings: Settings, kinds=("box", "mask")) -> dict:
    """Box and mask metrics of ``net`` on ``val_set``: COCO's fixed ranges and the scaled ones."""
    detections = evaluate.predict(net, val_set, batch_size=settings.train.batch_size)
    coco_gt, out = data.to_coco(val_set), {}
    for kind, iou_type, results in zip(("box", "mask"), ("bbox", "segm"), evaluate.coco_results(detections)):
        if kind in kinds:
            out[kind] = evaluate.coco_metrics(coco_gt, results, iou_type)
            out[f"{kind}_scaled"] = scaled_area_metrics(coco_gt, results, iou_type, settings.image_size)
    return out


def _evaluate(net: model.MaskRCNN, val_set, settings: Settings) -> dict:
    """``_metrics``, and for a softmax mask head also its masks by FCN's argmax rule (``mask_argmax``)."""
    out = _metrics(net, val_set, settings)
    if net.config.mask_loss == "softmax":
        twin = model.MaskRCNN(dataclasses.replace(net.config, softmax_mask_rule="argmax"))
        twin.load_state_dict(net.state_dict())
        argmax = _metrics(twin.to(next(net.parameters()).device).eval(), val_set, settings, kinds=("mask",))
        out.update(mask_argmax=argmax["mask"], mask_argmax_scaled=argmax["mask_scaled"])
    return out


def run_one(changes: dict, seed: int, settings: Settings, steps_factor: float = 1.0,
            device: str | torch.device | None = None, run_dir: str | Path | None = None) -> dict:
    """Train one variant with one seed and evaluate it: config, curve, final metrics, wall times and,
    from a pretrained trunk, that trunk's ``pretrain.fingerprint``.

    A run resumed from ``run_dir`` (``train_variant``) records the step it resumed from; its wall
    time is this call's plus the restored steps' training time (their evaluations are not counted).
    """
    net, history, wall, start = train_variant(changes, seed, settings, steps_factor, device, run_dir)
    wall += sum(h["time"] for h in history["train"][:start])
    tick = time.perf_counter()
    metrics = _evaluate(net, datasets(settings)[1], settings)
    last = history["train"][-20:]
    curve = [{"step": e["step"], "box_AP": e["bbox"]["AP"], "box_AP50": e["bbox"]["AP50"],
              **({f"mask_{m}": e["segm"][m] for m in ("AP", "AP50", "AP75")} if "segm" in e else {})}
             for e in history["eval"]]
    trunk = {"trunk": history["trunk"]} if settings.pretrain_steps else {}
    return {"config": dataclasses.asdict(net.config), "wall_time_s": round(wall, 1),
            "eval_time_s": round(time.perf_counter() - tick, 1), "resumed_from_step": start, "curve": curve,
            "final_loss": round(sum(h["loss"] for h in last) / len(last), 4), **trunk, **metrics}


def _run_dir(checkpoints_dir: Path | None, name: str, seed: int, steps: int) -> Path | None:
    """A run's checkpoint folder, named by variant, seed and steps (not the factor: a 3,200-step grid's
    1.5x run and a 4,800-step grid's run are one run), so no two runs of one grid share one."""
    return None if checkpoints_dir is None else Path(checkpoints_dir) / f"{name}-seed{seed}-{steps}steps"


def _run_record(name: str, changes: dict, seed: int, factor: float, settings: Settings, threads: int | None,
                device: str | None, run_dir: Path | None) -> dict:
    """One grid cell as a record; a run that raises is recorded as failed (the grid goes on)."""
    if threads is not None:
        torch.set_num_threads(threads)
    record = {"variant": name, "changes": changes, "seed": seed, "steps_factor": factor,
              "steps": round(settings.train.steps * factor), "machine": utils.machine_info()}
    try:
        record.update(status="ok", **run_one(changes, seed, settings, factor, device, run_dir))
    except Exception as err:  # a broken variant must not cost the others
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=5))
    return record


def _as_json(settings: Settings) -> dict:
    """``settings`` as a results file stores them (tuples become lists), to compare with one."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def reusable(paths: list[str | Path], settings: Settings) -> list[dict]:
    """The finished runs in other results files that this grid would make itself, as its records.

    A run depends on the settings and its own number of steps, not on the grid's base: a 3,200-step
    grid's runs 1.5x as long (4,800 steps) are a 4,800-step grid's runs. So when the schedule grows,
    runs with as many steps as this grid's runs or its longer runs are kept (``steps_factor`` set to
    match). Raises ``ValueError`` for a file whose settings differ in anything but the steps.
    """
    factors = {round(settings.train.steps * f): f for f in (1.0, settings.plateau_factor)}
    kept = []
    for path in paths:
        content = _load(Path(path))
        if not content:
            raise FileNotFoundError(f"--reuse {path}: no such results file")
        stored = content.get("settings", {})
        if not same_settings({**stored, "train": {**stored.get("train", {}), "steps": settings.train.steps}}, settings):
            raise ValueError(f"--reuse {path}: its runs were made with other settings than the steps "
                             f"({content.get('settings')}); only a grid that differs in its steps can reuse them")
        kept += [{**r, "steps_factor": factors[r["steps"]]} for r in content["runs"]
                 if r.get("status") == "ok" and r.get("steps") in factors]
    return kept


def plan(grid: dict[str, dict], seeds: tuple[int, ...], plateau_seeds: tuple[int, ...] = (0,),
         settings: Settings = Settings()) -> list[tuple[str, int, float]]:
    """The grid's runs ``(variant, seed, steps_factor)``, seed-major (a grid stopped early has every
    variant at the same seeds), then the longer runs that test the plateau."""
    runs = [(name, seed, 1.0) for seed in seeds for name in grid]
    return runs + [(name, seed, settings.plateau_factor) for seed in plateau_seeds for name in grid]


def run_grid(grid: dict[str, dict], out: str | Path, seeds: tuple[int, ...] = (0, 1, 2),
             settings: Settings = Settings(), command: str = "", progress: bool = True, jobs: int = 1,
             threads: int | None = None, plateau_seeds: tuple[int, ...] = (0,), device: str | None = None,
             reuse: list[dict] = (), checkpoints_dir: str | Path | None = None) -> list[dict]:
    """Run every ``plan`` entry not already in ``out`` (or in ``reuse``, records from ``reusable``,
    which join the file); return all records.

    ``jobs`` > 1 runs that many cells at once in worker processes with ``threads`` torch threads each
    (on a 2-core CPU, 2 jobs x 1 thread finish a grid sooner than 1 job x 2 threads). The file is
    rewritten after every finished run, in any order, so a stopped grid resumes without redoing them.
    With ``checkpoints_dir`` (one per results file: two grids writing one folder would mix their runs'
    checkpoints), each run also checkpoints into its own folder there, so a run stopped midway resumes
    from its last checkpoint; the folder is deleted once the run's record is saved.
    Raises ``ValueError`` when ``out`` holds runs made with other ``settings``.
    """
    out = Path(out)
    previous = _load(out)
    records = previous.get("runs", [])
    if records and not same_settings(previous.get("settings", {}), settings):
        raise ValueError(f"{out} holds runs with settings={previous.get('settings')}, not "
                         f"{dataclasses.asdict(settings)}; use another --out to change settings")
    planned = plan(grid, seeds, plateau_seeds, settings)
    done = {(r["variant"], r["seed"], r.get("steps_factor", 1.0)) for r in records}
    adopted = []
    for record in reuse:
        key = (record["variant"], record["seed"], record["steps_factor"])
        if key in planned and key not in done:
            adopted.append(record)
            done.add(key)
    records += adopted
    todo = [run for run in planned if run not in done]
    header = {"command": command or previous.get("command", ""), "settings": dataclasses.asdict(settings),
              "area_ranges_scaled": scaled_area_ranges(settings.image_size), "machine": utils.machine_info()}
    if settings.pretrain_steps:
        if threads is not None:
            torch.set_num_threads(threads)   # as the runs: more threads than cores beside them is several times slower
        header["pretrain"] = pretrained_trunk(settings, progress, device)[1]   # once, before the workers share it
    if adopted:
        save_records(out, records, header)
    run_dirs = {(name, seed, factor): _run_dir(checkpoints_dir, name, seed, round(settings.train.steps * factor))
                for name, seed, factor in todo}
    args = [(name, grid[name], seed, factor, settings, threads, device, run_dirs[(name, seed, factor)])
            for name, seed, factor in todo]
    parallel = jobs > 1 and len(args) > 1
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if parallel \
            else contextlib.nullcontext() as pool, tqdm(total=len(todo), desc="grid", disable=not progress) as bar:
        if parallel:
            results = (future.result() for future in as_completed([pool.submit(_run_record, *a) for a in args]))
        else:
            results = (_run_record(*a) for a in args)
        for record in results:
            records.append(record)
            save_records(out, records, header)
            run_dir = run_dirs[(record["variant"], record["seed"], record["steps_factor"])]
            if run_dir is not None and record["status"] == "ok":
                shutil.rmtree(run_dir, ignore_errors=True)   # its record holds what it measured
            bar.update()
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("grid", choices=["ablations"], help="which grid to run")
    parser.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check the machinery")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--plateau-seeds", type=int, default=1, help="seeds also run 1.5x as long (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--num-train", type=int, default=None, help="training images (cycled: a smaller set is seen more often)")
    parser.add_argument("--num-val", type=int, default=None, help="validation images")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate decay")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="SGD (the paper) or Adam")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="start every run from a trunk pretrained this many steps to name the shapes "
                             "(default 2000; 0: from scratch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (1 is fastest on a busy CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument("--device", choices=utils.DEVICES, default=None, help="where to train (default: the CPU)")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants")
    parser.add_argument("--checkpoints", default=None, metavar="DIR",
                        help="where runs checkpoint, to resume midway; one folder per results file "
                             "(default: runs/grid/<the --out file's name>)")
    parser.add_argument("--reuse", nargs="+", default=(), metavar="FILE",
                        help="results files of the same settings but other steps: keep their runs of this grid's lengths")
    args = parser.parse_args(argv)
    for flag, least in (("seeds", 1), ("steps", 1), ("num_train", 1), ("num_val", 1), ("jobs", 1), ("pretrain_steps", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}; expected an int >= {least}")
    settings = Settings.quick() if args.quick else Settings()
    fit_flags = {"steps": args.steps, "lr": args.lr, "schedule": args.schedule, "optimizer": args.optimizer}
    settings = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, **{k: v for k, v in fit_flags.items() if v is not None}))
    for field in ("num_train", "num_val", "pretrain_steps"):
        if getattr(args, field) is not None:
            settings = dataclasses.replace(settings, **{field: getattr(args, field)})
    grid = ablation_grid()
    if args.variants:
        unknown = sorted(set(args.variants) - set(grid))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(grid)}")
        grid = {name: grid[name] for name in args.variants}
    device = None if args.device is None else str(utils.device(args.device, verbose=False))
    command = "python -m course_lib.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        reuse = reusable(args.reuse, settings)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    records = run_grid(grid, args.out, tuple(range(args.seeds)), settings, command, jobs=args.jobs,
                       threads=args.threads, plateau_seeds=tuple(range(args.plateau_seeds)), device=device,
                       reuse=reuse, checkpoints_dir=args.checkpoints or Path("runs/grid") / Path(args.out).stem)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} runs in {args.out}, {len(failed)} failed")


if __name__ == "__main__":
    main()
