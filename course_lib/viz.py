"""Drawing instances: translucent masks, boxes, class names and scores over an image.

Every chapter looks at data and predictions the same way, so the drawing lives here once.
Axes are in pixels with pixel edges on integer coordinates (``extent=(0, W, H, 0)``), so a
box ``[x1, y1, x2, y2]`` in the course's continuous coordinates lands exactly on the edges of
the pixels it covers.

Public names: ``draw_instances``, ``show_grid``, ``label_colour``.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from course_lib.data import CLASSES


def label_colour(label: int) -> tuple[float, float, float]:
    """The RGB colour of a class label (matplotlib's tab10, label 1 first)."""
    return plt.get_cmap("tab10")((int(label) - 1) % 10)[:3]


def draw_instances(ax: Axes, image: Tensor, boxes: Tensor | None = None, labels: Tensor | None = None,
                   scores: Tensor | None = None, masks: Tensor | None = None,
                   class_names: tuple[str, ...] = CLASSES, score_thresh: float = 0.5,
                   title: str | None = None) -> Axes:
    """Draw one image with its instances on ``ax`` and return ``ax``.

    Args:
        image: float ``Tensor[3, H, W]`` in [0, 1].
        boxes: float ``Tensor[N, 4]`` xyxy pixels, or None.
        labels: int64 ``Tensor[N]`` in 1..K (names from ``class_names[label - 1]``), or None.
        scores: float ``Tensor[N]``; instances scoring below ``score_thresh`` are not drawn.
        masks: uint8 ``Tensor[N, H, W]`` (targets) or float ``Tensor[N, 1, H, W]``
            probabilities (model output, shown where > 0.5), or None.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image.shape={tuple(image.shape)}; expected [3, H, W]")
    height, width = image.shape[1:]
    counts = [len(t) for t in (boxes, labels, scores, masks) if t is not None]
    if len(set(counts)) > 1:
        raise ValueError(f"boxes, labels, scores and masks hold different counts: {counts}")
    n = counts[0] if counts else 0
    keep = torch.ones(n, dtype=torch.bool) if scores is None else scores.detach().cpu() >= score_thresh
    ax.imshow(image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, width, height, 0))
    for k in torch.nonzero(keep).flatten().tolist():
        colour = label_colour(labels[k]) if labels is not None else (1.0, 1.0, 0.0)
        if masks is not None:
            mask = masks[k].detach().cpu().reshape(height, width).float() > 0.5  # [H, W]
            overlay = np.zeros((height, width, 4))
            overlay[mask.numpy()] = (*colour, 0.45)
            ax.imshow(overlay, extent=(0, width, height, 0))
        if boxes is not None:
            x1, y1, x2, y2 = boxes[k].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
            text = class_names[int(labels[k]) - 1] if labels is not None else ""
            text += f" {float(scores[k]):.2f}" if scores is not None else ""
            if text.strip():
                ax.text(x1, y1, text.strip(), fontsize=7, color="white", va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def show_grid(dataset_or_samples, n: int = 8, ncols: int = 4, class_names: tuple[str, ...] | None = None,
              title: str = "Samples with their instances") -> Figure:
    """Draw the first ``n`` samples (a data set, or a list of ``(image, target)``) in a grid
    of ``ncols`` columns, each titled with its image id and object count. Returns the figure."""
    if n < 1 or ncols < 1:
        raise ValueError(f"n={n}, ncols={ncols}; both must be >= 1")
    n = min(n, len(dataset_or_samples))
    names = class_names or getattr(dataset_or_samples, "classes", CLASSES)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.7 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        image, target = dataset_or_samples[k]
        draw_instances(ax, image, target["boxes"], target["labels"], masks=target["masks"],
                       class_names=names, title=f"image {target['image_id']}: {len(target['labels'])} objects")
        ax.tick_params(labelsize=6)
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
