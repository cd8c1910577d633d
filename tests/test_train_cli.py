"""The training command line: a quick run end to end, an exact resume, COCO input, and every bad-input error."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from course_lib import checkpoints, data, distributed, presets, train, train_cli
from course_lib.config import TrainConfig


def _main(out, *flags):
    return train_cli.main(["--config", "quick", "--out", str(out), "--steps", "4", "--no-progress", *flags])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted quick run, and one stopped after step 2 then resumed."""
    root = tmp_path_factory.mktemp("runs")
    straight = _main(root / "straight")
    _main(root / "resumed", "--stop-at", "2")
    interrupted = distributed.read_jsonl(root / "resumed" / "metrics.jsonl")
    resumed = _main(root / "resumed", "--resume")
    return root, straight, interrupted, resumed


def test_quick_run_writes_metrics_checkpoints_and_summary(runs):
    root, straight, _, _ = runs
    out = root / "straight"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "run.json", "summary.json"]
    records = distributed.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]
    assert all(r["images_per_s"] > 0 and "loss_mask" in r for r in records if r["kind"] == "train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["mask_AP"] <= 1
    assert json.loads((out / "run.json").read_text())["run"]["name"] == "quick"
    checkpoint = checkpoints.read_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 4 and checkpoint["config"]["run"]["image_size"] == 64
    assert checkpoint["config"]["model"]["width"] == 16 and checkpoint["scaler"] == {}  # no fp16 scaler on a CPU


def test_resume_after_interruption_is_bit_identical(runs):
    root, straight, interrupted, resumed = runs
    assert [r["step"] for r in interrupted] == [1, 2]
    a = checkpoints.read_checkpoint(root / "straight" / "last.pt")
    b = checkpoints.read_checkpoint(root / "resumed" / "last.pt")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert [r["loss"] for r in straight["train"]] == [r["loss"] for r in resumed["train"]]
    lines = distributed.read_jsonl(root / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_from_another_config(runs):
    root = runs[0]
    with pytest.raises(SystemExit, match=r"another configuration.*run.image_size: checkpoint 64, now 48"):
        _main(root / "straight", "--resume", "--image-size", "48")
    with pytest.raises(SystemExit, match=r"model.backbone: checkpoint 'tiny', now 'resnet50'"):
        _main(root / "straight", "--resume", "--backbone", "resnet50")


def test_config_mismatch_names_each_field():
    saved = {"model": {"stride": 16, "sizes": (8, 16)}, "fit": {"lr": 0.02}}
    assert checkpoints.config_mismatch(saved, {"model": {"stride": 16, "sizes": [8, 16]}, "fit": {"lr": 0.02}}) == []
    assert checkpoints.config_mismatch(saved, {"model": {"stride": 32, "sizes": (8, 16)}, "fit": {}}) == [
        "fit.lr: checkpoint 0.02, now '<absent>'", "model.stride: checkpoint 16, now 32"]


def test_coco_format_input(tmp_path):
    folder = data.save_coco(data.ShapesDataset(4, image_size=64, seed=3), tmp_path / "coco")
    history = _main(tmp_path / "out", "--steps", "1", "--data", "coco", "--coco-images", str(folder / "images"),
                    "--coco-annotations", str(folder / "annotations.json"), "--batch-size", "2")
    assert len(history["train"]) == 1 and torch.isfinite(torch.tensor(history["train"][0]["loss"]))
    assert set(history["eval"][-1]) == {"step", "bbox", "segm"}
    assert json.loads((tmp_path / "out" / "run.json").read_text())["run"]["data"] == "coco"


def test_resized_scales_boxes_and_keeps_masks_binary():
    base = data.ShapesDataset(4, image_size=64, seed=3)
    i = max(range(4), key=lambda j: len(base[j][1]["boxes"]))
    image, target = data.Resized(base, 32)[i]
    original = base[i][1]
    assert len(original["boxes"]) > 0
    assert image.shape == (3, 32, 32) and target["masks"].shape[-2:] == (32, 32)
    torch.testing.assert_close(target["boxes"], original["boxes"] / 2)
    assert set(target["masks"].unique().tolist()) <= {0, 1}
    assert data.Resized(base, 128)[i][1]["boxes"].equal(original["boxes"])  # never enlarged
    empty = next(j for j in range(4) if len(base[j][1]["boxes"]) == 0)
    assert data.Resized(base, 32)[empty][1]["masks"].shape == (0, 32, 32)


@pytest.mark.parametrize("flags, message", [
    (["--data", "coco"], "--data coco needs --coco-images DIR and --coco-annotations FILE"),
    (["--data", "coco", "--coco-images", "/nonexistent/images", "--coco-annotations", "a.json"],
     "--coco-images '/nonexistent/images': no such folder"),
    (["--batch-size", "0"], "--batch-size=0; expected an int >= 1"),
    (["--steps", "-3"], "--steps=-3; expected an int >= 1"),
    (["--stop-at", "0"], "--stop-at=0; expected an int >= 1"),
    (["--image-size", "8"], "--image-size=8; expected at least 32 px"),
    (["--workers", "-1"], "--workers=-1"),
])
def test_bad_inputs_stop_with_a_clear_message(tmp_path, flags, message):
    with pytest.raises(SystemExit, match="course_lib.train: error: " + message.replace("(", r"\(")):
        _main(tmp_path, *flags)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(SystemExit, match="--coco-annotations .*: no such file"):
        _main(tmp_path, "--data", "coco", "--coco-images", str(tmp_path), "--coco-annotations", str(tmp_path / "x.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path):
    with pytest.raises(SystemExit, match="device='cuda' was asked for but no CUDA GPU is visible"):
        _main(tmp_path, "--device", "cuda")


class _Exploding(nn.Module):
    """A stand-in model whose box loss turns NaN at its third step."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        bad = float("nan") if self.calls == 3 else 1.0
        return {"loss_classifier": self.weight * 0.5, "loss_box_reg": self.weight * bad}


def test_nan_loss_names_the_step_and_the_loss():
    dataset = data.ShapesDataset(4, image_size=32, seed=0, max_objects=1)
    with pytest.raises(FloatingPointError, match=r"step 3: loss went bad: loss_box_reg = nan"):
        train.fit(_Exploding(), dataset, TrainConfig(steps=5, batch_size=1, warmup_steps=1), progress=False)


def test_loader_workers_keep_the_batches(tmp_path):
    dataset = data.ShapesDataset(6, image_size=32, seed=0)
    sampler = train.StepBatchSampler(6, 2, seed=4, start=1, stop=4)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=data.collate_fn)
    for step, (images, targets) in zip(range(1, 4), loader):
        expected = train.batch_indices(step, 6, 2, 4)
        assert [t["image_id"] for t in targets] == expected
        assert all(torch.equal(img, dataset[i][0]) for img, i in zip(images, expected))


def test_presets_are_frozen_and_distinct():
    runs = {name: preset() for name, preset in presets.PRESETS.items()}
    assert runs["gpu"].model.backbone == "resnet50" and runs["gpu"].model.fpn and runs["gpu"].train.amp
    assert runs["quick"].device == "cpu" and runs["cpu"].model.backbone == "tiny"
    with pytest.raises(dataclasses.FrozenInstanceError):
        runs["quick"].train.steps = 1
