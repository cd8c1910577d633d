"""The committed chapters back every sentence with their own outputs.

Each committed notebook must hold no false claim, no claim left unchecked or unexecuted, no
outputs of a quick run, no error, no unexecuted cell, and a chapter timer whose measured time is
within the stated one (the rules: tests/notebook_checks.py). The rules are tested on synthetic
notebooks whose verdict lines are printed by course_lib.claims itself, so the lines the rules
read and the lines the module prints cannot drift apart.
"""
import contextlib
import copy
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import notebook_checks as checks
from course_lib import claims

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(ROOT.glob("notebooks/[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_committed_notebook_backs_its_claims(path):
    problems = checks.notebook_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


# --- what claims prints (the lines the checks read) -----------------------------------------

def run(fn, *args, **kwargs) -> tuple[object, str]:
    """fn's result and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def printed(fn, *args, **kwargs) -> str:
    return run(fn, *args, **kwargs)[1]


@pytest.fixture
def default_mode(monkeypatch):
    monkeypatch.delenv("COURSE_QUICK", raising=False)  # `make test` runs in quick mode


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")


def test_check_prints_one_verdict_line(default_mode):
    assert printed(claims.check, "AP50 reaches 0.9", 0.933 >= 0.9, "AP50 0.933 >= 0.9") == \
        "claim holds: AP50 reaches 0.9 (AP50 0.933 >= 0.9)\n"
    assert printed(claims.check, "AP50 reaches 0.9", 0.85 >= 0.9, "AP50 0.850 < 0.9") == \
        "CLAIM DOES NOT HOLD: AP50 reaches 0.9 (AP50 0.850 < 0.9)\n"
    assert run(claims.check, "s", np.float32(2) > 1, "e")[0] is True
    assert run(claims.check, "s", torch.tensor(1.0) < 0, "e")[0] is False


def test_check_in_quick_mode_says_not_checked(quick):
    assert printed(claims.check, "AP50 reaches 0.9", False, "AP50 0.1 < 0.9") == \
        "claim not checked (quick mode): AP50 reaches 0.9\n"
    assert run(claims.check, "s", True, "e")[0] is None


def test_pending_names_the_claim_and_the_command(default_mode, monkeypatch):
    line = "claim pending, its results are not recorded yet: RoIAlign beats RoIPool (record them with: make grid)\n"
    assert printed(claims.pending, "RoIAlign beats RoIPool", "make grid") == line
    monkeypatch.setenv("COURSE_QUICK", "1")
    assert printed(claims.pending, "RoIAlign beats RoIPool", "make grid") == line


def test_chapter_timer_states_and_checks_its_time(default_mode):
    timer, start = run(claims.ChapterTimer, stated_minutes=7)
    assert start == "default mode: this chapter takes at most about 7 min on a 2-core CPU\n"
    assert printed(timer.check) == \
        "claim holds: ran within the stated 7 min on a 2-core CPU (measured 0.0 min <= 7)\n"
    timer.start -= 7.5 * 60  # as if the chapter had run 7.5 minutes
    assert printed(timer.check).startswith(claims.DOES_NOT_HOLD)
    with pytest.raises(ValueError, match="stated_minutes"):
        claims.ChapterTimer(stated_minutes=0)


def test_chapter_timer_in_quick_mode_is_not_checked(quick):
    timer, start = run(claims.ChapterTimer, stated_minutes=7)
    assert start.startswith("quick mode (COURSE_QUICK=1): not timed")
    assert printed(timer.check).startswith(claims.NOT_CHECKED)


# --- the checks on synthetic notebooks -----------------------------------------------------

def code(source: str, text: str | None = None, count: int | None = 1) -> dict:
    outputs = [new_output("stream", name="stdout", text=text)] if text else []
    return new_code_cell(source, execution_count=count, outputs=outputs)


@pytest.fixture
def good(default_mode) -> dict:
    """A chapter as it should be committed: timer, a claim, a silent definitions cell, timer check."""
    timer, timer_start = run(claims.ChapterTimer, stated_minutes=7)
    timer.start -= 5.9 * 60  # as if the chapter had run 5.9 minutes
    return new_notebook(cells=[
        new_markdown_cell("# A chapter"),
        code("timer = claims.ChapterTimer(stated_minutes=7)", timer_start, 1),
        code("def double(x):\n    return 2 * x", None, 2),
        code('claims.check("AP50 reaches 0.9", ap50 >= 0.9, f"AP50 {ap50:.3f} >= 0.9")',
             printed(claims.check, "AP50 reaches 0.9", True, "AP50 0.933 >= 0.9"), 3),
        code("", None, None),  # a blank cell is never executed
        code("timer.check()", printed(timer.check), 4),
    ])


def test_good_notebook_has_no_problems(good):
    assert checks.notebook_problems(good) == []


def planted(nb: dict, index: int, cell: dict) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"][index] = cell
    return nb


def test_fails_on_a_planted_false_claim(good):
    verdict = printed(claims.check, "AP50 reaches 0.9", False, "AP50 0.850 < 0.9")
    bad = planted(good, 3, code("claims.check(...)", verdict))
    assert checks.false_claims(bad) == [
        "cell 3: a claim does not hold: 'CLAIM DOES NOT HOLD: AP50 reaches 0.9 (AP50 0.850 < 0.9)'"]
    assert checks.notebook_problems(bad) == checks.false_claims(bad)


def test_fails_on_a_claim_cell_without_verdict(good):
    assert checks.claim_cells_without_verdict(planted(good, 3, code("claims.check(...)"))) == \
        ["cell 3: calls a claim check but prints no verdict (not executed?)"]
    assert checks.claim_cells_without_verdict(planted(good, 5, code("timer.check()", "5.9 min\n"))) == \
        ["cell 5: calls a claim check but prints no verdict (not executed?)"]


def test_a_pending_claim_is_a_verdict_not_a_pass(good):
    line = printed(claims.pending, "RoIAlign beats RoIPool", "make grid")
    nb = planted(good, 3, code('if not recorded:\n    claims.pending(...)\nelse:\n    claims.check(...)', line))
    assert checks.notebook_problems(nb) == []
    assert not line.startswith(claims.HOLDS)


def test_fails_on_claims_and_outputs_from_quick_mode(good, monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "1")
    bad = planted(good, 3, code("claims.check(...)", printed(claims.check, "AP50 reaches 0.9", True, "")))
    assert checks.unchecked_claims(bad) == [
        "cell 3: a claim was not checked (committed from a quick-mode run): "
        "'claim not checked (quick mode): AP50 reaches 0.9'"]
    bad = planted(good, 1, code("timer = ...", printed(claims.ChapterTimer, stated_minutes=7)))
    assert checks.quick_mode_outputs(bad) == [
        "cell 1: outputs were made in quick mode: 'quick mode (COURSE_QUICK=1): not timed; "
        "the default mode takes at most about 7 min on a 2-core CPU'"]


@pytest.mark.parametrize("line", ["mode: quick (COURSE_QUICK=1: small sets, for CI)",
                                  "quick mode (COURSE_QUICK=1): small, fast runs"])
def test_fails_on_the_chapters_own_quick_mode_lines(good, line):
    bad = planted(good, 2, code("print(mode)", line + "\n"))
    assert checks.quick_mode_outputs(bad) == [f"cell 2: outputs were made in quick mode: {line!r}"]


def test_quick_mode_check_ignores_default_lines():
    for line in ["mode: default (full)", "default mode: the `cpu` run, a few minutes",
                 '    """True when ``COURSE_QUICK`` is set to 1/true/yes"""', "--config {cpu,gpu,quick}"]:
        assert not checks.is_quick_mode_line(line), line


def test_fails_on_an_error_output(good):
    cell = code("1 / 0")
    cell["outputs"] = [new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                  traceback=[])]
    assert checks.error_outputs(planted(good, 2, cell)) == [
        "cell 2: error output ZeroDivisionError: division by zero"]


def test_fails_on_unexecuted_cells(good):
    assert checks.unexecuted_cells(planted(good, 2, code("def double(x): ...", None, None))) == \
        ["cell 2: not executed (execution_count is null)"]
    cleared = copy.deepcopy(good)
    for cell in cleared["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
    assert checks.unexecuted_cells(cleared)[0].startswith("no code cell has outputs")


def test_fails_on_a_chapter_without_timer(good):
    nb = copy.deepcopy(good)
    del nb["cells"][5], nb["cells"][1]
    assert checks.timer_problems(nb)[0].startswith("no chapter timer")


def test_fails_on_a_chapter_slower_than_stated(good):
    # A hand-typed verdict: the time rule reads the numbers, not the prefix.
    typed = f"{claims.HOLDS}ran within the stated 7 min on a 2-core CPU (measured 8.2 min <= 7)\n"
    bad = planted(good, 5, code("timer.check()", typed))
    assert checks.timer_problems(bad) == ["cell 5: ran 8.2 min, more than its stated 7 min"]
