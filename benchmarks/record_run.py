"""Copy a training run's figures into one results record (data/results/*.json) that a chapter reads.

    .venv/bin/python benchmarks/record_run.py RUN_DIR OUT_JSON [--what "..."] [--command "..."]

RUN_DIR is a ``python -m course_lib.train`` output folder: ``run.json`` (settings, command, machine),
``summary.json`` (final AP, wall time, images/s) and ``metrics.jsonl`` (every step and evaluation).
The record holds the command, the settings, the machine, the loss curve (averaged over windows,
at most ``CURVE_POINTS`` points), every evaluation, the final AP and the time: ``train_s``, the sum
of every step's own time over all sessions of the run (a run stopped and resumed is timed whole;
evaluations and start-up are not in it), and ``wall_s_last_session``, the last session's wall clock
(all of the run when ``resumed`` is false), so the chapter shows the run without its checkpoints. Chapter 10 reads two such records: the CPU proof of the GPU
recipe (``gpu_preset_cpu_proof.json``, the ``gpu_proof`` preset) and the GPU run (``gpu_run.json``,
written by ``benchmarks/gpu_session.py``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from course_lib import distributed

CURVE_POINTS = 100
METRICS = ("AP", "AP50", "AP75")
# What each preset's record is, in the record itself (a reader of the json alone should not mistake one for the other).
WHAT = {"gpu_proof": "CPU proof that the gpu preset's recipe learns: its topology (bottleneck ResNet 3-4-6-3, FPN, "
                     "the heads) at a quarter of ResNet-50's width, 128 px, fp32; not the GPU result",
        "gpu": "the gpu preset (ResNet-50-FPN from scratch, 512 px, AMP) on one GPU, shortened to one session"}


def curve(train_records: list[dict], points: int = CURVE_POINTS) -> dict:
    """``{"step": [...], "loss": [...], "loss_*": [...]}``: each value the mean over a window of steps,
    at the window's last step; all steps when there are at most ``points``."""
    if not train_records:
        return {"step": []}
    names = [k for k in train_records[0] if k == "loss" or k.startswith("loss_")]
    size = max(1, -(-len(train_records) // points))
    windows = [train_records[i:i + size] for i in range(0, len(train_records), size)]
    out = {"step": [w[-1]["step"] for w in windows]}
    for name in names:
        out[name] = [round(sum(r[name] for r in w) / len(w), 4) for w in windows]
    return out


def evaluations(eval_records: list[dict]) -> list[dict]:
    """One ``{"step", "box_AP", "box_AP50", ..., "mask_AP75"}`` per evaluation."""
    rows = []
    for r in eval_records:
        row = {"step": r["step"]}
        for kind, prefix in (("bbox", "box"), ("segm", "mask")):
            row.update({f"{prefix}_{m}": r[kind][m] for m in METRICS if kind in r})
        rows.append(row)
    return rows


def record(run_dir: str | Path, what: str | None = None, command: str | None = None) -> dict:
    """The results record of the run in ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = distributed.read_jsonl(run_dir / "metrics.jsonl")
    evals = evaluations([r for r in lines if r["kind"] == "eval"])
    steps = [r for r in lines if r["kind"] == "train"]
    command = command or _command(run["command"])
    return {"status": "measured", "what": what or WHAT.get(run["run"]["name"], run["run"]["name"]),
            "command": command, "resumed": "--resume" in command.split(),
            "machine": run["machine"], "device": run["device"], "settings": run["run"],
            "steps": summary["steps"], "train_s": round(sum(r["time"] for r in steps), 1),
            "wall_s_last_session": summary["wall_s_this_session"],
            "images_per_s_median": summary["images_per_s_median"],
            "final": evals[-1] if evals else None, "evaluations": evals,
            "curve": curve(steps)}


def _command(argv: list[str]) -> str:
    """``run.json``'s ``sys.argv`` as the user typed it: ``python -m course_lib.train ...``, no absolute path."""
    first = "python -m course_lib.train" if Path(argv[0]).name in ("train.py", "train_cli.py") else Path(argv[0]).name
    return " ".join([first, *argv[1:]])


def write(path: str | Path, rec: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rec, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_json")
    parser.add_argument("--what", help="one sentence: what this run is and is not (default: the preset's, WHAT)")
    parser.add_argument("--command", help="the command that made the run (default: run.json's)")
    args = parser.parse_args()
    rec = record(args.run_dir, args.what, args.command)
    write(args.out_json, rec)
    final = rec["final"] or {}
    print(f"wrote {args.out_json}: {rec['steps']} steps, {rec['train_s']:.0f} s of training steps, box AP50 "
          f"{final.get('box_AP50', float('nan')):.3f}, mask AP50 {final.get('mask_AP50', float('nan')):.3f}")


if __name__ == "__main__":
    main()
