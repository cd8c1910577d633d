"""The course's widget chapters in a real browser: run each in JupyterLab, move one slider with the
keyboard, and check that the read-out shows what the library computes in this process for the
widgets' new values, and that the figure was redrawn. A chapter not written yet is skipped."""
import re
from pathlib import Path

import pytest

import widget_check

REPO = Path(__file__).resolve().parents[2]


def _needs(notebook: str):
    """Skip (before any browser work) a test whose chapter is not written yet."""
    return pytest.mark.skipif(not (REPO / notebook).exists(), reason=f"{notebook} does not exist yet")


def _numbers(values: dict[str, str], prefix: str) -> dict[str, float]:
    """The numeric widget values by class suffix (read-outs, figures and the like left out)."""
    numbers = {}
    for key, value in values.items():
        try:
            numbers[key.removeprefix(prefix)] = float(value)
        except ValueError:
            pass
    return numbers


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


@_needs(NB02)
def test_02_anchor_widget(page, lab_server, artifacts):
    source = (REPO / NB02).read_text()
    sizes = re.findall(r"ShapesDataset\([^)]*image_size=(\d+)", source)
    assert sizes, f"{NB02}: no ShapesDataset(..., image_size=N) to take the image size from"
    seen = widget_check.check_widget_notebook(page, lab_server, _anchor_spec(int(sizes[0])),
                                              artifacts)
    assert seen["text_after"] != seen["text_before"]


def _pick(values: dict[str, float], names: tuple[str, ...], default=None):
    """The value of the first widget named in ``names`` (class suffixes), else ``default``."""
    for name in names:
        if name in values:
            return values[name]
    if default is None:
        raise AssertionError(f"no widget among {names}; the notebook has {sorted(values)}")
    return default


def _flags(values: dict[str, str], prefix: str) -> dict[str, float]:
    """Like ``_numbers``, with checkbox states 'true'/'false' read as 1.0/0.0."""
    table = {"true": "1", "false": "0"}
    return _numbers({k: table.get(v, v) for k, v in values.items()}, prefix)


# ---- 04: RoIPool's quantization against RoIAlign's bilinear samples ----------------------------
NB04 = "notebooks/04_roipool_vs_roialign.ipynb"


def _roi_spec() -> widget_check.WidgetSpec:
    from course_lib import roi_teaching

    def expected(values):
        v = _flags(values, "course-roi-")
        readout = roi_teaching.roi_readout(
            _pick(v, ("x", "box-x", "x1")), _pick(v, ("y", "box-y", "y1")),
            _pick(v, ("w", "box-w", "width")), _pick(v, ("h", "box-h", "height")),
            stride=_pick(v, ("stride",), 16),
            output_size=int(_pick(v, ("output", "output-size", "size"), 7)),
            sampling_ratio=int(_pick(v, ("sampling", "sampling-ratio", "samples"), 2)),
            aligned=bool(_pick(v, ("aligned",), 1)))
        return roi_teaching.readout_text(readout)

    # Growing the box's width changes its width in cells, so the read-out must change.
    return widget_check.WidgetSpec("04_roi", NB04, "course-roi-",
                                   ("course-roi-w", "course-roi-box-w", "course-roi-width"),
                                   "course-roi-readout", expected)


@_needs(NB04)
def test_04_roi_widget(page, lab_server, artifacts):
    seen = widget_check.check_widget_notebook(page, lab_server, _roi_spec(), artifacts)
    assert seen["text_after"] != seen["text_before"]


# ---- 07: which pyramid level a box is pooled from ----------------------------------------------
NB07 = "notebooks/07_fpn.ipynb"


def _fpn_spec() -> widget_check.WidgetSpec:
    from course_lib import config, fpn

    canonical_size = config.ModelConfig().canonical_size

    def expected(values):
        size = _numbers(values, "course-fpn-")["size"]
        summary = fpn.level_summary(size, canonical_size=canonical_size)
        return [summary["text"], f"P{fpn.level_for_box_size(size, canonical_size=canonical_size)}",
                "pooled feature: (1, ", ", 7, 7)"]

    # Several steps, so the box size moves far enough to matter; the level may stay the same,
    # and the read-out must still name the level the library assigns.
    return widget_check.WidgetSpec("07_fpn", NB07, "course-fpn-", "course-fpn-size",
                                   "course-fpn-readout", expected, presses=5)


@_needs(NB07)
def test_07_fpn_widget(page, lab_server, artifacts):
    widget_check.check_widget_notebook(page, lab_server, _fpn_spec(), artifacts)
