"""The one check every widget notebook gets: run it in JupyterLab as a person would, move one
slider with the keyboard, and compare what the page shows with what the library computes.

Public names: ``WidgetSpec``, ``check_widget_notebook``.
"""
from __future__ import annotations

import time
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
    slider: str | tuple[str, ...]  # the class of the slider to move (first one on the page)
    readout: str                   # the class of the read-out
    expected: Callable[[dict[str, str]], str | list[str]]
    key: str = "ArrowRight"
    presses: int = 1


def _readout_problem(spec: WidgetSpec, values: dict[str, str], text: str) -> str | None:
    """None when the read-out shows what the library computes for ``values``, else why not."""
    expected = spec.expected(values)
    if isinstance(expected, str):
        return None if text == expected else f"read-out {text!r} != library {expected!r}"
    missing = [part for part in expected if part not in text]
    return None if not missing else f"read-out {text!r} lacks library values {missing}"


def _wait_readout_matches(page, spec: WidgetSpec, timeout_s: float = 30) -> tuple[dict, str]:
    """Poll until the read-out equals the library's value for the widgets' shown values (the
    kernel answers a slider move asynchronously)."""
    deadline, problem = time.monotonic() + timeout_s, "never read"
    while time.monotonic() < deadline:
        values = pages.widget_values(page, spec.prefix)
        text = pages.readout_text(page, spec.readout)
        problem = _readout_problem(spec, values, text)
        if problem is None:
            return values, text
        page.wait_for_timeout(250)
    raise AssertionError(f"{problem} (widget values {values})")


def check_widget_notebook(page, server, spec: WidgetSpec, artifacts: Path) -> dict:
    """Open, Run All, check the widgets rendered, move the slider, check read-out and figure.
    Returns the values and read-outs before and after (for the test's own assertions)."""
    pages.open_notebook(page, server.url(spec.notebook))
    pages.run_all_and_wait(page)
    pages.assert_cells_ok(page)
    pages.assert_widgets_rendered(page)
    before = pages.widget_values(page, spec.prefix)
    candidates = (spec.slider,) if isinstance(spec.slider, str) else spec.slider
    name = next((c for c in candidates if c in before), None)
    assert name, f"none of the sliders {candidates} is on the page; widgets: {sorted(before)}"
    slider = pages.slider(page, name)
    slider.scroll_into_view_if_needed()
    before, text_before = _wait_readout_matches(page, spec)
    src_before = pages.figure_src(page, slider)
    outputs = slider.locator("xpath=ancestor::div[contains(@class,'jp-Cell-outputArea')][1]")
    outputs.screenshot(path=str(artifacts / f"{spec.name}-before.png"))

    pages.press_slider(slider, spec.key, spec.presses)
    pages.wait_changed(lambda: pages.widget_values(page, spec.prefix)[name],
                       before[name], f"slider .{name} after {spec.key}")
    pages.wait_changed(lambda: pages.figure_src(page, slider), src_before,
                       "the figure (is the widget callback raising? see JupyterLab's log console)")
    after, text_after = _wait_readout_matches(page, spec)
    assert after[name] != before[name]
    page.wait_for_timeout(300)  # let the new PNG paint before the screenshot
    outputs.screenshot(path=str(artifacts / f"{spec.name}-after.png"))
    return {"before": before, "after": after, "text_before": text_before, "text_after": text_after}
