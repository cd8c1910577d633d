"""The ablation runner: complete records, resume without redoing runs, a crash recorded as failed."""
import json

import pytest

from course_lib import experiments, model

TINY = experiments.Settings(steps=2, batch_size=2, num_train=4, num_val=2)


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
                                   progress=False, base=model.quick_config())
    by_name = {r["variant"]: r for r in records}
    assert by_name["align"]["status"] == "ok"
    assert set(by_name["align"]["box"]) == set(experiments.METRICS)
    assert set(by_name["align"]["mask"]) == set(experiments.METRICS)
    assert by_name["align"]["config"]["pooler"] == "roi_align" and by_name["align"]["steps"] == 2
    assert {"cpu", "gpu", "torch"} <= set(by_name["align"]["machine"])
    assert by_name["broken"]["status"] == "failed" and "no_such_pooler" in by_name["broken"]["error"]
    saved = json.loads(out.read_text())
    assert saved["command"] == "test" and len(saved["runs"]) == 2

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
