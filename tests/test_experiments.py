"""The ablation runner: complete records, resume without redoing runs, a crash recorded as failed."""
import dataclasses
import json

import pytest
import torch

from course_lib import data, evaluate, experiments, model, presets
from course_lib.config import TrainConfig

TINY = experiments.Settings(TrainConfig(steps=2, batch_size=2, warmup_steps=0), num_train=4, num_val=2)


def test_grid_has_the_papers_rows():
    grid = experiments.ablation_grid()
    assert {g["stride"] for g in grid.values()} == {16, 32}
    assert {(g["pooler"], g["aligned"]) for g in grid.values()} == {
        ("roi_pool", False), ("roi_align", False), ("roi_align", True)}
    assert [g.get("mask_loss", "sigmoid") for g in grid.values()].count("softmax") == 1


def test_records_resume_and_failure(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    grid = {"align": {"pooler": "roi_align"}, "broken": {"pooler": "no_such_pooler"}}
    records = experiments.run_grid(grid, out, seeds=(0,), settings=TINY, command="test",
                                   progress=False, base=presets.quick_config())
    by_name = {r["variant"]: r for r in records}
    assert by_name["align"]["status"] == "ok"
    assert set(by_name["align"]["box"]) == set(evaluate.METRICS)
    assert set(by_name["align"]["mask"]) == set(evaluate.METRICS)
    assert set(by_name["align"]["mask_scaled"]) == {"APs", "APm", "APl"} == set(by_name["align"]["box_scaled"])
    assert by_name["align"]["config"]["pooler"] == "roi_align" and by_name["align"]["steps"] == 2
    assert {"cpu", "gpu", "torch"} <= set(by_name["align"]["machine"])
    assert by_name["broken"]["status"] == "failed" and "no_such_pooler" in by_name["broken"]["error"]
    saved = json.loads(out.read_text())
    assert saved["command"] == "test" and len(saved["runs"]) == 2
    assert saved["settings"] == dataclasses.asdict(TINY) and saved["area_ranges_scaled"]["small"][1] > 0

    # A second call finds every run done: it must train nothing and keep the file as it was.
    def must_not_train(*args, **kwargs):
        raise AssertionError("resume re-ran a finished run")
    monkeypatch.setattr(experiments, "run_one", must_not_train)
    before = out.read_text()
    again = experiments.run_grid(grid, out, seeds=(0,), settings=TINY, progress=False)
    assert [(r["variant"], r["seed"], r["status"]) for r in again] == [
        (r["variant"], r["seed"], r["status"]) for r in records]
    assert out.read_text() == before


def test_resume_runs_only_missing_seeds(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    calls = []
    monkeypatch.setattr(experiments, "run_one",
                        lambda changes, seed, settings, base=None: calls.append(seed) or {"box": {}, "mask": None})
    experiments.run_grid({"v": {}}, out, seeds=(0,), settings=TINY, progress=False)
    experiments.run_grid({"v": {}}, out, seeds=(0, 1, 2), settings=TINY, progress=False)
    assert calls == [0, 1, 2]
    assert [r["seed"] for r in json.loads(out.read_text())["runs"]] == [0, 1, 2]


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
    coco_gt = data.to_coco(data.ShapesDataset(12, seed=3))
    areas = [a["area"] for a in coco_gt["annotations"] if not a.get("iscrowd", 0)]
    perfect = _perturbed_results(coco_gt, jitter=0.0)
    got = experiments.scaled_area_metrics(coco_gt, perfect, "bbox", image_size=128)
    for name, (low, high) in zip(("APs", "APm", "APl"), list(ranges.values())[1:]):
        populated = any(low <= a < high for a in areas)
        assert got[name] == pytest.approx(1.0 if populated else -1.0), name
    assert got["APl"] == pytest.approx(1.0)                              # the scaled ranges do have "large" objects
    assert experiments.scaled_area_metrics(coco_gt, [], "bbox", 128) == {"APs": 0.0, "APm": 0.0, "APl": 0.0}


def test_summarize_mean_std_and_not_applicable():
    runs = [{"variant": "a", "status": "ok", "mask": {"AP": 0.1, "APl": -1.0}},
            {"variant": "a", "status": "ok", "mask": {"AP": 0.3, "APl": 0.5}},
            {"variant": "a", "status": "failed"},
            {"variant": "b", "status": "ok", "mask": {"AP": 0.2}}]
    summary = experiments.summarize(runs, "mask")
    mean, std, n = summary["a"]["AP"]
    assert (round(mean, 6), round(std, 6), n) == (0.2, round(0.1 * 2 ** 0.5, 6), 2)   # sample std
    assert summary["a"]["APl"] == (0.5, 0.0, 1) and summary["b"]["AP"] == (0.2, 0.0, 1)


def test_other_settings_refused(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    monkeypatch.setattr(experiments, "run_one",
                        lambda changes, seed, settings, base=None: {"box": {}, "mask": None})
    experiments.run_grid({"v": {}}, out, seeds=(0,), settings=TINY, progress=False)
    longer = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=TINY.train.steps + 1))
    with pytest.raises(ValueError, match="settings"):
        experiments.run_grid({"v": {}}, out, seeds=(0, 1), settings=longer, progress=False)


def test_parallel_jobs_give_the_same_records(tmp_path):
    grid = {"align": {"pooler": "roi_align"}, "pool": {"pooler": "roi_pool"}}
    threads = torch.get_num_threads()
    try:
        serial = experiments.run_grid(grid, tmp_path / "serial.json", seeds=(0,), settings=TINY, progress=False,
                                      base=presets.quick_config(), threads=1)
    finally:
        torch.set_num_threads(threads)
    parallel = experiments.run_grid(grid, tmp_path / "parallel.json", seeds=(0,), settings=TINY, progress=False,
                                    base=presets.quick_config(), jobs=2, threads=1)
    assert sorted(r["variant"] for r in parallel) == ["align", "pool"]
    by_name = {r["variant"]: r for r in parallel}
    for record in serial:
        twin = by_name[record["variant"]]
        assert twin["status"] == "ok" and twin["machine"]["threads"] == 1
        assert twin["final_loss"] == record["final_loss"]
        assert twin["box"] == record["box"] and twin["mask"] == record["mask"]
    assert len(json.loads((tmp_path / "parallel.json").read_text())["runs"]) == 2
