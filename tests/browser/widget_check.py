"""The one check every widget notebook gets: run it in JupyterLab as a person would, move one
slider with the keyboard, and compare what the page shows with what the library computes.

Public names: ``WidgetSpec``, ``check_widget_notebook``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pages


@dataclass(frozen=True)
class WidgetSpec:
    """One widget notebook and what to do in it.

    ``expected(values)`` gets the shown value of every widget whose class starts with
    ``prefix`` (``pages.widget_values``) and returns the read-out text the library computes
    for them, or a list of strings the read-out must contain.
    """
    name: str                      # artifact file prefix, e.g. "02_anchors"
    notebook: str                  # path under the served root, e.g. "notebooks/02_x.ipynb"
    prefix: str                    # "course-anchor-"
    slider: str                    # the class of the slider to move
    readout: str                   # the class of the read-out
    expected: Callable[[dict[str, str]], str | list[str]]
    key: str = "ArrowRight"
    presses: int = 1


def _check_readout(spec: WidgetSpec, values: dict[str, str], text: str) -> None:
    expected = spec.expected(values)
    if isinstance(expected, str):
        assert text == expected, f"read-out {text!r} != library {expected!r} for {values}"
    else:
        missing = [part for part in expected if part not in text]
        assert not missing, f"read-out {text!r} lacks library values {missing} for {values}"


def check_widget_notebook(page, server, spec: WidgetSpec, artifacts: Path) -> dict:
    """Open, Run All, check the widgets rendered, move the slider, check read-out and figure.
    Returns the values before and after (for the test's own extra assertions)."""
    pages.open_notebook(page, server.url(spec.notebook))
    pages.run_all_and_wait(page)
    pages.assert_cells_ok(page)
    pages.assert_widgets_rendered(page)
    slider = pages.slider(page, spec.slider)
    slider.scroll_into_view_if_needed()
    before = pages.widget_values(page, spec.prefix)
    text_before = pages.readout_text(page, spec.readout)
    _check_readout(spec, before, text_before)
    src_before = pages.figure_src(page, slider)
    area = slider.locator("xpath=ancestor::div[contains(@class,'jp-Cell')][1]")
    area.screenshot(path=str(artifacts / f"{spec.name}-before.png"))

    pages.press_slider(slider, spec.key, spec.presses)
    text_after = pages.wait_changed(lambda: pages.readout_text(page, spec.readout), text_before)
    after = pages.widget_values(page, spec.prefix)
    assert after[spec.slider] != before[spec.slider], f"slider did not move: {before} -> {after}"
    pages.wait_changed(lambda: pages.figure_src(page, slider), src_before)
    text_after = pages.readout_text(page, spec.readout)  # settled
    after = pages.widget_values(page, spec.prefix)
    _check_readout(spec, after, text_after)
    page.wait_for_timeout(300)  # let the new PNG paint before the screenshot
    area.screenshot(path=str(artifacts / f"{spec.name}-after.png"))
    return {"before": before, "after": after, "text_before": text_before, "text_after": text_after}
