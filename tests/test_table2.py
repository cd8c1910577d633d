"""Table 2's statistics over seeds, against values worked by hand."""
from course_lib import table2


def test_summarize_mean_standard_error_and_not_applicable():
    runs = [{"variant": "a", "status": "ok", "mask": {"AP": 0.1, "APl": -1.0}},
            {"variant": "a", "status": "ok", "mask": {"AP": 0.3, "APl": 0.5}},
            {"variant": "a", "status": "ok", "steps_factor": 1.5, "mask": {"AP": 0.9}},   # a plateau run
            {"variant": "a", "status": "failed"},
            {"variant": "b", "status": "ok", "mask": {"AP": 0.2}}]
    summary = table2.summarize(runs, "mask")
    mean, se, n = summary["a"]["AP"]
    assert (round(mean, 6), round(se, 6), n) == (0.2, 0.1, 2)   # sample std 0.1 * sqrt(2), over sqrt(2)
    assert summary["a"]["APl"] == (0.5, 0.0, 1) and summary["b"]["AP"] == (0.2, 0.0, 1)
    assert table2.summarize(runs, "mask", steps_factor=1.5)["a"]["AP"] == (0.9, 0.0, 1)


def test_paired_gap_and_plateau_by_hand():
    def run(variant, seed, ap, factor=1.0):
        return {"variant": variant, "seed": seed, "status": "ok", "steps_factor": factor, "mask": {"AP": ap}}
    runs = [run("a", 0, 0.30), run("a", 1, 0.34), run("b", 0, 0.20), run("b", 1, 0.28), run("b", 2, 0.9),
            run("a", 0, 0.31, 1.5)]
    mean, se, n = table2.paired_gap(runs, "a", "b")      # seed 2 has no pair: differences 0.10, 0.06
    assert (round(mean, 6), round(se, 6), n) == (0.08, 0.02, 2)
    assert table2.plateau(runs) == {"a": (0.30, 0.31, 0)}
    runs += [run("b", 0, 0.27, 1.5)]
    assert [round(x, 6) for x in table2.paired_gap(runs, "a", "b", steps_factor=1.5)] == [0.04, 0.0, 1]   # 0.31 - 0.27
