"""Nothing silently wrong: every bad input is a ValueError naming the image or annotation and the value,
through the public API (``MaskRCNN.forward``, ``CocoDataset``, ``train.fit``) and the command line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from course_lib import data, model, presets, train, train_cli
from course_lib.config import TrainConfig

TINY = presets.quick_config(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1,
                            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
NAN, INF = float("nan"), float("inf")


def image():
    return torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(0))


def target(box=(4.0, 4.0, 20.0, 30.0), label=1, mask_value=1):
    masks = torch.zeros(1, 64, 48, dtype=torch.uint8)
    masks[0, 4:30, 4:20] = mask_value
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "masks": masks}


def with_pixel(value, channel=2, row=3, col=5):
    img = image()
    img[channel, row, col] = value
    return img


# ---- the model's inputs (MaskRCNN.forward -> model.validate_inputs, model._check_masks) -------------

TRAIN_CASES = {
    "0/255 mask": ([image()], [target(mask_value=255)],
                   r"targets\[0\]\['masks'\]\[0\] holds 255 at \(row 4, col 4\); masks must be 0/1"),
    "0..255 image": ([image(), image() * 255], [target(), target()],
                     r"images\[1\] has pixel values in \[0\.\d+, 25\d(\.\d+)?\]; expected floats in \[0, 1\] "
                     r"\(8-bit pixels: divide by 255\)"),
    "NaN pixel": ([with_pixel(NAN)], [target()], r"images\[0\]\[2, 3, 5\] = nan; pixels must be finite"),
    "inf pixel": ([with_pixel(-INF, 0, 0, 0)], [target()], r"images\[0\]\[0, 0, 0\] = -inf; pixels must be finite"),
    "NaN box": ([image()], [target(box=(4.0, NAN, 20.0, 30.0))],
                r"targets\[0\]\['boxes'\]\[0\] = \[4\.0, nan, 20\.0, 30\.0\] is not finite"),
    "inf box": ([image()], [target(box=(4.0, 4.0, INF, 30.0))], r"\[4\.0, 4\.0, inf, 30\.0\] is not finite"),
    "box right of the image": ([image()], [target(box=(48.0, 4.0, 60.0, 30.0))],
                               r"targets\[0\]\['boxes'\]\[0\] = \[48\.0, 4\.0, 60\.0, 30\.0\] lies wholly "
                               r"outside the 64 x 48 px image \(H x W\)"),
    "box above the image": ([image()], [target(box=(4.0, -20.0, 20.0, 0.0))], "lies wholly outside"),
    "0-based label": ([image()], [target(label=0)],
                      r"targets\[0\]\['labels'\]\[0\] = 0; expected a class label in 1\.\.3 \(config.num_classes=4 "
                      r"counts the background\) \(0 is the background: 0-based labels need \+ 1\)"),
    "negative label": ([image()], [target(label=-1)], r"targets\[0\]\['labels'\]\[0\] = -1; expected a class label"),
    "label too large": ([image()], [target(label=4)],
                        r"targets\[0\]\['labels'\]\[0\] = 4; expected a class label in 1\.\.3"),
    "float labels": ([image()], [{**target(), "labels": torch.tensor([1.0])}],
                     r"targets\[0\]\['labels'\] must be an integer Tensor\[G\], got torch.float32"),
    "0x0 image": ([torch.zeros(3, 0, 0)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                             "masks": torch.zeros(0, 0, 0, dtype=torch.uint8)}],
                  r"images\[0\] is 0 x 0 px \(H x W\); an image needs at least one pixel each way"),
    "image without columns": ([image(), torch.zeros(3, 64, 0)], [target(), target()], r"images\[1\] is 64 x 0 px"),
}


@pytest.mark.parametrize("images, targets, message", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_training_inputs_are_refused_naming_image_and_value(images, targets, message):
    net = model.MaskRCNN(TINY)
    with pytest.raises(ValueError, match=message):
        net(images, targets)


EVAL_CASES = {
    "0..255 image": (image() * 255, r"images\[0\] has pixel values in"),
    "NaN pixel": (with_pixel(NAN), r"images\[0\]\[2, 3, 5\] = nan"),
    "inf pixel": (with_pixel(INF), r"images\[0\]\[2, 3, 5\] = inf"),
    "0x0 image": (torch.zeros(3, 0, 0), r"images\[0\] is 0 x 0 px"),
    "negative pixels": (image() - 0.5, r"images\[0\] has pixel values in \[-0\.\d+, 0\.\d+\]"),
}


@pytest.mark.parametrize("bad, message", EVAL_CASES.values(), ids=EVAL_CASES.keys())
def test_images_are_checked_in_eval_mode_too(bad, message):
    net = model.MaskRCNN(TINY).eval()
    with pytest.raises(ValueError, match=message):
        net([bad])


def test_good_inputs_pass_including_a_box_partly_outside_and_float_masks():
    torch.manual_seed(0)
    net = model.MaskRCNN(TINY)
    partly_outside = target(box=(-5.0, 50.0, 20.0, 70.0))                  # COCO clips such boxes
    soft_free = {**target(), "masks": target()["masks"].float()}           # 0.0 / 1.0 floats are 0/1
    edge = with_pixel(1.0 + 1e-4)                                          # resize rounding is tolerated
    losses = net([image(), edge], [partly_outside, soft_free])
    assert all(torch.isfinite(v) for v in losses.values())


class _Mapped(torch.utils.data.Dataset):
    """A data set whose targets pass through ``change`` (a learner's loader with a bug)."""

    def __init__(self, change):
        self.base, self.change = data.ShapesDataset(4, image_size=64, seed=1, max_objects=2), change

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, target = self.base[i]
        return self.change(image, {**target})


@pytest.mark.parametrize("change, message", [
    (lambda img, t: (img, {**t, "masks": t["masks"] * 255}), r"targets\[\d\]\['masks'\]\[0\] holds 255"),
    (lambda img, t: (img * 255, t), r"images\[\d\] has pixel values in"),
    (lambda img, t: (img, {**t, "labels": t["labels"] - 1}), r"0 is the background: 0-based labels need \+ 1"),
], ids=["0/255 masks", "0..255 images", "0-based labels"])
def test_fit_stops_at_the_first_step_on_a_buggy_loader(change, message):
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1)
    with pytest.raises(ValueError, match=message):
        train.fit(model.MaskRCNN(TINY), _Mapped(change), config, progress=False)


# ---- COCO-format input (data.CocoDataset) -------------------------------------------------------

@pytest.fixture
def coco(tmp_path):
    """A valid COCO folder of 3 shapes images (64 px) and a helper to rewrite its json."""
    folder = data.save_coco(data.ShapesDataset(3, image_size=64, seed=7, max_objects=3), tmp_path / "coco")
    annotations = folder / "annotations.json"
    content = json.loads(annotations.read_text())
    assert len(content["annotations"]) >= 2

    def rewrite(change):
        changed = json.loads(annotations.read_text())
        change(changed)
        annotations.write_text(json.dumps(changed))
        return folder / "images", annotations
    return folder / "images", annotations, rewrite


def _drop(entry, key):
    del entry[key]


COCO_JSON_CASES = {
    "duplicate category id": (lambda d: d["categories"][2].update(id=1),
                              r"categories of '.*annotations.json': category id 1 is used twice"),
    "annotation without bbox": (lambda d: _drop(d["annotations"][1], "bbox"),
                                r"annotations\[1\] \(id 2\) of '.*annotations.json' has no 'bbox'"),
    "annotation without category_id": (lambda d: _drop(d["annotations"][0], "category_id"),
                                       r"annotations\[0\] \(id 1\) of '.*' has no 'category_id'"),
    "annotation without segmentation": (lambda d: _drop(d["annotations"][0], "segmentation"),
                                        r"annotations\[0\] \(id 1\) of '.*' has no 'segmentation'"),
    "RLE of another size": (lambda d: d["annotations"][1]["segmentation"].update(size=[32, 64]),
                            r"annotations\[1\] \(id 2\) of '.*': RLE size \[32, 64\] is not its image's "
                            r"\[height, width\] \[64, 64\]"),
    "file_name with ..": (lambda d: d["images"][1].update(file_name="../x.png"),
                          r"images\[1\] \(id 1\) of '.*': file_name '\.\./x\.png' leaves the image folder"),
    "absolute file_name": (lambda d: d["images"][0].update(file_name="/etc/passwd"),
                           r"images\[0\] \(id 0\) of '.*': file_name '/etc/passwd' leaves the image folder"),
    "duplicate image id": (lambda d: d["images"][2].update(id=0),
                           r"images\[2\] \(id 0\) of '.*': image id 0 is used twice"),
    "annotation of an unknown image": (lambda d: d["annotations"][0].update(image_id=99),
                                       r"annotations\[0\] \(id 1\) of '.*': image_id 99 is not in 'images'"),
    "bbox not xywh": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                      r"bbox \[1, 2, 3\] is not \[x, y, width, height\]"),
    "image without size": (lambda d: _drop(d["images"][0], "height"), r"images\[0\] \(id 0\) of '.*' has no 'height'"),
}


@pytest.mark.parametrize("change, message", COCO_JSON_CASES.values(), ids=COCO_JSON_CASES.keys())
def test_coco_json_errors_are_refused_at_construction(coco, change, message):
    image_dir, annotations = coco[2](change)
    with pytest.raises(ValueError, match=message):
        data.CocoDataset(image_dir, annotations)


def test_image_of_another_size_than_the_json_is_refused_when_read(coco):
    image_dir, annotations, _ = coco
    Image.fromarray(np.zeros((60, 64, 3), np.uint8)).save(image_dir / "000001.png")
    ds = data.CocoDataset(image_dir, annotations)
    ds[0]
    with pytest.raises(ValueError, match=r"image file '.*000001.png' \(image id 1\) is 60 x 64 px but "
                                         r"'.*annotations.json' says 64 x 64 \(height x width\)"):
        ds[1]


def test_unreadable_image_file_is_named(coco):
    image_dir, annotations, _ = coco
    (image_dir / "000002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image file '.*000002.png' \(image id 2\) cannot be read"):
        data.CocoDataset(image_dir, annotations)[2]


def _cli(out, *flags):
    return train_cli.main(["--config", "quick", "--out", str(out), "--steps", "1", "--batch-size", "1",
                           "--no-progress", *flags])


def test_coco_errors_end_in_one_line_on_the_command_line(coco, tmp_path):
    image_dir, annotations, rewrite = coco
    rewrite(lambda d: _drop(d["annotations"][1], "bbox"))
    no_bbox = r"^course_lib.train: error: annotations\[1\] \(id 2\) of '.*' has no 'bbox'$"
    with pytest.raises(SystemExit, match=no_bbox):
        _cli(tmp_path / "out", "--data", "coco", "--coco-images", str(image_dir), "--coco-annotations",
             str(annotations))
    rewrite(lambda d: d["annotations"][1].update(bbox=[0, 0, 5, 5]))
    Image.fromarray(np.zeros((60, 64, 3), np.uint8)).save(image_dir / "000000.png")
    with pytest.raises(SystemExit, match=r"^course_lib.train: error: image file '.*000000.png' \(image id 0\) "
                                         r"is 60 x 64 px"):
        _cli(tmp_path / "out", "--data", "coco", "--coco-images", str(image_dir), "--coco-annotations",
             str(annotations), "--eval-on-train")
    with pytest.raises(SystemExit, match=r"^course_lib.train: error: image file '.*000000.png' \(image id 0\) "
                                         r"is 60 x 64 px but .* \(in a DataLoader worker\)$"):
        _cli(tmp_path / "out2", "--data", "coco", "--coco-images", str(image_dir), "--coco-annotations",
             str(annotations), "--eval-on-train", "--workers", "1", "--batch-size", "3")


# ---- the run itself: train.fit and the command line refuse before any work --------------------------

@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -1), ("batch_size", 0), ("batch_size", -2)])
def test_train_config_refuses_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}={value}; expected an int >= 1"):
        TrainConfig(**{field: value})


def test_fit_refuses_stop_at_below_one_and_an_out_file(tmp_path):
    dataset, config = data.ShapesDataset(2, image_size=64), TrainConfig(steps=1, batch_size=1)
    with pytest.raises(ValueError, match="stop_at=0; expected a step >= 1"):
        train.fit(model.MaskRCNN(TINY), dataset, config, stop_at=0, progress=False)
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(ValueError, match="a_file' is a file"):
        train.fit(model.MaskRCNN(TINY), dataset, config, out=tmp_path / "a_file", progress=False)
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps=0; expected an int >= 1"),
    (["--batch-size", "0"], "--batch-size=0; expected an int >= 1"),
    (["--batch-size", "-1"], "--batch-size=-1; expected an int >= 1"),
    (["--stop-at", "0"], "--stop-at=0; expected an int >= 1"),
    (["--stop-at", "-5"], "--stop-at=-5; expected an int >= 1"),
])
def test_command_line_refuses_bad_sizes_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=f"^course_lib.train: error: {message}$"):
        _cli(tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(SystemExit, match=r"^course_lib.train: error: --out '.*a_file' is a file; give a folder"):
        _cli(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_overwrite_removes_the_old_runs_summary_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _cli(out)
    assert (out / "summary.json").exists()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the new run stops before it writes anything of its own

    monkeypatch.setattr(train_cli.train, "fit", crash)
    with pytest.raises(KeyboardInterrupt):
        _cli(out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # no summary, checkpoint or metrics of the old run


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    _cli(out)
    first = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"^course_lib.train: error: '.*run' already holds a run \(last.pt, best.pt, "
                                         r"metrics.jsonl\): resume it \(resume=True, --resume\) or replace it "
                                         r"\(overwrite=True, --overwrite\), or choose another folder$"):
        _cli(out)
    assert (out / "last.pt").read_bytes() == first                         # the old run is untouched
    history = _cli(out, "--overwrite", "--steps", "2")
    assert [h["step"] for h in history["train"]] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == [1, 2]


def test_image_size_flag_says_the_presets_anchors_stay(tmp_path, capsys):
    _cli(tmp_path / "run", "--image-size", "48")
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note:"))
    assert note.startswith("note: --image-size 48 px keeps the quick preset's anchors (")
    assert "chosen for its 64 px images" in note
    _cli(tmp_path / "same", "--image-size", "64")   # the preset's own size: nothing to say
    assert "note:" not in capsys.readouterr().out
