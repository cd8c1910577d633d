"""Playwright steps a person takes in JupyterLab: open a notebook, Run All, wait for the kernel,
look at the widgets, move a slider with the keyboard, read the read-out and the figure.

Public names: ``open_notebook``, ``run_all_and_wait``, ``assert_cells_ok``,
``assert_widgets_rendered``, ``page_warnings``, ``slider``, ``slider_value``, ``press_slider``,
``readout_text``, ``figure_src``, ``wait_changed``, ``widget_values``.
"""
from __future__ import annotations

import os
import re
import time

from playwright.sync_api import Locator, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

KERNEL_IDLE = "Python 3 (ipykernel) | Idle"
BAD_WIDGET_TEXT = ("Loading widget...", "Error displaying widget")
_DONE_PROMPT = re.compile(r"^\[\d+\]:$")
_WIDGET_REPR = r"/^(VBox|HBox|Box|GridBox|Tab|Accordion|interactive|Output|HTML|Label|IntSlider|FloatSlider|Dropdown|Checkbox|Button|Image)\(/"


def open_notebook(page: Page, url: str, timeout_s: float = 90) -> None:
    """Open a notebook and wait until its kernel exists and is idle (the status bar says so).

    The toolbar's indicator reads idle before the kernel has started, and a Run All clicked
    then is silently dropped; the status bar's kernel name + "Idle" appears only once it runs.
    """
    page.goto(url)
    _visible(page.locator(".jp-Notebook").first, f"notebook {url.split('?')[0]} did not open",
             timeout_s)
    _visible(page.get_by_text(KERNEL_IDLE, exact=True),
             f"status bar never read {KERNEL_IDLE!r} (kernel did not start)", timeout_s)


def _prompts(page: Page) -> list[str]:
    """The input prompt of every code cell with source, as JupyterLab shows it: `[3]:`, `[*]:`..."""
    return page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]
        .filter(c => (c.querySelector('.cm-content')?.innerText || '').trim().length > 0)
        .map(c => (c.querySelector('.jp-InputPrompt')?.innerText || '').trim())""")


def _menu(page: Page, menu: str, item: str) -> None:
    page.get_by_role("menuitem", name=menu, exact=True).click()
    page.get_by_role("menuitem", name=re.compile("^" + re.escape(item))).click()


def run_all_and_wait(page: Page, timeout_s: float | None = None) -> None:
    """Edit > Clear Outputs of All Cells, then Run > Run All Cells; wait until no cell is queued
    (`[*]:`) and the kernel has been idle for 1.5 s (at most ``COURSE_BROWSER_RUN_TIMEOUT`` s,
    default 480: a quick-mode chapter takes < 90 s on an idle 2-core machine).

    Clearing first turns the saved prompts into `[ ]:`, so a numbered prompt proves this run
    executed it; a cell that fails stops Run All, and ``assert_cells_ok`` names what was left.
    """
    timeout_s = timeout_s or float(os.environ.get("COURSE_BROWSER_RUN_TIMEOUT", 480))
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    _menu(page, "Edit", "Clear Outputs of All Cells")
    _menu(page, "Run", "Run All Cells")
    start = time.monotonic()
    deadline, idle_since = start + timeout_s, None
    while time.monotonic() < deadline:
        prompts = _prompts(page)
        started = any(p == "[*]:" or _DONE_PROMPT.match(p) for p in prompts)
        if not started and time.monotonic() - start > 30:
            raise AssertionError(f"Run All did nothing within 30 s; prompts: {prompts}")
        settled = started and "[*]:" not in prompts
        if settled and page.get_by_text(KERNEL_IDLE, exact=True).is_visible():
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.5:
                return
        else:
            idle_since = None
        page.wait_for_timeout(250)
    raise AssertionError(f"cells still not run after {timeout_s} s; prompts: {_prompts(page)}")


def assert_cells_ok(page: Page) -> None:
    """No traceback in any output and no code cell left unrun (`[ ]:`, `[*]:`)."""
    errors = page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output')]
        .map(o => o.innerText).filter(t => /Traceback \\(most recent call last\\)|^\\w*Error: /m.test(t))""")
    assert not errors, f"error output in the notebook:\n{errors[0][:2000]}"
    prompts = _prompts(page)
    assert prompts and all(_DONE_PROMPT.match(p) for p in prompts), f"unrun cells: {prompts}"


def page_warnings(page: Page) -> list[str]:
    """Warnings a learner would see: untrusted notebook, widget not rendered, no renderer."""
    found = []
    body = page.locator("body").inner_text()
    for text in (*BAD_WIDGET_TEXT, "No renderer could be found", "not trusted"):
        if text.lower() in body.lower():
            found.append(text)
    untrusted = page.locator('[title*="not trusted" i]')
    if untrusted.count():
        found.append(f"status bar: {untrusted.first.get_attribute('title')}")
    # A saved widget view with no renderer (extension missing, or notebook untrusted) falls back
    # to its text/plain repr.
    reprs = page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output')]
        .map(o => o.innerText.trim()).filter(t => _WIDGET_REPR.test(t))""".replace(
        "_WIDGET_REPR", _WIDGET_REPR))
    found += [f"widget shown as text: {text[:80]}" for text in reprs]
    return found


def assert_widgets_rendered(page: Page, min_count: int = 1, timeout_s: float = 30) -> Locator:
    """At least ``min_count`` live widget views, and no "Loading widget..." / "Error displaying
    widget" text anywhere. Returns the widget locator."""
    widgets = page.locator(".jp-OutputArea-output .jupyter-widgets")
    try:
        widgets.first.wait_for(state="visible", timeout=timeout_s * 1000)
    except PlaywrightTimeoutError:
        shown = [w for w in page_warnings(page) if w.startswith("widget shown as text")]
        raise AssertionError(
            f"no live widget rendered within {timeout_s} s: is the ipywidgets lab extension "
            f"(@jupyter-widgets/jupyterlab-manager) installed and enabled? {shown[:2]}") from None
    assert widgets.count() >= min_count, f"{widgets.count()} widgets, expected >= {min_count}"
    body = page.locator("body").inner_text()
    for text in BAD_WIDGET_TEXT:
        assert text not in body, f"page shows {text!r}"
    return widgets


def _visible(locator: Locator, message: str, timeout_s: float = 30) -> None:
    try:
        locator.wait_for(state="visible", timeout=timeout_s * 1000)
    except PlaywrightTimeoutError:
        raise AssertionError(f"{message} (waited {timeout_s} s)") from None


def slider(page: Page, css_class: str) -> Locator:
    """The slider widget carrying ``css_class`` (set in the notebook with ``add_class``)."""
    found = page.locator(f".{css_class}")
    _visible(found.first, f"no element with class .{css_class} (add_class in the notebook?)")
    assert found.count() == 1, f"{found.count()} elements carry .{css_class}, expected 1"
    return found.first


def slider_value(widget: Locator) -> float:
    """The value the slider's read-out shows (IntSlider and FloatSlider alike)."""
    return float(widget.locator(".widget-readout").inner_text().strip())


def press_slider(widget: Locator, key: str = "ArrowRight", times: int = 1) -> None:
    """Focus the slider's handle and press a key, as a keyboard user moves it one step."""
    handle = widget.locator(".noUi-handle").first
    handle.focus()
    for _ in range(times):
        handle.press(key)


def readout_text(page: Page, css_class: str) -> str:
    found = page.locator(f".{css_class}")
    _visible(found.first, f"no read-out with class .{css_class}")
    return found.first.inner_text().strip()


def figure_src(page: Page, near: Locator) -> str:
    """The ``src`` of the first matplotlib PNG in the output area that holds ``near``."""
    area = near.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea')][1]")
    img = area.locator("img").first
    _visible(img, "no figure (<img>) in the widget's output area")
    return img.get_attribute("src")


def wait_changed(read, before, what: str, timeout_s: float = 30):
    """Poll ``read()`` until it differs from ``before``; return the new value (or fail, saying
    ``what`` did not change)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = read()
        if now != before:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{what} did not change within {timeout_s} s (still {str(before)[:60]}...)")


def widget_values(page: Page, prefix: str) -> dict[str, str]:
    """The shown value of every widget whose class starts with ``prefix`` (e.g. ``course-roi-``),
    keyed by the class: slider read-outs, checkbox state, dropdown selection, text."""
    return page.evaluate("""(prefix) => {
        const out = {};
        for (const el of document.querySelectorAll(`[class*="${prefix}"]`)) {
            const cls = [...el.classList].find(c => c.startsWith(prefix));
            if (!cls) continue;
            const readout = el.querySelector('.widget-readout');
            const box = el.querySelector('input[type=checkbox]');
            const select = el.querySelector('select');
            const input = el.querySelector('input[type=text], input[type=number], textarea');
            if (readout) out[cls] = readout.innerText.trim();
            else if (box) out[cls] = box.checked ? 'true' : 'false';
            else if (select) out[cls] = select.options[select.selectedIndex]?.text ?? '';
            else if (input) out[cls] = input.value;
            else out[cls] = el.innerText.trim();
        }
        return out;
    }""", prefix)
