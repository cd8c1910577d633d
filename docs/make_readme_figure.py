"""Draw the README's picture, docs/roialign.png: two versions of RoIPool's cells, and RoIAlign.

    .venv/bin/python docs/make_readme_figure.py

The example (a 665 px box on an 800 px image at stride 32, pooled to 7 x 7) comes from a widely
read explanation of Mask R-CNN, built on Caffe's RoIPooling code; the paper (§3) only writes
[x/16] with rounding. Left, the explanation's simplified RoIPool (floor, floor: 20 cells, bins of
2, only 14 x 14 cells pooled); middle, what torchvision's and Caffe's RoIPool really pool (box
rounded to cells with the end cell counted, floor/ceil bins); right, RoIAlign's exact bins and
their 2 x 2 bilinear sampling points. Everything is drawn by
``course_lib.roi_teaching.draw_roi`` from computed cells, the last two from the geometry the ops
themselves use.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course_lib import roi_teaching  # noqa: E402

# 665 x 665 px, starting two whole cells in: every number of the example holds, off the border
BOX = [64.0, 64.0, 729.0, 729.0]
IMAGE_SIZE, STRIDE, BINS = 800, 32, 7


def titles() -> tuple[str, dict[str, str]]:
    """The figure's title and each panel's (its source and its numbers), computed for BOX."""
    ex = roi_teaching.quantization_example(IMAGE_SIZE, STRIDE, BOX[2] - BOX[0], BINS)
    floor = roi_teaching.floor_floor_cells(BOX, STRIDE, BINS)
    covered = int(floor["x_bins"][-1, 1] - floor["x_bins"][0, 0])
    tv = roi_teaching.roi_pool_cells(BOX, STRIDE, BINS, (IMAGE_SIZE // STRIDE,) * 2)
    rounded = int(tv["rounded_cells"][2] - tv["rounded_cells"][0])
    tv_cells = int(tv["x_bins"][-1, 1] - tv["x_bins"][0, 0])
    size = f"{ex['feature_size']:.0f} x {ex['feature_size']:.0f}"
    suptitle = (f"A {BOX[2] - BOX[0]:.0f} px box on an {IMAGE_SIZE} px image at stride {STRIDE} "
                f"({size} feature cells, the grid); dashed: the box, "
                f"{ex['box_cells']:.2f} cells wide")
    return suptitle, {
        "roi_pool_floor": "RoIPool as a widely read explanation draws it\n(built on Caffe's code, "
                          f"simplified): floor {ex['box_cells']:.2f} -> {ex['roi_cells']} "
                          f"(dotted),\nbins floor {ex['bin_cells']:.2f} -> {ex['bin_quantized']}: "
                          f"{covered} x {covered} cells pooled",
        "roi_pool": "RoIPool as torchvision and Caffe compute it:\n"
                    f"round {ex['box_cells']:.2f} -> {rounded}, + end cell = {tv_cells} cells,\n"
                    "floor/ceil bins (overlaps darker)",
        "roi_align": "RoIAlign (Mask R-CNN §3):\n"
                     f"bins of {ex['box_cells']:.2f} / {BINS} = {ex['align_bin_cells']:.2f} "
                     f"cells,\n{ex['samples_per_bin']} bilinear samples each",
    }


def main() -> None:
    suptitle, panels = titles()
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.6), dpi=80)
    for ax, (pooler, title) in zip(axes, panels.items()):
        roi_teaching.draw_roi(ax, BOX, STRIDE, BINS, pooler, 2, True, image_size=IMAGE_SIZE)
        ax.set_title(title, fontsize=10.5)
    fig.suptitle(suptitle)
    fig.tight_layout()
    out = Path(__file__).resolve().parent / "roialign.png"
    fig.savefig(out)
    print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
