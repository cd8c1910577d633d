"""The prediction command line end to end on files the test writes, and its bad-input errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from course_lib import checkpoints, data, model, predict, presets

# a tiny random model whose every detection passes (box_score_thresh 0), few of them per image
TINY = presets.quick_config(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1,
                            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                            box_score_thresh=0.0, detections_per_img=4)
SIZES = {"rgb.png": (48, 64), "gray.png": (40, 40), "rgba.png": (40, 50), "large.png": (150, 200)}  # (H, W)


def _write_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    channels = {"rgb.png": (3, "RGB"), "gray.png": (None, "L"), "rgba.png": (4, "RGBA"), "large.png": (3, "RGB")}
    for name, (height, width) in SIZES.items():
        depth, mode = channels[name]
        shape = (height, width) if depth is None else (height, width, depth)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved tiny model, four images (one 200 x 150, over the 64 px training size), one prediction run."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    net = model.MaskRCNN(TINY).eval()
    checkpoints.save_model(root / "model.pt", net, classes=["square", "circle", "triangle"], image_size=64)
    folder = _write_images(root / "images")
    records = predict.main([str(root / "model.pt"), str(folder), "--out", str(root / "out"),
                            "--score-thresh", "0.0", "--device", "cpu", "--no-progress"])
    return root, net, records


def test_one_overlay_per_image_and_coco_results_inside_each_original_image(run):
    root, _, records = run
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name[:-4]}_pred.png" for name in SIZES] + ["detections.json", "images.json"])
    for name in SIZES:
        assert Image.open(out / f"{name[:-4]}_pred.png").size[0] >= 400  # a readable figure
    saved = json.loads((out / "detections.json").read_text())
    assert saved == records and isinstance(saved, list) and saved
    index = json.loads((out / "images.json").read_text())
    size_of = {entry["id"]: (entry["height"], entry["width"]) for entry in index["images"]}
    assert {entry["file_name"].split("/")[-1]: size_of[entry["id"]] for entry in index["images"]} == SIZES
    assert [c["name"] for c in index["categories"]] == ["square", "circle", "triangle"]
    assert {r["image_id"] for r in saved} == set(size_of)                  # every image has detections here
    for r in saved:
        height, width = size_of[r["image_id"]]
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert r["segmentation"]["size"] == [height, width] and 1 <= r["category_id"] <= 3
        assert 0 <= r["score"] <= 1


def test_a_large_image_is_shrunk_like_training_and_mapped_back(run):
    root, net, records = run
    image = predict.load_image(root / "images" / "large.png")                       # [3, 150, 200]
    small = predict.shrink_to(image, 64)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 150, 200, dtype=torch.uint8)}
    torch.testing.assert_close(small, data.Resized([(image, target)], 64)[0][0])    # exactly as training
    assert small.shape == (3, 48, 64)
    with torch.no_grad():
        by_hand = net([small])[0]
    expected = by_hand["boxes"] * torch.tensor([200 / 64, 150 / 48] * 2)
    found = predict.predict_image(net, image, train_size=64)
    torch.testing.assert_close(found["boxes"], expected)
    assert found["masks"].shape == (len(expected), 1, 150, 200)
    image_id = next(e["id"] for e in json.loads((root / "out" / "images.json").read_text())["images"]
                    if e["file_name"].endswith("large.png"))
    saved = [r["bbox"] for r in records if r["image_id"] == image_id]
    xywh = torch.cat([expected[:, :2], expected[:, 2:] - expected[:, :2]], dim=1)
    torch.testing.assert_close(torch.tensor(saved), xywh)
    assert predict.shrink_to(small, 64) is small                                     # no upscaling


def test_grayscale_and_transparent_images_become_rgb(tmp_path, capsys):
    Image.fromarray(np.full((5, 6), 200, np.uint8), "L").save(tmp_path / "g.png")
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[0, 0, 3] = 255, 255                                           # red, one opaque pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    gray = predict.load_image(tmp_path / "g.png")
    assert gray.shape == (3, 5, 6) and torch.allclose(gray, torch.full_like(gray, 200 / 255))
    clear = predict.load_image(tmp_path / "t.png")
    assert clear[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and clear[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    said = capsys.readouterr().out
    assert "g.png: L image converted to RGB" in said and "t.png: RGBA image with transparency" in said


def test_folders_expand_to_their_images_sorted(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    found = predict.collect_images([tmp_path, tmp_path / "rgb.png"])
    assert [p.name for p in found] == ["gray.png", "large.png", "rgb.png", "rgba.png"]   # a repeat counts once


def _error(*argv):
    with pytest.raises(SystemExit) as info:
        predict.main([str(a) for a in argv] + ["--no-progress", "--device", "cpu"])
    message = str(info.value)
    assert message.startswith("course_lib.predict: error: ") and "\n" not in message
    return message


def test_bad_inputs_end_in_one_line_naming_them(run, tmp_path):
    root = run[0]
    checkpoint, images = root / "model.pt", root / "images"
    (tmp_path / "x.png").write_bytes(b"\x89PNG this is not an image")
    assert "x.png' cannot be read (not an image, or corrupt)" in _error(checkpoint, tmp_path / "x.png", "--out", tmp_path / "o")
    torch.save({"a": 1}, tmp_path / "other.pt")
    assert "is not a course_lib checkpoint" in _error(tmp_path / "other.pt", images, "--out", tmp_path / "o")
    assert "does not exist" in _error(tmp_path / "missing.pt", images, "--out", tmp_path / "o")
    assert "no such file or folder" in _error(checkpoint, tmp_path / "nowhere.png", "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _error(checkpoint, tmp_path / "empty", "--out", tmp_path / "o")
    assert "--score-thresh=1.5" in _error(checkpoint, images, "--out", tmp_path / "o", "--score-thresh", "1.5")
