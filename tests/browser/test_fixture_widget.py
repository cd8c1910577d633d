"""The machinery on a notebook of our own (one slider, one read-out, one figure): if this fails,
the browser set-up is broken, not a chapter."""
import fixture.fixture_widget as fixture_widget
import widget_check

SPEC = widget_check.WidgetSpec(
    name="fixture", notebook="fixture/fixture_widget.ipynb", prefix="course-fixture-",
    slider="course-fixture-slope", readout="course-fixture-readout",
    expected=lambda values: fixture_widget.line_readout(int(values["course-fixture-slope"])))


def test_fixture_slider_updates_readout_and_figure(page, lab_server, artifacts):
    seen = widget_check.check_widget_notebook(page, lab_server, SPEC, artifacts)
    assert seen["before"]["course-fixture-slope"] == "2"
    assert seen["after"]["course-fixture-slope"] == "3"
    assert seen["text_after"] == "slope = 3, y(10) = 30"


def test_fixture_callback_rejects_non_int():
    import pytest

    with pytest.raises(ValueError, match="slope"):
        fixture_widget.line_readout(2.5)
