"""The `gpu` preset prepared without a GPU: its model, built at a small image size on the CPU, starts
at chance-value losses and learns in a few steps; a training step and inference run under bf16
autocast; the CPU proof preset is its topology narrowed; workers and threads come from the cores;
and benchmarks/gpu_session.sh --cpu-smoke runs every step of the GPU session without touching
data/results."""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib import data, model, presets, train, utils
from course_lib.config import TrainConfig

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent

IMAGE_SIZE = 64
# The gpu preset's architecture (ResNet-50-FPN, 256-channel FPN and mask head, 1024-d box head) at
# 64 px, with few RoIs: the 256-channel mask head's convs on each positive RoI dominate a CPU step.
FEW_ROIS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=20, box_batch_size_per_image=16, detections_per_img=10)


def _config(**changes):
    return presets.gpu_config(IMAGE_SIZE, **{**FEW_ROIS, **changes})


@pytest.fixture(scope="module")
def batch():
    dataset = data.ShapesDataset(4, image_size=IMAGE_SIZE, seed=0)
    images, targets = data.collate_fn([dataset[1], dataset[3]])
    assert all(len(t["boxes"]) for t in targets)  # objects in both images: every loss is defined
    return list(images), list(targets)


@pytest.fixture(scope="module")
def fresh_model():
    utils.seed_everything(0)
    return model.MaskRCNN(_config()).train()


def _losses(net, batch, seed=0):
    """The losses of one forward, with the RPN's and RoI heads' sampling seeded."""
    utils.seed_everything(seed)
    return net(*batch)


def test_gpu_preset_is_resnet50_fpn_with_the_papers_heads(fresh_model):
    config = presets.gpu_run().model
    assert (config.backbone, config.fpn, config.fpn_channels, config.representation_size,
            config.mask_conv_channels) == ("resnet50", True, 256, 1024, 256)
    assert config.anchor_sizes == (32, 64, 128, 256, 512) and config.canonical_size == 144
    assert _config().anchor_sizes == (4, 8, 16, 32, 64)  # scaled with the image, as the shapes are
    backbone_params = sum(p.numel() for p in fresh_model.backbone.parameters())
    assert backbone_params == 23_508_032  # torchvision's resnet50 without its fc layer


def test_initial_losses_are_chance_values(fresh_model, batch):
    """Objectness and mask near log 2, classifier near log(num_classes), box losses those of predicting
    no change (deltas 0): the heads start uncommitted whatever the depth of the trunk."""
    with torch.no_grad():
        losses = {k: v.item() for k, v in _losses(fresh_model, batch).items()}
        still = copy.deepcopy(fresh_model)
        for layer in (still.rpn.head.bbox_pred, still.roi_heads.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        no_change = {k: v.item() for k, v in _losses(still, batch).items()}
    assert losses["loss_objectness"] == pytest.approx(math.log(2), abs=0.03)
    assert losses["loss_mask"] == pytest.approx(math.log(2), abs=0.03)
    assert losses["loss_classifier"] == pytest.approx(math.log(fresh_model.config.num_classes), abs=0.15)
    for name in ("loss_rpn_box_reg", "loss_box_reg"):
        assert losses[name] == pytest.approx(no_change[name], abs=0.05), name


def test_features_keep_their_scale_through_the_trunk(fresh_model, batch):
    """Zero-initialised last norms: C2..C5 all leave ResNet-50 at the scale of a stage's first block,
    relu of a batch-normalised projection, RMS sqrt(1/2) (torchvision's default init, where each block
    adds a unit-variance branch, gave 1.6 to 2.2 at 128 px)."""
    with torch.no_grad():
        stages = fresh_model.backbone(fresh_model.batch(batch[0]))
    rms = [f.pow(2).mean().sqrt().item() for f in stages]
    assert rms == pytest.approx([math.sqrt(0.5)] * 4, abs=0.05), rms


def test_a_few_cpu_steps_lower_the_loss(fresh_model, batch):
    net = copy.deepcopy(fresh_model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(2):
        loss = sum(_losses(net, batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    with torch.no_grad():
        totals.append(sum(_losses(net, batch).values()).item())
    assert totals[-1] < totals[0], totals


@pytest.mark.parametrize("fast_ops", [True, False], ids=["torchvision_ops", "hand_built_ops"])
def test_bf16_autocast_train_step_and_inference(batch, fast_ops):
    """``train``'s own step under CPU bf16 autocast: finite fp32 losses, gradients on every weight that
    has them; then inference under autocast returns fp32 boxes, scores and masks (as without it)."""
    utils.seed_everything(0)
    net = model.MaskRCNN(_config(fast_ops=fast_ops)).train()
    proposal_dtypes = []
    net.rpn.register_forward_hook(lambda module, args, out: proposal_dtypes.extend(p.dtype for p in out[0]))
    config = TrainConfig(steps=2, batch_size=2, lr=0.01, warmup_steps=0)
    optimizer, scheduler = train._make_optimizer(net.parameters(), config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = {"device": torch.device("cpu"), "config": config, "dtype": torch.bfloat16}
    record = train._train_step(net, net, (batch[0], batch[1]), run, optimizer, scheduler, scaler, 1)
    assert set(record) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(math.isfinite(v) for v in record.values()), record
    assert record["loss_mask"] == pytest.approx(math.log(2), abs=0.05)
    # the RPN's proposals (box geometry) stay fp32 while the convolutions run in bf16
    assert set(proposal_dtypes) == {torch.float32}
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = net(batch[0])
    for det, image in zip(detections, batch[0]):
        assert det["boxes"].dtype == det["scores"].dtype == det["masks"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64
        assert det["masks"].shape[1:] == (1, *image.shape[-2:])
        assert torch.isfinite(det["boxes"]).all() and torch.isfinite(det["masks"]).all()


def test_why_box_geometry_stays_fp32():
    """bf16 keeps 8 significant bits: a box edge at 501 px rounds to 500, at 509 px to 508."""
    edges = torch.tensor([501.0, 509.0, 63.3])
    assert edges.bfloat16().float().tolist() == [500.0, 508.0, 63.25]


def test_gpu_proof_preset_is_the_gpu_topology_narrowed():
    gpu, proof = presets.gpu_run(), presets.gpu_proof_run()
    assert proof.model.backbone == "bottleneck" and proof.model.blocks == (3, 4, 6, 3)
    topology = ("fpn", "mask_num_convs", "box_roi_size", "mask_roi_size", "mask_loss", "pooler", "aligned",
                "norm", "aspect_ratios", "rpn_fg_iou", "box_positive_fraction")
    assert all(getattr(proof.model, f) == getattr(gpu.model, f) for f in topology)
    assert (proof.train.schedule, proof.train.optimizer, proof.train.amp) == (gpu.train.schedule, "sgd", False)
    assert proof.train.warmup_steps / proof.train.steps == pytest.approx(gpu.train.warmup_steps / gpu.train.steps, abs=0.01)
    assert proof.model.anchor_sizes == tuple(s // 4 for s in gpu.model.anchor_sizes)  # 128 px images, not 512
    assert dataclasses.replace(proof.model, **{f: getattr(gpu.model, f) for f in presets.GPU_PROOF_SIZES}) == \
        presets.gpu_config(128)


@pytest.mark.parametrize("cores, gpu, expected", [
    (1, False, (0, 1)), (2, False, (0, 2)), (3, False, (1, 2)), (4, False, (1, 3)), (16, False, (4, 12)),
    (64, False, (8, 56)), (1, True, (0, 1)), (2, True, (1, 1)), (16, True, (8, 8)), (64, True, (8, 56)),
])
def test_workers_and_threads_share_the_cores(cores, gpu, expected):
    """No worker on 2 cores or fewer (a worker there took a core the model needs); never more
    workers plus threads than cores."""
    assert utils.workers_and_threads(cores, gpu) == expected
    with pytest.raises(ValueError, match="cores"):
        utils.workers_and_threads(0)


def test_presets_take_their_workers_from_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert presets.cpu_run().train.workers == presets.gpu_proof_run().train.workers == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert presets.cpu_run().train.workers == 4 and presets.gpu_run().train.workers == 8


def test_share_cores_sets_the_threads_the_workers_leave():
    before = torch.get_num_threads()
    try:
        assert utils.share_cores(1, cores=4) == 3 and torch.get_num_threads() == 3
        assert utils.share_cores(0, cores=2) == 2
        assert utils.share_cores(3, processes=2, cores=4) == 1  # never below one thread
    finally:
        torch.set_num_threads(before)


def test_gpu_session_cpu_smoke_runs_every_step_and_leaves_the_results_alone():
    """The prepared GPU session end to end on the CPU at toy size: throughput of both models, the
    loader's rate, the steps, a training run with its evaluation, and both records, in a temp folder."""
    committed = ROOT / "data" / "results"
    watched = {name: (committed / name).read_bytes() if (committed / name).exists() else None
               for name in ("gpu_run.json", "gpu_throughput.json")}
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_session.sh"), "--cpu-smoke"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = Path(re.search(r"wrote (\S+)/gpu_throughput.json", done.stdout).group(1))
    try:
        assert folder.name.startswith("gpu_session_smoke_") and not folder.is_relative_to(ROOT)
        bench = json.loads((folder / "gpu_throughput.json").read_text())
        run = json.loads((folder / "gpu_run.json").read_text())
        assert bench["status"] == run["status"] == "cpu smoke test: figures mean nothing"
        assert bench["ours"]["images_per_s"] > 0 and bench["torchvision"]["images_per_s"] > 0
        assert run["steps"] == 1 and run["curve"]["step"] == [1] and run["final"]["step"] == 1
        assert run["settings"]["model"]["backbone"] == "resnet50" and run["command"] == "benchmarks/gpu_session.sh --cpu-smoke"
        assert run["benchmark"]["ratio_images_per_s"] == bench["ratio_images_per_s"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert watched == {name: (committed / name).read_bytes() if (committed / name).exists() else None
                       for name in watched}
