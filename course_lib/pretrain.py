"""A pretrained trunk: the course's stand-in for the ImageNet initialisation the paper starts from.

Mask R-CNN never trains its backbone from scratch: "the backbone is initialized from ImageNet
classification" (He et al. 2017, §3.1, as Faster R-CNN), and only the heads start from random
weights. Our CPU runs start everything from scratch, and their mask AP still climbs after 10,000
steps (chapter 08). Here the trunk first learns image-level labels, the kind ImageNet gives: which
of the three shapes an image holds (a multi-label classification: one sigmoid per class, read
from the globally averaged last stage), on shapes images of their own seed, so no detection
image is seen twice. The detector then starts from these weights (``load_trunk``).

Public names: ``PRETRAIN``, ``pretrain_trunk``, ``load_trunk``, ``fingerprint``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from course_lib import backbone, data, model, train, utils
from course_lib.config import ModelConfig

# The pretraining recipe: Adam with a cosine decay, batches of 32 images (each image seen once).
PRETRAIN = dict(batch_size=32, lr=0.002, warmup_steps=100)


class _Classifier(nn.Module):
    """The trunk up to C5, its last map averaged over space, one logit per shape class."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        full = dataclasses.replace(config, stride=32, fpn=False)  # every stage, whatever stride the detector uses
        self.trunk = backbone.build(full)
        self.head = nn.Linear(self.trunk.out_channels[-1], config.num_classes - 1)
        self.register_buffer("mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)
        self.size_divisible = config.size_divisible

    def forward(self, images: list[Tensor]) -> Tensor:
        """``images`` -> ``Tensor[N, num_classes - 1]`` logits, normalised as the detector does."""
        batch = model.batch_images(images, self.mean, self.std, self.size_divisible)
        return self.head(self.trunk(batch)[-1].mean(dim=(2, 3)))


def _presence(targets: list[dict], num_classes: int) -> Tensor:
    """``Tensor[N, num_classes - 1]``: 1 where the image holds at least one object of that class."""
    labels = torch.zeros(len(targets), num_classes - 1)
    for row, target in zip(labels, targets):
        row[target["labels"] - 1] = 1.0
    return labels


def pretrain_trunk(config: ModelConfig, dataset: data.ShapesDataset, steps: int, seed: int = 0,
                   val_dataset: data.ShapesDataset | None = None, progress: bool = True,
                   device: str | torch.device | None = None) -> tuple[dict, dict]:
    """Train ``config``'s trunk to name the shapes in ``dataset``'s images for ``steps`` steps, on
    ``device`` (default: the CPU).

    Returns ``(trunk state_dict on the CPU, report)``: the report holds the steps, seconds, device, the
    last 50 steps' mean loss and, with ``val_dataset``, the accuracy of every per-class presence call
    on it (chance is the share of the commoner answer, printed beside it as ``majority``).
    """
    if steps < 1:
        raise ValueError(f"steps={steps!r}; pretraining needs at least one step")
    batch_size = PRETRAIN["batch_size"]
    if len(dataset) < batch_size:
        raise ValueError(f"the pretraining set has {len(dataset)} images, fewer than a batch ({batch_size})")
    utils.seed_everything(seed)
    device = torch.device(device or "cpu")
    net = _Classifier(config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=PRETRAIN["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: train.lr_factor(step, steps, PRETRAIN["warmup_steps"], "cosine"))
    losses, tick = [], time.perf_counter()
    net.train()
    for step in tqdm(range(steps), desc="pretrain", disable=not progress):
        images, targets = zip(*(dataset[i] for i in train.batch_indices(step, len(dataset), batch_size, seed)))
        loss = nn.functional.binary_cross_entropy_with_logits(net([image.to(device) for image in images]),
                                                              _presence(targets, config.num_classes).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    report = {"steps": steps, "seconds": round(time.perf_counter() - tick, 1), "device": str(device),
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
    if val_dataset is not None:
        report.update(_accuracy(net.eval(), val_dataset, config.num_classes))
    return {k: v.cpu() for k, v in net.trunk.state_dict().items()}, report


@torch.no_grad()
def _accuracy(net: _Classifier, dataset, num_classes: int) -> dict:
    """Share of right per-class presence calls (logit > 0) on ``dataset``, and the majority baseline."""
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    truth = _presence(targets, num_classes)
    device = net.mean.device
    calls = torch.cat([net([image.to(device) for image in images[i:i + 64]]).cpu()
                       for i in range(0, len(images), 64)]) > 0
    majority = max(truth.mean().item(), 1 - truth.mean().item())
    return {"val_accuracy": round((calls == truth.bool()).float().mean().item(), 4), "majority": round(majority, 4)}


def load_trunk(net: model.MaskRCNN, trunk: dict) -> None:
    """Copy a pretrained trunk into ``net.backbone``: every one of its weights must be there with its
    shape (the trunk may hold more stages than a stride-16 detector uses; those are left out)."""
    own = net.backbone.state_dict()
    missing = [k for k in own if k not in trunk]
    wrong = [f"{k}: {tuple(trunk[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in trunk and trunk[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(f"the pretrained trunk does not fit this backbone: missing {missing[:3]}, "
                         f"wrong shapes {wrong[:3]} (pretrained with another width or backbone?)")
    net.backbone.load_state_dict({k: trunk[k] for k in own})


def fingerprint(trunk: dict) -> str:
    """12 hex digits that name a trunk's exact weights: pretraining on another CPU may differ in the last
    bits, so each grid run records which trunk it started from."""
    digest = hashlib.sha1()
    for name in sorted(trunk):
        digest.update(name.encode())
        digest.update(trunk[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
