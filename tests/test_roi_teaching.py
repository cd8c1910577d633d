"""Chapter 04's picture of RoIPool's quantizations, three versions side by side: the widely read
explanation's simplified floor/floor (``floor_floor_cells``), torchvision's and Caffe's round +
floor/ceil (``roi_pool_cells``), and RoIAlign (``draw_roi``); hand-worked values and
torchvision.ops.roi_pool."""
import matplotlib
import pytest
import torch
import torchvision

from course_lib import roi_teaching

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BOX = [0.0, 0.0, 665.0, 665.0]  # the example's 665 px proposal at stride 32: 20.78 cells
MAP = (torch.arange(25.0)[:, None] * 25 + torch.arange(25.0))[None, None]  # [1, 1, 25, 25]: 25y + x


def test_floor_floor_hand_worked():
    # 665 / 32 = 20.78 -> 20 cells (first floor); 20 / 7 = 2.86 -> bins of 2 (second floor);
    # 7 bins of 2 cover 14 of the 20.78 cells: bin i is cells [2 i, 2 i + 2).
    cells = roi_teaching.floor_floor_cells(BOX, 32, 7)
    assert [round(v, 2) for v in cells["box_cells"].tolist()] == [0.0, 0.0, 20.78, 20.78]
    assert cells["floored_cells"].tolist() == [0, 0, 20, 20]
    assert cells["bin_cells"].tolist() == [2, 2]
    want = [[2 * i, 2 * i + 2] for i in range(7)]
    assert cells["x_bins"].tolist() == want and cells["y_bins"].tolist() == want
    assert int(cells["x_bins"][-1, 1] - cells["x_bins"][0, 0]) == 14


def test_floor_floor_agrees_with_quantization_example():
    ex = roi_teaching.quantization_example()
    cells = roi_teaching.floor_floor_cells(BOX, 32, 7)
    assert int(cells["floored_cells"][2]) == ex["roi_cells"] == 20
    assert int(cells["bin_cells"][1]) == ex["bin_quantized"] == 2
    assert int(cells["x_bins"][-1, 1]) == ex["covered_cells"] == 14


def test_floor_floor_is_the_same_anywhere_on_the_map():
    # Moved by whole cells, every number moves with the box; off a cell edge, the start floors.
    moved = roi_teaching.floor_floor_cells([64.0, 64.0, 729.0, 729.0], 32, 7)
    assert moved["floored_cells"].tolist() == [2, 2, 22, 22]
    assert moved["x_bins"].tolist() == [[2 + 2 * i, 4 + 2 * i] for i in range(7)]
    off = roi_teaching.floor_floor_cells([70.0, 50.0, 735.0, 715.0], 32, 7)  # starts 2.19, 1.56
    assert off["floored_cells"].tolist() == [2, 1, 22, 21]
    assert off["y_bins"].tolist() == [[1 + 2 * i, 3 + 2 * i] for i in range(7)]


def test_floor_floor_rectangular_output_and_a_box_narrower_than_the_bins():
    cells = roi_teaching.floor_floor_cells([0.0, 0.0, 100.0, 50.0], 10, (2, 3))  # 10 x 5 cells
    assert cells["bin_cells"].tolist() == [2, 3]  # 5 // 2, 10 // 3
    assert cells["y_bins"].tolist() == [[0, 2], [2, 4]]
    assert cells["x_bins"].tolist() == [[0, 3], [3, 6], [6, 9]]
    tiny = roi_teaching.floor_floor_cells([0.0, 0.0, 100.0, 100.0], 32, 7)  # 3.1 cells, 7 bins
    assert tiny["bin_cells"].tolist() == [0, 0]  # every bin empty: nothing is pooled
    with pytest.raises(ValueError, match="stride"):
        roi_teaching.floor_floor_cells(BOX, 0, 7)


@pytest.mark.parametrize("box", [BOX, [64.0, 64.0, 729.0, 729.0], [70.0, 50.0, 735.0, 715.0]])
def test_torchvision_version_is_what_torchvision_roi_pool_maxes_over(box):
    # On a map increasing in y and x, a bin's max sits at its last cell; negated, at its first.
    cells = roi_teaching.roi_pool_cells(box, 32, 7, (25, 25))
    rois = torch.tensor([[0.0, *box]])
    last = torchvision.ops.roi_pool(MAP, rois, 7, 1 / 32)[0, 0]
    first = -torchvision.ops.roi_pool(-MAP, rois, 7, 1 / 32)[0, 0]
    y0, y1 = cells["y_bins"].T
    x0, x1 = cells["x_bins"].T
    torch.testing.assert_close(last, MAP[0, 0][(y1 - 1)[:, None], x1 - 1])
    torch.testing.assert_close(first, MAP[0, 0][y0[:, None], x0])


def test_torchvision_version_of_the_example_hand_worked():
    # round(20.78) = 21, + 1 end cell = 22 cells; bin i is [floor(22 i / 7), ceil(22 (i + 1) / 7)).
    cells = roi_teaching.roi_pool_cells(BOX, 32, 7, (25, 25))
    assert cells["rounded_cells"].tolist() == [0, 0, 21, 21]
    assert cells["x_bins"].tolist() == [[0, 4], [3, 7], [6, 10], [9, 13], [12, 16], [15, 19],
                                        [18, 22]]
    assert roi_teaching.quantization_example()["torchvision_roi_cells"] == 22


def test_floor_floor_bins_are_torchvisions_on_the_14_cells_they_cover():
    # Where it applies: torchvision's RoIPool on a box that rounds to cells 0..13 (14 cells with
    # the end cell) cuts exactly the explanation's 2 x 2 bins, so its max equals theirs.
    cells = roi_teaching.floor_floor_cells(BOX, 32, 7)
    feature = torch.randn(1, 3, 25, 25, generator=torch.Generator().manual_seed(0))
    by_bins = torch.stack([torch.stack([feature[0, :, ys:ye, xs:xe].amax((1, 2))
                                        for xs, xe in cells["x_bins"].tolist()], -1)
                           for ys, ye in cells["y_bins"].tolist()], -2)  # [3, 7, 7]
    theirs = torchvision.ops.roi_pool(feature, torch.tensor([[0.0, 0, 0, 13 * 32, 13 * 32]]), 7,
                                      1 / 32)[0]
    torch.testing.assert_close(by_bins, theirs)


def test_draw_roi_draws_each_version():
    fig, axes = plt.subplots(1, 3)
    for ax, pooler in zip(axes, ["roi_pool_floor", "roi_pool", "roi_align"]):
        roi_teaching.draw_roi(ax, BOX, 32, 7, pooler, 2, True, image_size=800)
    floor_bins = axes[0].patches[:49]  # 7 x 7 bins, then the floored box and the true box
    assert len(axes[0].patches) == 51
    assert max(p.get_x() + p.get_width() for p in floor_bins) == 14 * 32
    assert len(axes[1].patches) == 50 and len(axes[2].collections) == 1  # the sampling points
    with pytest.raises(ValueError, match="pooler"):
        roi_teaching.draw_roi(axes[0], BOX, 32, pooler="max")
    plt.close(fig)
