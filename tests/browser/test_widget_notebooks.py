"""The course's widget chapters in a real browser: run each in JupyterLab, move one slider with the
keyboard, and check that the read-out shows what the library computes in this process for the
widgets' new values, and that the figure was redrawn. A chapter not written yet is skipped."""
import re
from pathlib import Path

import pytest

import widget_check

REPO = Path(__file__).resolve().parents[2]


def _source(notebook: str) -> str:
    path = REPO / notebook
    if not path.exists():
        pytest.skip(f"{notebook} does not exist yet")
    return path.read_text()


def _numbers(values: dict[str, str], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in values.items()
            if not k.endswith("readout")}


# ---- 02: anchors over the image, matched to a ground-truth box ------------------------------
NB02 = "notebooks/02_boxes_and_anchors.ipynb"


def _anchor_spec(image_size: int) -> widget_check.WidgetSpec:
    from course_lib import anchors

    def expected(values):
        v = _numbers(values, "course-anchor-")
        x, y, w, h = (int(v[k]) for k in ("box-x", "box-y", "box-w", "box-h"))
        summary = anchors.anchor_match_summary(image_size, int(v["stride"]), (int(v["size"]),),
                                               (v["ratio"],), (x, y, x + w, y + h))
        return anchors.summary_text(summary)

    # Stride 16 -> 32 changes the number of anchors, so the read-out must change.
    return widget_check.WidgetSpec("02_anchors", NB02, "course-anchor-", "course-anchor-stride",
                                   "course-anchor-readout", expected)


def test_02_anchor_widget(page, lab_server, artifacts):
    source = _source(NB02)
    sizes = re.findall(r"ShapesDataset\([^)]*image_size=(\d+)", source)
    assert sizes, f"{NB02}: no ShapesDataset(..., image_size=N) to take the image size from"
    seen = widget_check.check_widget_notebook(page, lab_server, _anchor_spec(int(sizes[0])),
                                              artifacts)
    assert seen["text_after"] != seen["text_before"]
