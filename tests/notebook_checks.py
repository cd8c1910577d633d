"""Read-only checks of a committed chapter's outputs: each rule takes a notebook dict and returns
a list of problems (empty when the rule is met), so the rules are tested on small synthetic
notebooks as well as run over notebooks/.

Why: chapters are committed executed in the default mode (COURSE_DESIGN.md, Conventions), and
their prose leans on what the cells print. A claim that does not hold, a claim cell left
unexecuted, outputs from a quick run, an error, or a chapter slower than it says it is would
each leave a sentence that the outputs no longer back. The verdict lines come from
``course_lib.claims``; its prefixes are imported, not copied.
"""
from __future__ import annotations

import re

from course_lib import claims

CLAIM_PREFIXES = (claims.HOLDS, claims.DOES_NOT_HOLD, claims.NOT_CHECKED, claims.PENDING)
CLAIM_CALL = re.compile(r"claims\.check\(|\.check\(\)")  # claims.check(...) or timer.check()
# ChapterTimer.check's statement and evidence: "ran within the stated 7 min ... (measured 5.9 min"
TIMER_LINE = re.compile(r"ran within the stated ([\d.]+) min\b(?:.*\(measured ([\d.]+) min)?")


def _text(value: str | list[str]) -> str:
    """nbformat stores multi-line strings either whole or as a list of lines."""
    return value if isinstance(value, str) else "".join(value)


def code_cells(nb: dict) -> list[tuple[int, dict]]:
    """(index among all cells, cell) for every code cell."""
    return [(i, cell) for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"]


def output_lines(cell: dict) -> list[str]:
    """The printed lines of a code cell: streams and the plain-text form of results."""
    texts = [_text(out.get("text", "")) + _text(out.get("data", {}).get("text/plain", ""))
             for out in cell.get("outputs", [])]
    return "\n".join(texts).splitlines()


def _cells_with_line(nb: dict, matches, message: str) -> list[str]:
    """One problem per code cell that prints a line for which ``matches(line)`` is true."""
    problems = []
    for i, cell in code_cells(nb):
        hits = [line for line in output_lines(cell) if matches(line)]
        if hits:
            problems.append(f"cell {i}: {message}: {hits[0].strip()!r}")
    return problems


def false_claims(nb: dict) -> list[str]:
    return _cells_with_line(nb, lambda line: line.startswith(claims.DOES_NOT_HOLD), "a claim does not hold")


def unchecked_claims(nb: dict) -> list[str]:
    return _cells_with_line(nb, lambda line: line.startswith(claims.NOT_CHECKED),
                            "a claim was not checked (committed from a quick-mode run)")


def is_quick_mode_line(line: str) -> bool:
    """The chapters' first-cell mode lines, e.g. 'quick mode (COURSE_QUICK=1): ...' and
    'mode: quick (COURSE_QUICK=1: ...)', as the before-stop hook detects them."""
    stripped = line.lstrip()
    return stripped.startswith(("quick mode", "mode: quick")) or "(COURSE_QUICK=1" in line


def quick_mode_outputs(nb: dict) -> list[str]:
    return _cells_with_line(nb, is_quick_mode_line, "outputs were made in quick mode")


def claim_cells_without_verdict(nb: dict) -> list[str]:
    """A cell that calls claims.check( or timer.check() but shows no verdict line."""
    return [f"cell {i}: calls a claim check but prints no verdict (not executed?)"
            for i, cell in code_cells(nb)
            if CLAIM_CALL.search(_text(cell["source"]))
            and not any(line.startswith(CLAIM_PREFIXES) for line in output_lines(cell))]


def error_outputs(nb: dict) -> list[str]:
    return [f"cell {i}: error output {out.get('ename')}: {out.get('evalue')}"
            for i, cell in code_cells(nb) for out in cell.get("outputs", [])
            if out["output_type"] == "error"]


def unexecuted_cells(nb: dict) -> list[str]:
    """A notebook with no outputs at all, and code cells never run (execution_count null).
    Cells that print nothing (imports, definitions) are fine; blank cells are never run."""
    cells = [(i, cell) for i, cell in code_cells(nb) if _text(cell["source"]).strip()]
    problems = [f"cell {i}: not executed (execution_count is null)"
                for i, cell in cells if cell.get("execution_count") is None]
    if cells and not any(cell.get("outputs") for _, cell in cells):
        problems.insert(0, "no code cell has outputs: committed unexecuted (run `make notebooks`)")
    return problems


def timer_problems(nb: dict) -> list[str]:
    """Every chapter states its default-mode run time (claims.ChapterTimer) and checks it in its
    last code cell; the measured time must not exceed the stated one."""
    found = [(i, TIMER_LINE.search(line)) for i, cell in code_cells(nb) for line in output_lines(cell)
             if line.startswith(CLAIM_PREFIXES) and TIMER_LINE.search(line)]
    if not found:
        return ["no chapter timer: state the run time with claims.ChapterTimer(stated_minutes=...) "
                "in the first code cell and call timer.check() in the last"]
    return [f"cell {i}: ran {match[2]} min, more than its stated {match[1]} min"
            for i, match in found if match[2] is not None and float(match[2]) > float(match[1])]


RULES = (false_claims, claim_cells_without_verdict, unchecked_claims, quick_mode_outputs,
         error_outputs, unexecuted_cells, timer_problems)


def notebook_problems(nb: dict) -> list[str]:
    """Every rule's problems, in the order of RULES."""
    return [problem for rule in RULES for problem in rule(nb)]
