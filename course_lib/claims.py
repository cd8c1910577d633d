"""Checked claims: a sentence in a chapter that states a direction or a size is backed by code.

The course's rule: a sentence stating a direction or a size ("RoIAlign beats RoIPool", "about
7 minutes") is either printed by a cell or stands next to a checked claim computed from that
cell's results. Verdicts are computed, never typed, so a rerun that changes the numbers changes
the verdict instead of leaving the prose quietly wrong. Each verdict is one line with a fixed
prefix, so ``tests/test_committed_notebooks.py`` can read the committed outputs and fail on a
claim that does not hold. Quick mode (``COURSE_QUICK=1``) runs are too short for default-mode
claims to hold, so there a claim is printed as not checked, never as holding or failing.

A claim over results that are recorded by a separate, long run (chapter 08's grid) and not yet
recorded is printed as pending, with the command that records them: ``pending``.

Public names: ``check``, ``pending``, ``ChapterTimer`` and the line prefixes ``HOLDS``,
``DOES_NOT_HOLD``, ``NOT_CHECKED``, ``PENDING``.
"""
from __future__ import annotations

import time

from course_lib import utils

HOLDS = "claim holds: "
DOES_NOT_HOLD = "CLAIM DOES NOT HOLD: "  # capitals: a failed claim should catch the reader's eye
NOT_CHECKED = "claim not checked (quick mode): "
PENDING = "claim pending, its results are not recorded yet: "


def check(statement: str, holds: bool, evidence: str) -> bool | None:
    """Print one verdict line for ``statement`` and return the verdict.

    Args:
        statement: the sentence the prose relies on, e.g. "box AP50 reaches 0.9".
        holds: the condition computed from the cell's results, e.g. ``ap50 >= 0.9``
            (a Python, NumPy or one-element torch bool).
        evidence: the numbers compared, e.g. ``f"box AP50 {ap50:.3f} >= 0.9"``.

    Returns:
        True or False in the default mode; None in quick mode, where nothing was checked.

    Prints ``claim holds: <statement> (<evidence>)`` or ``CLAIM DOES NOT HOLD: ...`` (a failed
    claim does not raise: the chapter runs on, and the committed-notebook test fails on the line),
    or in quick mode ``claim not checked (quick mode): <statement>``, without evidence, since
    quick numbers say nothing about the default run.
    """
    if utils.quick_mode():
        print(f"{NOT_CHECKED}{statement}")
        return None
    verdict = bool(holds)
    print(f"{HOLDS if verdict else DOES_NOT_HOLD}{statement} ({evidence})")
    return verdict


def pending(statement: str, record_with: str) -> None:
    """Print that ``statement`` cannot be checked because its recorded results are missing.

    Prints ``claim pending, its results are not recorded yet: <statement> (record them with:
    <record_with>)``, in either mode. Why a separate verdict: a chapter that reads a long
    recorded run must still run top to bottom before the run exists, and must say so on the
    claim's own line rather than print nothing, or a verdict it never computed.
    """
    print(f"{PENDING}{statement} (record them with: {record_with})")


class ChapterTimer:
    """States a chapter's default-mode run time in its first code cell and checks it in its last.

    ``timer = claims.ChapterTimer(stated_minutes=7)`` prints the promise ("default mode: this
    chapter takes at most about 7 min on a 2-core CPU"); ``timer.check()`` at the end prints the
    measured wall time as a checked claim, "ran within the stated 7 min on a 2-core CPU
    (measured 5.9 min <= 7)". Why: the README and each chapter tell a learner how long to
    wait, and such a time is a size like any other, so it is measured, not remembered. The
    time is wall clock from the first cell to the last, as ``make notebooks`` runs them.
    """

    def __init__(self, stated_minutes: float, machine: str = "a 2-core CPU"):
        if stated_minutes <= 0:
            raise ValueError(f"stated_minutes must be positive, got {stated_minutes}")
        self.stated_minutes = stated_minutes
        self.machine = machine
        self.start = time.perf_counter()
        if utils.quick_mode():
            print(f"quick mode (COURSE_QUICK=1): not timed; the default mode takes at most "
                  f"about {stated_minutes:g} min on {machine}")
        else:
            print(f"default mode: this chapter takes at most about {stated_minutes:g} min on {machine}")

    def minutes(self) -> float:
        """Wall-clock minutes since the timer started, rounded to the 0.1 min that is printed."""
        return round((time.perf_counter() - self.start) / 60, 1)

    def check(self) -> bool | None:
        """The checked claim that the chapter ran within its stated time (see ``check``)."""
        measured = self.minutes()
        holds = measured <= self.stated_minutes
        return check(f"ran within the stated {self.stated_minutes:g} min on {self.machine}", holds,
                     f"measured {measured:.1f} min {'<=' if holds else '>'} {self.stated_minutes:g}")
