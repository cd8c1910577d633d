"""Our Faster / Mask R-CNN against torchvision's, same parts, same batches: step time and AP.

    .venv/bin/python benchmarks/model_vs_torchvision.py --model faster|mask --steps N [--fpn]
        [--threads 2] [--train-images 2000] [--val-images 200] [--batch-size 8] [--lr 0.02]

torchvision's ``FasterRCNN`` / ``MaskRCNN`` is assembled from the same pieces as ours: the same
backbone module (a copy of our ``TinyResNet`` with identical initial weights, plus our FPN when
``--fpn``), the same anchors, RPN and RoI sizes, a ``TwoMLPHead`` of ``representation_size``, and
the same mask head widths; its transform is told not to resize the 128 px images. Both models are
trained in lockstep (one step of ours, one of torchvision's) on the same batches with the same
optimiser and schedule, so a busy machine slows both alike. Prints the median step time of each,
box (and mask) AP on held-out images, and as its last line (box AP for ``faster``, mask AP for
``mask``)::

    ratio ours/torchvision: time T.TT, AP ours A.AAA torchvision B.BBB

Goal: time within 1.1x and box AP no lower than torchvision's - 0.02.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN as TvFasterRCNN
from torchvision.models.detection import MaskRCNN as TvMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from course_lib import data, evaluate, model, presets, rpn, train, utils


class BackboneForTorchvision(nn.Module):
    """Our backbone (+ FPN) behind torchvision's interface: an ``OrderedDict`` of named maps."""

    def __init__(self, ours: model.MaskRCNN):
        super().__init__()
        self.backbone = copy.deepcopy(ours.backbone)
        self.fpn = copy.deepcopy(ours.fpn)
        self.out_channels = ours.config.fpn_channels if ours.fpn is not None else ours.backbone.out_channels[-1]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        stages = self.backbone(x)
        if self.fpn is None:
            return OrderedDict([("0", stages[-1])])
        levels = self.fpn(stages[-4:])                                  # P2..P6
        return OrderedDict([(str(i), p) for i, p in enumerate(levels[:4])] + [("pool", levels[4])])


def torchvision_twin(ours: model.MaskRCNN) -> nn.Module:
    """torchvision's detector built from the same parts and sizes as ``ours``."""
    c = ours.config
    backbone = BackboneForTorchvision(ours)
    names = ["0", "1", "2", "3"] if c.fpn else ["0"]
    sizes = rpn.level_anchor_sizes(c)
    anchors = TvAnchorGenerator(sizes, (tuple(c.aspect_ratios),) * len(sizes))
    channels, size = backbone.out_channels, c.box_roi_size
    kwargs = dict(
        min_size=128, max_size=128, image_mean=list(c.image_mean), image_std=list(c.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=c.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=c.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
        rpn_nms_thresh=c.rpn_nms_thresh, rpn_fg_iou_thresh=c.rpn_fg_iou, rpn_bg_iou_thresh=c.rpn_bg_iou,
        rpn_batch_size_per_image=c.rpn_batch_size_per_image, rpn_positive_fraction=c.rpn_positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(names, size, c.sampling_ratio),
        box_head=TwoMLPHead(channels * size * size, c.representation_size),
        box_predictor=FastRCNNPredictor(c.representation_size, c.num_classes),
        box_score_thresh=c.box_score_thresh, box_nms_thresh=c.box_nms_thresh,
        box_detections_per_img=c.detections_per_img, box_fg_iou_thresh=c.box_fg_iou,
        box_bg_iou_thresh=c.box_bg_iou, box_batch_size_per_image=c.box_batch_size_per_image,
        box_positive_fraction=c.box_positive_fraction)
    if not c.with_mask:
        return TvFasterRCNN(backbone, **kwargs)
    width = c.mask_conv_channels
    return TvMaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(names, c.mask_roi_size, c.sampling_ratio),
                      mask_head=MaskRCNNHeads(channels, [width] * c.mask_num_convs, 1),
                      mask_predictor=MaskRCNNPredictor(width, width, c.num_classes), **kwargs)


def _optimizer(net: nn.Module, args):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=args.lr,
                          momentum=0.9, weight_decay=1e-4)
    warmup = min(100, args.steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_factor(s, args.steps, warmup, "onecycle"))
    return opt, sched


def _step(net, opt, sched, images, targets) -> float:
    tick = time.perf_counter()
    losses = net(images, targets)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
    opt.step()
    sched.step()
    return time.perf_counter() - tick


def train_lockstep(nets: dict[str, nn.Module], dataset, args) -> dict[str, list[float]]:
    """Train every net on the same batches, alternating one step each; step times per net."""
    optims = {name: _optimizer(net, args) for name, net in nets.items()}
    times = {name: [] for name in nets}
    for step in range(args.steps):
        images, targets = data.collate_fn([dataset[i] for i in train.batch_indices(step, len(dataset), args.batch_size, 0)])
        for name, net in nets.items():
            net.train()
            times[name].append(_step(net, *optims[name], images, targets))
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1}: " + ", ".join(f"{n} {statistics.median(t[-20:]):.3f} s" for n, t in times.items()),
                  flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("faster", "mask"), default="faster")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fpn", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    utils.seed_everything(0)
    config = presets.cpu_config(with_mask=args.model == "mask", fpn=args.fpn)
    ours = model.MaskRCNN(config)
    nets = {"ours": ours, "torchvision": torchvision_twin(ours)}
    print(f"{args.model} R-CNN{' + FPN' if args.fpn else ''}, {args.steps} steps of {args.batch_size} images, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchvision {torchvision.__version__}")
    times = train_lockstep(nets, data.ShapesDataset(args.train_images, seed=0), args)
    val = data.ShapesDataset(args.val_images, seed=1, image_id_offset=1_000_000)
    results = {}
    for name, net in nets.items():
        metrics = evaluate.coco_evaluate(net, val, batch_size=args.batch_size)
        step_time = statistics.median(times[name][min(5, args.steps - 1):])  # skip warm-up steps
        results[name] = (step_time, metrics)
        kinds = ", ".join(f"{k} AP {m['AP']:.3f} AP50 {m['AP50']:.3f}" for k, m in metrics.items())
        print(f"{name:12s} step {step_time:.3f} s, {kinds}")
    (t_ours, m_ours), (t_tv, m_tv) = results["ours"], results["torchvision"]
    kind = "segm" if args.model == "mask" else "bbox"      # the yardstick: mask AP for Mask R-CNN
    print(f"ratio ours/torchvision: time {t_ours / t_tv:.2f}, "
          f"AP ours {m_ours[kind]['AP']:.3f} torchvision {m_tv[kind]['AP']:.3f}")


if __name__ == "__main__":
    main()
