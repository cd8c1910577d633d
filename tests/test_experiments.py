"""The ablation runner: complete records, resume without redoing runs, a crash recorded as failed."""
import dataclasses
import json

import pytest
import torch

from course_lib import data, evaluate, experiments, table2, utils

TINY = experiments.Settings.quick()


def test_grid_has_the_papers_rows():
    grid = experiments.ablation_grid()
    assert {g["stride"] for g in grid.values()} == {16, 32}
    s16 = {(g.get("pooler", "roi_align"), g.get("mask_loss", "sigmoid")) for g in grid.values() if g["stride"] == 16}
    assert s16 == {("roi_align", "sigmoid"), ("roi_align", "softmax"), ("roi_align", "sigmoid_agnostic"),
                   ("roi_pool", "sigmoid"), ("roi_warp", "sigmoid"), ("roi_align_max", "sigmoid")}
    assert {g.get("pooler", "roi_align") for g in grid.values() if g["stride"] == 32} == {"roi_pool", "roi_align"}
    assert set(table2.PAPER_ROW) == set(grid) and set(table2.PAPER_ROW.values()) <= set(table2.PAPER_TABLE2)


def test_plan_runs_every_seed_then_the_longer_plateau_runs():
    runs = experiments.plan({"a": {}, "b": {}}, seeds=(0, 1), plateau_seeds=(0,))
    assert runs == [("a", 0, 1.0), ("b", 0, 1.0), ("a", 1, 1.0), ("b", 1, 1.0), ("a", 0, 1.5), ("b", 0, 1.5)]


def test_records_curves_resume_and_failure(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    grid = {"align": {"pooler": "roi_align"}, "soft": {"mask_loss": "softmax"}, "broken": {"pooler": "no_such_pooler"}}
    records = experiments.run_grid(grid, out, seeds=(0,), settings=TINY, command="test", progress=False,
                                   plateau_seeds=())
    by_name = {r["variant"]: r for r in records}
    align = by_name["align"]
    assert align["status"] == "ok" and align["steps"] == 4 and align["steps_factor"] == 1.0
    assert set(align["box"]) == set(evaluate.METRICS) == set(align["mask"])
    assert set(align["mask_scaled"]) == {"APs", "APm", "APl"} == set(align["box_scaled"])
    assert [c["step"] for c in align["curve"]] == [2, 4]                  # curve_points=2 in quick settings
    assert {"box_AP", "box_AP50", "mask_AP", "mask_AP50", "mask_AP75"} <= set(align["curve"][0])
    assert align["curve"][-1]["mask_AP"] == align["mask"]["AP"]          # the last point is the final metric
    assert align["config"]["pooler"] == "roi_align" and {"cpu", "gpu", "torch"} <= set(align["machine"])
    assert "mask_argmax" in by_name["soft"] and "mask_argmax" not in align  # both decision rules for softmax
    assert by_name["broken"]["status"] == "failed" and "no_such_pooler" in by_name["broken"]["error"]
    saved = json.loads(out.read_text())
    assert saved["command"] == "test" and len(saved["runs"]) == 3 and "machine" in saved
    assert saved["settings"] == json.loads(json.dumps(dataclasses.asdict(TINY)))

    # A second call finds every run done: it must train nothing and keep the file as it was.
    def must_not_train(*args, **kwargs):
        raise AssertionError("resume re-ran a finished run")
    monkeypatch.setattr(experiments, "run_one", must_not_train)
    before = out.read_text()
    again = experiments.run_grid(grid, out, seeds=(0,), settings=TINY, progress=False, plateau_seeds=())
    assert [(r["variant"], r["seed"], r["status"]) for r in again] == [
        (r["variant"], r["seed"], r["status"]) for r in records]
    assert out.read_text() == before


def test_resume_runs_only_missing_seeds_and_plateau_runs(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    calls = []
    monkeypatch.setattr(experiments, "run_one", lambda changes, seed, settings, factor=1.0, device=None, run_dir=None:
                        calls.append((seed, factor)) or {"box": {}, "mask": None})
    experiments.run_grid({"v": {}}, out, seeds=(0,), settings=TINY, progress=False, plateau_seeds=())
    experiments.run_grid({"v": {}}, out, seeds=(0, 1, 2), settings=TINY, progress=False, plateau_seeds=(0,))
    assert calls == [(0, 1.0), (1, 1.0), (2, 1.0), (0, 1.5)]
    assert [(r["seed"], r["steps"]) for r in json.loads(out.read_text())["runs"]] == [(0, 4), (1, 4), (2, 4), (0, 6)]


def test_a_run_stopped_midway_resumes_from_its_checkpoint(tmp_path):
    """A session that ends mid-run costs at most CHECKPOINT_EVERY steps: the next call goes on, bit for bit."""
    whole = experiments.run_grid({"v": {}}, tmp_path / "whole.json", seeds=(0,), settings=TINY, progress=False,
                                 plateau_seeds=())[0]
    checkpoints_dir = tmp_path / "runs"
    experiments.train_variant({}, 0, TINY, run_dir=checkpoints_dir / "v-seed0-4steps", stop_at=2)  # stopped at 2 of 4
    resumed = experiments.run_grid({"v": {}}, tmp_path / "resumed.json", seeds=(0,), settings=TINY, progress=False,
                                   plateau_seeds=(), checkpoints_dir=checkpoints_dir)[0]
    assert (whole["resumed_from_step"], resumed["resumed_from_step"]) == (0, 2)
    assert resumed["final_loss"] == whole["final_loss"] and resumed["curve"] == whole["curve"]
    assert resumed["box"] == whole["box"] and resumed["mask"] == whole["mask"]
    assert not (checkpoints_dir / "v-seed0-4steps").exists()      # its record is saved: the checkpoint goes

    # A checkpoint left by other settings is not silently continued: the run fails and names the field.
    experiments.train_variant({}, 0, TINY, run_dir=checkpoints_dir / "v-seed0-4steps", stop_at=2)
    other = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, lr=TINY.train.lr / 2))
    stale = experiments.run_grid({"v": {}}, tmp_path / "other.json", seeds=(0,), settings=other, progress=False,
                                 plateau_seeds=(), checkpoints_dir=checkpoints_dir)[0]
    assert stale["status"] == "failed" and f"fit.lr: checkpoint {TINY.train.lr}, now {other.train.lr}" in stale["error"]
    assert (checkpoints_dir / "v-seed0-4steps" / "last.pt").exists()  # kept, for whoever reads the error


def test_a_checkpoint_from_another_trunk_is_not_continued(tmp_path, monkeypatch):
    """A run stopped midway and resumed after the trunk was pretrained again (another machine) fails and names
    the trunk, rather than going on from the old trunk's weights under the new trunk's name."""
    settings = dataclasses.replace(TINY, pretrain_steps=1)
    trunk = experiments.model.MaskRCNN(experiments._base(settings)).backbone.state_dict()
    monkeypatch.setattr(experiments, "pretrained_trunk", lambda *a, **k: (trunk, {"trunk": "aaaaaaaaaaaa"}))
    experiments.train_variant({}, 0, settings, run_dir=tmp_path / "runs" / "v-seed0-4steps", stop_at=2)
    monkeypatch.setattr(experiments, "pretrained_trunk", lambda *a, **k: (trunk, {"trunk": "bbbbbbbbbbbb"}))
    stale = experiments.run_grid({"v": {}}, tmp_path / "grid.json", seeds=(0,), settings=settings, progress=False,
                                 plateau_seeds=(), checkpoints_dir=tmp_path / "runs")[0]
    assert stale["status"] == "failed"
    assert "run.trunk: checkpoint 'aaaaaaaaaaaa', now 'bbbbbbbbbbbb'" in stale["error"]


def test_not_a_results_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        experiments.load_records(bad)


def _perturbed_results(coco_gt, jitter, seed=0):
    """Box results from the ground truth, each box shifted by up to ``jitter`` px, scores random."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for ann in coco_gt["annotations"]:
        shift = (torch.rand(4, generator=gen) * 2 - 1) * jitter
        box = [v + float(s) for v, s in zip(ann["bbox"], shift)]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": box,
                        "score": float(torch.rand(1, generator=gen))})
    return results


def test_scaled_ranges_at_640_equal_pycocotools():
    # At COCO's own image size the scaled ranges are COCO's: the numbers must equal pycocotools'.
    coco_gt = data.to_coco(data.ShapesDataset(12, seed=3))
    results = _perturbed_results(coco_gt, jitter=3.0)
    ours = experiments.scaled_area_metrics(coco_gt, results, "bbox", image_size=640)
    theirs = evaluate.coco_metrics(coco_gt, results, "bbox")
    assert ours == {k: theirs[k] for k in ("APs", "APm", "APl")}
    assert theirs["APl"] == -1.0 and 0 < theirs["APs"] < 1     # the caveat: no "large" at 128 px


def test_scaled_ranges_at_128():
    ranges = experiments.scaled_area_ranges(128)
    assert ranges["small"][1] == pytest.approx(6.4 ** 2) and ranges["medium"][1] == pytest.approx(19.2 ** 2)
    assert experiments.scaled_area_ranges(192)["small"][1] == pytest.approx(9.6 ** 2)
    coco_gt = data.to_coco(data.ShapesDataset(12, seed=3))
    areas = [a["area"] for a in coco_gt["annotations"] if not a.get("iscrowd", 0)]
    perfect = _perturbed_results(coco_gt, jitter=0.0)
    got = experiments.scaled_area_metrics(coco_gt, perfect, "bbox", image_size=128)
    for name, (low, high) in zip(("APs", "APm", "APl"), list(ranges.values())[1:]):
        populated = any(low <= a < high for a in areas)
        assert got[name] == pytest.approx(1.0 if populated else -1.0), name
    assert got["APl"] == pytest.approx(1.0)                              # the scaled ranges do have "large" objects
    assert experiments.scaled_area_metrics(coco_gt, [], "bbox", 128) == {"APs": 0.0, "APm": 0.0, "APl": 0.0}


def test_other_settings_refused(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    monkeypatch.setattr(experiments, "run_one",
                        lambda changes, seed, settings, factor=1.0, device=None, run_dir=None: {"box": {}, "mask": None})
    experiments.run_grid({"v": {}}, out, seeds=(0,), settings=TINY, progress=False, plateau_seeds=())
    longer = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=TINY.train.steps + 1))
    with pytest.raises(ValueError, match="settings"):
        experiments.run_grid({"v": {}}, out, seeds=(0, 1), settings=longer, progress=False)


def test_parallel_jobs_give_the_same_records(tmp_path):
    grid = {"align": {"pooler": "roi_align"}, "pool": {"pooler": "roi_pool"}}
    threads = torch.get_num_threads()
    try:
        serial = experiments.run_grid(grid, tmp_path / "serial.json", seeds=(0,), settings=TINY, progress=False,
                                      threads=1, plateau_seeds=())
    finally:
        torch.set_num_threads(threads)
    parallel = experiments.run_grid(grid, tmp_path / "parallel.json", seeds=(0,), settings=TINY, progress=False,
                                    jobs=2, threads=1, plateau_seeds=())
    assert sorted(r["variant"] for r in parallel) == ["align", "pool"]
    by_name = {r["variant"]: r for r in parallel}
    for record in serial:
        twin = by_name[record["variant"]]
        assert twin["status"] == "ok" and twin["machine"]["threads"] == 1
        assert twin["final_loss"] == record["final_loss"]
        assert twin["box"] == record["box"] and twin["mask"] == record["mask"] and twin["curve"] == record["curve"]
    assert len(json.loads((tmp_path / "parallel.json").read_text())["runs"]) == 2


def test_a_longer_schedule_reuses_the_runs_it_would_make(tmp_path, monkeypatch):
    old, new = tmp_path / "steps4.json", tmp_path / "steps6.json"
    experiments.run_grid({"v": {}}, old, seeds=(0, 1), settings=TINY, progress=False, plateau_seeds=(0,))
    longer = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=6))   # its longer runs: 9 steps
    kept = experiments.reusable([old], longer)
    assert [(r["seed"], r["steps"], r["steps_factor"]) for r in kept] == [(0, 6, 1.0)]  # the old 1.5x run
    fresh = experiments.run_grid({"v": {}}, tmp_path / "fresh.json", seeds=(0,), settings=longer, progress=False,
                                 plateau_seeds=())
    assert kept[0]["mask"] == fresh[0]["mask"] and kept[0]["curve"] == fresh[0]["curve"]  # the very run it makes

    calls = []
    monkeypatch.setattr(experiments, "run_one", lambda changes, seed, settings, factor=1.0, device=None, run_dir=None:
                        calls.append((seed, factor)) or {"box": {}, "mask": None})
    records = experiments.run_grid({"v": {}}, new, seeds=(0, 1), settings=longer, progress=False,
                                   plateau_seeds=(0,), reuse=kept)
    assert calls == [(1, 1.0), (0, 1.5)]                                     # seed 0 at 6 steps is not redone
    assert sorted((r["seed"], r["steps"]) for r in records) == [(0, 6), (0, 9), (1, 6)]
    assert len(json.loads(new.read_text())["runs"]) == 3

    other = dataclasses.replace(longer, image_size=TINY.image_size + 8)
    with pytest.raises(ValueError, match="other settings than the steps"):
        experiments.reusable([old], other)
    with pytest.raises(FileNotFoundError, match="no such results file"):
        experiments.reusable([tmp_path / "missing.json"], longer)


def test_command_line_names_a_file_it_cannot_reuse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiments.main(["ablations", "--quick", "--out", str(tmp_path / "new.json"),
                          "--reuse", str(tmp_path / "missing.json")])
    assert exit_.value.code == 2 and "missing.json: no such results file" in capsys.readouterr().err
    assert not (tmp_path / "new.json").exists()


def test_command_line_training_flags_reach_the_recorded_settings(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiments, "run_one", lambda changes, seed, settings, factor=1.0, device=None, run_dir=None:
                        seen.append(settings.train) or {"box": {}, "mask": None})
    out = tmp_path / "adam.json"
    experiments.main(["ablations", "--quick", "--out", str(out), "--seeds", "1", "--plateau-seeds", "0",
                      "--variants", "s16-roi_align", "--optimizer", "adam", "--lr", "0.001", "--schedule", "cosine",
                      "--num-train", "6", "--num-val", "3", "--checkpoints", str(tmp_path / "runs")])
    assert [(t.optimizer, t.lr, t.schedule) for t in seen] == [("adam", 0.001, "cosine")]
    recorded = json.loads(out.read_text())["settings"]
    train = recorded["train"]
    assert (train["optimizer"], train["lr"], train["schedule"]) == ("adam", 0.001, "cosine")
    assert (recorded["num_train"], recorded["num_val"]) == (6, 3)


def test_the_committed_grid_was_made_with_todays_settings():
    """Chapter 08 reads data/results/ablations.json as the grid of ``Settings()``: a new default needs a new grid."""
    stored = json.loads((utils.repo_root() / "data" / "results" / "ablations.json").read_text())["settings"]
    assert experiments.same_settings(stored, experiments.Settings())


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds=0; expected an int >= 1"),
    (["--num-train", "0"], "--num-train=0; expected an int >= 1"),
    (["--pretrain-steps", "-1"], "--pretrain-steps=-1; expected an int >= 0"),
])
def test_command_line_refuses_bad_counts(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        experiments.main(["ablations", "--quick", "--out", str(tmp_path / "bad.json"), *flags])
    assert message in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_command_line_pretrain_steps_zero_trains_from_scratch(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(experiments, "run_one", lambda changes, seed, settings, factor=1.0, device=None, run_dir=None:
                        seen.append(settings.pretrain_steps) or {"box": {}, "mask": None})
    monkeypatch.setattr(experiments, "pretrained_trunk", lambda *a, **k: pytest.fail("pretrained a trunk"))
    out = tmp_path / "scratch.json"
    experiments.main(["ablations", "--out", str(out), "--seeds", "1", "--plateau-seeds", "0", "--pretrain-steps", "0",
                      "--variants", "s16-roi_align", "--checkpoints", str(tmp_path / "runs")])
    assert seen == [0] and json.loads(out.read_text())["settings"]["pretrain_steps"] == 0
