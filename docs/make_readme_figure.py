"""Draw the README's picture, docs/roialign.png: RoIPool's quantized cells vs RoIAlign's bins.

    .venv/bin/python docs/make_readme_figure.py

The paper's worked example (Mask R-CNN §3): a 665 px box on an 800 px image at stride 32,
pooled to 7 x 7. Left, the cells RoIPool really max-pools (rounded box, floor/ceil bins);
right, RoIAlign's exact bins and their 2 x 2 bilinear sampling points. Everything is drawn by
``course_lib.roi_teaching.draw_roi`` from the geometry the ops themselves use.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course_lib import roi_teaching  # noqa: E402

BOX = [70.0, 50.0, 735.0, 715.0]  # 665 x 665 px, away from the image corner
TITLES = {"roi_pool": "RoIPool: box rounded to cells, bins floor/ceil",
          "roi_align": "RoIAlign: exact bins, 2 x 2 samples each"}


def main() -> None:
    ex = roi_teaching.paper_example()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), dpi=90)
    for ax, pooler in zip(axes, ["roi_pool", "roi_align"]):
        roi_teaching.draw_roi(ax, BOX, 32, 7, pooler, 2, True, image_size=800)
        ax.set_title(TITLES[pooler], fontsize=11)
    fig.suptitle(f"665 px box at stride 32 = {ex['box_cells']:.2f} cells; 7 x 7 bins of "
                 f"{ex['align_bin_cells']:.2f} cells (dashed: the box, grid: feature cells)")
    fig.tight_layout()
    out = Path(__file__).resolve().parent / "roialign.png"
    fig.savefig(out)
    print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
