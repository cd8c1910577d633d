"""Inside a trained Mask R-CNN: one image through every stage, what each stage makes, and its time.

Chapter 11. ``run_stages(net, image)`` runs the model's eval-mode pipeline (``MaskRCNN.forward``)
one stage at a time, with the model's own modules and the library's own functions, keeps every
stage's tensors and times each stage with ``time.perf_counter``. Its detections are exactly
``net([image])``'s, boxes, labels, scores and masks (``tests/test_inside.py``), so every picture
drawn from it is the model's own and cannot drift from it. The stages (``STAGES``), in the order
of Mask R-CNN §3 and Faster R-CNN §3:

1. normalise and pad the image (``MaskRCNN.batch``);
2. the backbone's feature maps (``MaskRCNN.feature_maps``);
3. the RPN head: an objectness logit and 4 deltas per anchor (``rpn.RPNHead``);
4. proposals: anchors decoded, the top-k per level, NMS (``rpn.select_proposals``);
5. the box head on each proposal's 7x7 RoIAligned features: class scores and box deltas;
6. detections: decode, per-class NMS, top-k (``roi_heads.postprocess_detections``);
7. the mask head on each detection's 14x14 features: 28x28 logits per class (``mask_head.MaskHead``);
8. paste each detection's mask into the image (``mask_head.paste_masks_in_image``);
9. (a model with chapter 09's refiner only) ``refinement.refine_detections``.

Public names: ``STAGES``, ``run_stages``, ``time_stages``, ``top_rois``; pictures ``draw_feature_maps``,
``draw_objectness``, ``draw_proposals``, ``draw_top_rois``, ``draw_class_scores``, ``draw_mask_logits``,
``draw_detections``, ``draw_overview``; the widget's ``upload_content``, ``save_upload``, ``count_drawn``,
``threshold_readout``.

Dimensions: C channels, h x w a feature map in cells, S anchor sizes and R aspect ratios of one
level, K proposals before NMS, P after, L classes with the background, D detections, M = 28 the
mask size, H x W the image in pixels.
"""
from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from course_lib import boxes, mask_head, model as model_lib, refinement, roi_heads, rpn, viz

STAGES = ("normalise and pad", "backbone", "RPN head", "proposals", "box head", "detections", "mask head", "paste masks")


class _Clock:
    """Seconds per stage: ``lap(name)`` books the time since the previous lap under ``name``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now


def _check(net: model_lib.MaskRCNN, image: Tensor) -> None:
    if not isinstance(net, model_lib.MaskRCNN) or not net.config.with_mask:
        raise ValueError(f"run_stages needs a course_lib Mask R-CNN (config.with_mask=True), got {type(net).__name__}")
    model_lib.validate_inputs([image], None, net.config.num_classes)


@torch.no_grad()
def run_stages(net: model_lib.MaskRCNN, image: Tensor) -> dict:
    """Run ``net`` (put in eval mode) on one image stage by stage; every stage's output and time.

    Args:
        image: float ``Tensor[3, H, W]`` in [0, 1], on the model's device.
    Returns a dict: ``image``; ``batch`` ``Tensor[1, 3, H_pad, W_pad]``; ``maps`` {stride:
    ``Tensor[C, h, w]``} (every backbone stage, or P2..P6); ``objectness`` per RPN level
    ``Tensor[S, R, h, w]`` probabilities, with ``anchor_sizes``, ``aspect_ratios`` and
    ``level_strides``; ``before_nms`` (``boxes`` ``Tensor[K, 4]``, ``scores``: the top-k decoded
    anchors per level, clipped); ``proposals`` ``Tensor[P, 4]`` and ``proposal_scores``;
    ``box_features`` ``Tensor[P, C, 7, 7]``; ``class_probs`` ``Tensor[P, L]``; ``detections``
    (``boxes`` ``Tensor[D, 4]``, ``labels``, ``scores``, ``masks`` ``Tensor[D, 1, H, W]``);
    ``mask_logits`` ``Tensor[D, L, M, M]``; ``mask_probs`` ``Tensor[D, 1, M, M]``; ``times``
    {stage: seconds}. Everything outside the stages (the views for the pictures) is computed
    after the clock stops.
    """
    _check(net, image)
    net.eval()
    size, clock = tuple(image.shape[-2:]), _Clock()
    batch = net.batch([image])                                                      # [1, 3, H_pad, W_pad]
    clock.lap("normalise and pad")
    features, maps = net.feature_maps(batch)
    clock.lap("backbone")
    objectness, deltas = net.rpn.head(features)                                     # per level [1, A, h, w]
    clock.lap("RPN head")
    rpn_out = _propose(net, features, objectness, deltas, tuple(batch.shape[-2:]), size)
    clock.lap("proposals")
    head_out = _heads(net, features, rpn_out["proposals"], size, clock)             # four more laps
    if net.refiner is not None:
        refinement.refine_detections(net, batch, features, maps, [head_out["detections"]])
        clock.lap("refine")
    return {"image": image, "batch": batch, "maps": {s: m[0] for s, m in maps.items()}, "features": features,
            **_anchor_views(net, objectness, features, batch), "anchors": rpn_out["anchors"],
            "before_nms": _before_nms(rpn_out, net.config.rpn_pre_nms_top_n_test, size),
            "proposals": rpn_out["proposals"], "proposal_scores": rpn_out["proposal_scores"], **head_out,
            "times": clock.times}


def _heads(net: model_lib.MaskRCNN, features: list[Tensor], proposals: Tensor, size: tuple[int, int],
           clock: _Clock) -> dict:
    """``RoIHeads.forward`` in eval mode, then the model's pasting: one clock lap per stage."""
    cfg, heads = net.config, net.roi_heads
    box_features = heads.pool(features, [proposals], cfg.box_roi_size)              # [P, C, 7, 7]
    class_logits, box_regression = heads.box_predictor(heads.box_head(box_features))
    class_logits, box_regression = class_logits.float(), box_regression.float()    # [P, L], [P, 4L]
    clock.lap("box head")
    det = roi_heads.postprocess_detections(class_logits, box_regression, [proposals], [size], heads.box_coder,
                                           cfg.box_score_thresh, cfg.box_nms_thresh, cfg.detections_per_img)[0]
    clock.lap("detections")
    mask_logits = heads.mask_head(heads.pool(features, [det["boxes"]], cfg.mask_roi_size)).float()  # [D, L, M, M]
    probs = mask_head.mask_probs(mask_logits, det["labels"], cfg.mask_loss, cfg.softmax_mask_rule)  # [D, 1, M, M]
    clock.lap("mask head")
    det["masks"] = mask_head.paste_masks_in_image(probs, det["boxes"], size)        # [D, 1, H, W]
    clock.lap("paste masks")
    return {"box_features": box_features, "class_probs": class_logits.softmax(-1), "detections": det,
            "mask_logits": mask_logits, "mask_probs": probs}


def _propose(net: model_lib.MaskRCNN, features: list[Tensor], objectness: list[Tensor], deltas: list[Tensor],
             padded_size: tuple[int, int], size: tuple[int, int]) -> dict:
    """``RegionProposalNetwork.forward`` in eval mode, keeping the anchors, logits and decoded boxes."""
    cfg = net.config
    anchors = net.rpn.anchors(padded_size, features)                                # [R_all, 4]
    per_level = [o[0].numel() for o in objectness]
    logits, flat_deltas = rpn.flatten_predictions(objectness, deltas)               # [1, R_all], [1, R_all, 4]
    logits, flat_deltas = logits.to(anchors.dtype), flat_deltas.to(anchors.dtype)
    decoded = net.rpn.box_coder.decode(flat_deltas.reshape(-1, 4), anchors)        # [R_all, 4]
    found, scores = rpn.select_proposals(decoded.view(1, -1, 4), logits, [size], per_level,
                                         cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test, cfg.rpn_nms_thresh)
    return {"anchors": anchors, "logits": logits[0], "decoded": decoded, "per_level": per_level,
            "proposals": found[0], "proposal_scores": scores[0]}


def _before_nms(rpn_out: dict, k: int, size: tuple[int, int]) -> dict:
    """What ``select_proposals`` hands to NMS: the top ``k`` decoded anchors of each level, clipped."""
    top = rpn.top_per_level(rpn_out["logits"][None], rpn_out["per_level"], k)[0][0]  # [K]
    return {"boxes": boxes.clip_boxes_to_image(rpn_out["decoded"][top], size), "scores": rpn_out["logits"][top].sigmoid()}


def _anchor_views(net: model_lib.MaskRCNN, objectness: list[Tensor], features: list[Tensor], batch: Tensor) -> dict:
    """Objectness per level as ``Tensor[S, R, h, w]`` probabilities: channel ``a = r * S + s``
    (``anchors.cell_anchors``' ratio-major order) becomes ``[s, r]``."""
    generator = net.rpn.anchor_generator
    views = []
    for logits, sizes, ratios in zip(objectness, generator.sizes, generator.aspect_ratios):
        h, w = logits.shape[-2:]
        views.append(logits[0].view(len(ratios), len(sizes), h, w).transpose(0, 1).sigmoid())  # [S, R, h, w]
    return {"objectness": views, "anchor_sizes": generator.sizes, "aspect_ratios": generator.aspect_ratios,
            "level_strides": [batch.shape[-1] // f.shape[-1] for f in features]}


def time_stages(net: model_lib.MaskRCNN, image: Tensor, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per stage over ``repeats`` runs of ``run_stages``, after one warm-up run
    (the first run pays for memory allocation and lazy initialisation)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected at least 1")
    runs = [run_stages(net, image)["times"] for _ in range(repeats + 1)][1:]
    return {stage: 1000 * statistics.median(run[stage] for run in runs) for stage in runs[0]}


def top_rois(stages: dict, k: int) -> Tensor:
    """Indices of the ``k`` proposals the box head finds most object-like (best foreground
    class probability), best first: ``Tensor[min(k, P)]``."""
    best = stages["class_probs"][:, 1:].max(dim=1).values                           # [P]
    return best.argsort(descending=True)[:k]


# ---- the pictures: each draws on axes it is given; axes are in pixels or feature cells ------------

def _image(ax: Axes, image: Tensor, title: str) -> None:
    height, width = image.shape[-2:]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), extent=(0, width, height, 0))
    ax.set(xlim=(0, width), ylim=(height, 0), xlabel="x (pixels)", ylabel="y (pixels)")
    ax.set_title(title, fontsize=9)


def _heat(ax: Axes, values: Tensor, title: str, label: str, unit: str = "feature cells", **kw) -> None:
    """A map with a colour bar; ``values`` ``Tensor[h, w]``, cell edges on integer coordinates."""
    h, w = values.shape
    shown = ax.imshow(values.cpu().numpy(), extent=(0, w, h, 0), **kw)
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label=label)
    ax.set(xlabel=f"x ({unit})", ylabel=f"y ({unit})")
    ax.set_title(title, fontsize=9)


def draw_feature_maps(axes, stages: dict) -> None:
    """One panel per backbone map (finest first): the mean over channels of |activation|."""
    for ax, (stride, fmap) in zip(axes, stages["maps"].items()):
        c, h, w = fmap.shape
        _heat(ax, fmap.abs().mean(0), f"stride {stride}: {c} channels, {h} x {w} cells",
              "mean |activation|", cmap="magma")


def draw_objectness(axes, stages: dict) -> None:
    """One panel per anchor size: each cell's objectness probability, the best of its aspect ratios."""
    panels = [(probs[s], size, stride) for probs, sizes, stride in
              zip(stages["objectness"], stages["anchor_sizes"], stages["level_strides"]) for s, size in enumerate(sizes)]
    for ax, (probs, size, stride) in zip(axes, panels):
        best = probs.max(dim=0).values                                              # [h, w]
        _heat(ax, best, f"anchors {size:g} px (stride {stride}): max {best.max().item():.2f}",
              "objectness probability", cmap="viridis", vmin=0, vmax=1)


def _scored_boxes(ax: Axes, rois: Tensor, scores: Tensor) -> None:
    """Boxes ``Tensor[K, 4]`` coloured by their objectness probability ``Tensor[K]``, the best drawn last
    (on top) and the most opaque, with a colour bar."""
    cmap = colormaps["plasma"]
    for k in scores.argsort().tolist():                                             # worst first
        (x1, y1, x2, y2), p = rois[k].tolist(), float(scores[k])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=cmap(p), linewidth=0.8,
                               alpha=0.15 + 0.75 * p))
    ax.figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, fraction=0.046, pad=0.03,
                       label="objectness probability")


def draw_proposals(ax_before: Axes | None, ax_after: Axes, stages: dict) -> None:
    """The top-k decoded anchors of each level before NMS (``ax_before``, skipped when None), and
    the proposals NMS keeps (``ax_after``), each coloured by its objectness."""
    if ax_before is not None:
        before = stages["before_nms"]
        _image(ax_before, stages["image"], f"before NMS: the top {len(before['boxes'])} decoded anchors")
        _scored_boxes(ax_before, before["boxes"], before["scores"])
    _image(ax_after, stages["image"], f"after NMS: {len(stages['proposals'])} proposals")
    _scored_boxes(ax_after, stages["proposals"], stages["proposal_scores"])


def draw_top_rois(ax_image: Axes, axes_pooled, stages: dict, names: tuple[str, ...]) -> None:
    """The top RoIs (``top_rois``) on the image, and each one's pooled 7x7 features (channel mean)."""
    order = top_rois(stages, len(axes_pooled)).tolist()
    _image(ax_image, stages["image"], f"the box head's top {len(order)} RoIs of {len(stages['proposals'])}")
    for rank, (ax, k) in enumerate(zip(axes_pooled, order), start=1):
        x1, y1, x2, y2 = stages["proposals"][k].tolist()
        ax_image.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.2))
        ax_image.text(x1, y1, str(rank), color="black", fontsize=7, va="bottom", backgroundcolor="yellow")
        label = int(stages["class_probs"][k, 1:].argmax()) + 1
        _heat(ax, stages["box_features"][k].mean(0), f"RoI {rank}: {names[label - 1]} "
              f"{stages['class_probs'][k, label].item():.2f}", "mean feature", unit="bins", cmap="magma")
    for ax in list(axes_pooled)[len(order):]:                                       # fewer RoIs than panels
        ax.axis("off")


def draw_class_scores(ax: Axes, stages: dict, names: tuple[str, ...], k: int = 8) -> None:
    """The box head's class probabilities (softmax) of the top ``k`` RoIs, background included."""
    order = top_rois(stages, k)
    ax.set_title("box head: class probabilities", fontsize=9)
    if not len(order):
        ax.text(0.5, 0.5, "no proposals", ha="center", transform=ax.transAxes)
        return
    probs = stages["class_probs"][order]                                            # [k, L]
    ax.imshow(probs.cpu().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), p in zip(itertools.product(range(len(order)), range(probs.shape[1])), probs.flatten().tolist()):
        ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=7, color="white" if p > 0.6 else "black")
    ax.set_xticks(range(probs.shape[1]), ["background", *names], fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(order)), [f"RoI {r}" for r in range(1, len(order) + 1)], fontsize=7)
    ax.set(xlabel="class", ylabel="RoI (best first)")


def draw_mask_logits(axes, stages: dict, index: int, names: tuple[str, ...],
                     channels: list[int] | None = None) -> None:
    """Detection ``index``'s 28x28 mask logits, one panel per class channel (default: all), one colour scale."""
    logits = stages["mask_logits"][index]                                           # [L, M, M]
    label, limit = int(stages["detections"]["labels"][index]), logits.abs().max().item()
    channel_names = ["background", *names] if len(logits) == len(names) + 1 else ["every class"]
    for ax, c in zip(axes, channels if channels is not None else range(len(logits))):
        used = " (used)" if c == label or len(logits) == 1 else ""
        _heat(ax, logits[c], f"{channel_names[c]} channel{used}", "logit", unit="mask bins",
              cmap="RdBu_r", vmin=-limit, vmax=limit)


def draw_detections(ax: Axes, stages: dict, names: tuple[str, ...], threshold: float, masks: bool = True) -> None:
    """The final detections scoring at least ``threshold``, with their pasted masks (> 0.5)."""
    det = stages["detections"]
    viz.draw_instances(ax, stages["image"], det["boxes"], det["labels"], det["scores"],
                       det["masks"] if masks else None, class_names=names, score_thresh=threshold,
                       title=f"{count_drawn(det['scores'], threshold)} detections with score >= {threshold:.2f}")


def draw_overview(stages: dict, names: tuple[str, ...], threshold: float, title: str = "") -> Figure:
    """Every stage in one figure, for the widget: the input, the feature maps, the proposals after
    NMS; objectness per anchor size; the class scores of the top RoIs, the best detection's mask
    logits (its class's channel) and pasted mask, and the detections scoring at least ``threshold``."""
    n_maps, n_sizes = len(stages["maps"]), sum(len(s) for s in stages["anchor_sizes"])
    cols = max(4, n_maps + 2, n_sizes)
    fig = Figure(figsize=(3.4 * cols, 9.6), dpi=60)
    axes = fig.subplots(3, cols, squeeze=False)
    _image(axes[0, 0], stages["image"], "input")
    draw_feature_maps(axes[0, 1:1 + n_maps], stages)
    draw_proposals(None, axes[0, 1 + n_maps], stages)
    draw_objectness(axes[1], stages)
    draw_class_scores(axes[2, 0], stages, names, k=5)
    det = stages["detections"]
    if len(det["scores"]):
        label = int(det["labels"][0])
        channel = label if stages["mask_logits"].shape[1] > 1 else 0
        draw_mask_logits([axes[2, 1]], stages, 0, names, channels=[channel])
        _heat(axes[2, 2], det["masks"][0, 0], f"detection 1 ({names[label - 1]}): pasted mask",
              "mask probability", unit="pixels", cmap="viridis", vmin=0, vmax=1)
    draw_detections(axes[2, 3], stages, names, threshold)
    for ax in axes.flat:
        if not ax.has_data():
            ax.axis("off")
    fig.suptitle(title or "every stage of the model on this image")
    fig.tight_layout()
    return fig


# ---- the widget's plain functions (the tests call them with extreme values) -------------------

def count_drawn(scores: Tensor, threshold: float) -> int:
    """How many detections score at least ``threshold`` (in [0, 1]): the ones drawn."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r}; expected a score in [0, 1]")
    return int((scores >= threshold).sum())


def threshold_readout(scores: Tensor, threshold: float, name: str) -> str:
    """The widget's read-out: how many of the model's detections on image ``name`` are drawn."""
    best = f"best score {scores.max().item():.2f}" if len(scores) else "no detections at all"
    return (f"{name}: {count_drawn(scores, threshold)} of {len(scores)} detections drawn "
            f"(score >= {threshold:.2f}; {best})")


def upload_content(value) -> tuple[str, bytes]:
    """``(file name, bytes)`` of the last file in an ``ipywidgets.FileUpload``'s ``value``
    (ipywidgets 8: a tuple of dicts with ``name`` and ``content``, a memoryview)."""
    if not value:
        raise ValueError("no file uploaded yet")
    item, content = value[-1], bytes(value[-1]["content"])
    if not content:
        raise ValueError(f"the uploaded file {item.get('name')!r} is empty (0 bytes)")
    return str(item.get("name") or "upload"), content


def save_upload(value, folder: str | Path) -> Path:
    """Write the uploaded file into ``folder`` under its own name (folders in the name dropped),
    so it is read like any image path; returns the path."""
    name, content = upload_content(value)
    path = Path(folder) / (Path(name).name if Path(name).name not in ("", ".", "..") else "upload")
    path.write_bytes(content)
    return path
