"""Chapter 11's widgets in a real browser: run the chapter in JupyterLab, upload a PNG this test draws
through the FileUpload button (the browser's file chooser), compute the model's own scores on it in this process (the checkpoint the
chapter names, the same stages), move the score slider between two thresholds picked from those scores,
and check that the read-out's count of drawn detections changes exactly as computed, and that the
detections figure is redrawn."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import pages

REPO = Path(__file__).resolve().parents[2]
NB11 = "notebooks/11_inside_the_model.ipynb"
STEP = 0.01          # the slider's step (the notebook's FloatSlider)
MARGIN = 0.004       # a threshold this close to a score could count it either way in another process


def draw_shapes_png(path: Path) -> Path:
    """A 128 px drawing the test makes itself: a square, a circle and a triangle on a plain background."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (128, 128), (225, 230, 236))
    pen = ImageDraw.Draw(canvas)
    pen.rectangle([70, 12, 110, 52], fill=(30, 120, 60))
    pen.ellipse([12, 20, 52, 60], fill=(190, 60, 40))
    pen.polygon([(60, 118), (112, 118), (86, 74)], fill=(50, 70, 190))
    canvas.save(path)
    return path


def thresholds_between(scores: list[float], start: float) -> tuple[float, float]:
    """Two slider positions (on ``start``'s grid of ``STEP``) that draw different numbers of
    detections, each at least ``MARGIN`` from every score, reached with the fewest key presses."""
    grid = [round(start + k * STEP, 2) for k in range(-round(start / STEP), round((1 - start) / STEP) + 1)]
    valid = [g for g in grid if all(abs(s - g) > MARGIN for s in scores)]
    count = {g: sum(s >= g for s in scores) for g in valid}
    pairs = [(abs(a - start) + abs(b - a), a, b) for a in valid for b in valid if count[a] != count[b]]
    if not pairs:
        raise AssertionError(f"no two slider positions draw different counts for scores {scores[:10]}...")
    _, first, second = min(pairs)
    return first, second


def move_slider(slider, start: float, target: float) -> None:
    presses = round((target - start) / STEP)
    if presses:
        pages.press_slider(slider, "ArrowRight" if presses > 0 else "ArrowLeft", abs(presses))


def wait_readout(page, expected: str, timeout_s: float = 120) -> str:
    """Poll the read-out until it shows ``expected`` (the kernel answers each move in turn)."""
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        text = pages.readout_text(page, "course-inside-readout")
        if text == expected:
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"read-out {text!r} != library {expected!r} after {timeout_s} s")


def model_scores(page, png: Path) -> list[float]:
    """The detection scores of the chapter's model on ``png``, computed here: the checkpoint the
    chapter printed, the image read and shrunk as the widget does, ``inside.run_stages``."""
    from course_lib import checkpoints, inside, predict

    named = re.search(r"checkpoint: (\S+\.pt)", page.locator("body").inner_text())
    assert named, "chapter 11 printed no 'checkpoint: data/generated/models/....pt' line"
    net, info = checkpoints.load_model(REPO / named[1])
    image = predict.shrink_to(predict.load_image(png, verbose=False), info["image_size"])
    return inside.run_stages(net, image)["detections"]["scores"].tolist()


@pytest.mark.skipif(not (REPO / NB11).exists(), reason=f"{NB11} does not exist yet")
def test_11_upload_then_threshold_slider(page, lab_server, artifacts, tmp_path):
    from course_lib import inside
    import torch

    png = draw_shapes_png(tmp_path / "browser_test_shapes.png")
    pages.open_notebook(page, lab_server.url(NB11))
    pages.run_all_and_wait(page)
    pages.assert_cells_ok(page)
    pages.assert_widgets_rendered(page, min_count=4)
    slider = pages.slider(page, "course-inside-threshold")
    start = pages.slider_value(slider)
    assert pages.readout_text(page, "course-inside-readout").startswith("the drawing of shapes: ")

    # ipywidgets 8's FileUpload is a button whose file input is never in the page: a click opens the
    # browser's file chooser, as for a person, and the test answers it.
    with page.expect_file_chooser() as chooser:
        page.locator(".course-inside-upload").click()
    chooser.value.set_files(str(png))
    scores = model_scores(page, png)
    readout = lambda threshold: inside.threshold_readout(torch.tensor(scores), threshold, png.name)  # noqa: E731
    wait_readout(page, readout(start))
    slider.scroll_into_view_if_needed()
    page.locator(".course-inside-stages").screenshot(path=str(artifacts / "11_inside-upload.png"))

    first, second = thresholds_between(scores, start)
    move_slider(slider, start, first)
    text_first = wait_readout(page, readout(first))
    figure = lambda: page.locator(".course-inside-detections img").first.get_attribute("src")  # noqa: E731
    src_first = figure()
    move_slider(slider, first, second)
    text_second = wait_readout(page, readout(second))
    pages.wait_changed(figure, src_first, "the detections figure after the slider moved")
    counts = [inside.count_drawn(torch.tensor(scores), t) for t in (first, second)]
    print(f"chapter 11: {len(scores)} detections on {png.name}; slider {start:.2f} -> {first:.2f} draws {counts[0]}, "
          f"-> {second:.2f} draws {counts[1]}")
    assert counts[0] != counts[1] and text_first != text_second
    assert f": {counts[1]} of {len(scores)} detections drawn" in text_second
    page.locator(".course-inside-detections").screenshot(path=str(artifacts / "11_inside-after.png"))

    # The path box: a file that is not there is reported in the status line, and nothing breaks.
    path_input = page.locator(".course-inside-path input")
    path_input.fill("no_such_image.png")
    path_input.press("Enter")
    status = lambda: pages.readout_text(page, "course-inside-status")  # noqa: E731
    pages.wait_changed(lambda: status().startswith("cannot use this image"), False, "the status after a missing path")
    assert "no_such_image.png" in status()
