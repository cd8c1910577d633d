"""Session fixtures for the browser tests: Debian's Chromium (installed here when missing), one
JupyterLab server on a temporary copy of the notebooks, one headless browser, a fresh page per
test, and a folder of screenshots printed at the end of the run.

Knobs (environment):
- ``COURSE_BROWSER_ARTIFACTS``: where screenshots go (default: a new temp folder).
- ``COURSE_BROWSER_DISABLE_EXTENSION``: a lab extension to disable in the test server only, e.g.
  ``@jupyter-widgets/jupyterlab-manager``: the negative control (the widget tests must fail).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402  (the helper modules beside this file)

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DIR = Path(__file__).parent / "fixture"
_ARTIFACTS: list[Path] = []


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """A folder for before/after screenshots; its path is printed at the end of the run."""
    path = Path(os.environ.get("COURSE_BROWSER_ARTIFACTS") or
                tempfile.mkdtemp(prefix="course-browser-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    _ARTIFACTS.append(path)
    return path


def pytest_terminal_summary(terminalreporter):
    for path in _ARTIFACTS:
        shots = sorted(p.name for p in path.glob("*.png"))
        terminalreporter.write_line(f"browser test screenshots ({len(shots)}): {path}")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return lab.ensure_chromium()


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, artifacts):
    """JupyterLab serving a copy of ``notebooks/`` and ``fixture/``; kernels get COURSE_QUICK=1
    and import this repository's course_lib (PYTHONPATH), whichever checkout runs the tests."""
    root = tmp_path_factory.mktemp("lab-root")
    if (REPO / "notebooks").is_dir():
        lab.copy_tree(REPO / "notebooks", root / "notebooks")
    lab.copy_tree(FIXTURE_DIR, root / "fixture")
    state = tmp_path_factory.mktemp("lab-state")
    disabled = os.environ.get("COURSE_BROWSER_DISABLE_EXTENSION")
    if disabled:
        page_config = state / "jupyter_config_dir" / "labconfig" / "page_config.json"
        page_config.parent.mkdir(parents=True)
        page_config.write_text(json.dumps({"disabledExtensions": {disabled: True}}))
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    server = lab.LabServer(root, state, {"COURSE_QUICK": "1", "PYTHONPATH": pythonpath})
    server.start()
    # What a learner's `make lab` does before starting JupyterLab (test_make_lab_trusts_notebooks
    # holds the Makefile to it): without a signature every notebook opens "not trusted" and its
    # saved widgets show as text like "VBox(children=...)".
    server.trust(sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    yield server
    server.stop()
    shutil.copy(server.log_path, artifacts / "jupyterlab.log")  # for a failed CI run


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                              args=lab.CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, lab_server, artifacts, request):
    """A fresh browser context and page; on failure a screenshot; afterwards every kernel the
    test started is shut down so the next notebook has the CPU to itself."""
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # a cold kernel takes longer than Playwright's 5 s
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        page.screenshot(path=str(artifacts / f"FAILED-{_safe(request.node.name)}.png"),
                        full_page=True)
    context.close()
    lab_server.shutdown_kernels()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
