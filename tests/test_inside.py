"""inside.run_stages is the model: its detections equal the model's own forward; every stage has
the shape its docstring gives; the widget's plain functions survive extreme values (thresholds 0
and 1, an empty upload, a grayscale upload, an image without detections)."""
import dataclasses
import io

import matplotlib
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from course_lib import data, inside, model, predict, presets  # noqa: E402

TINY = dict(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1)


def tiny_model(**changes) -> model.MaskRCNN:
    torch.manual_seed(0)
    return model.MaskRCNN(presets.quick_config(**TINY, **changes)).eval()


@pytest.fixture(scope="module")
def net():
    return tiny_model()


@pytest.fixture(scope="module")
def image():
    return data.ShapesDataset(1, seed=3)[0][0]


@pytest.fixture(scope="module")
def stages(net, image):
    return inside.run_stages(net, image)


@pytest.mark.parametrize("fpn", [False, True], ids=["stride8", "fpn"])
def test_stages_equal_the_models_forward(fpn, image):
    net = tiny_model(fpn=fpn)
    expected = net([image])[0]
    found = inside.run_stages(net, image)["detections"]
    assert len(expected["scores"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0)


def test_stages_equal_the_models_forward_on_an_odd_sized_image(net):
    odd = torch.rand(3, 45, 70, generator=torch.Generator().manual_seed(1))   # padded to 64 x 96
    expected, found = net([odd])[0], inside.run_stages(net, odd)
    assert tuple(found["batch"].shape) == (1, 3, 64, 96)
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(found["detections"][key], expected[key], rtol=0, atol=0)


def test_stage_shapes(net, stages, image):
    cfg = net.config
    assert list(stages["maps"]) == net.backbone.strides
    for stride, fmap in stages["maps"].items():
        assert tuple(fmap.shape[-2:]) == (128 // stride, 128 // stride)
    (probs,) = stages["objectness"]                                                   # one level without FPN
    assert tuple(probs.shape) == (len(cfg.anchor_sizes), len(cfg.aspect_ratios), 128 // cfg.stride, 128 // cfg.stride)
    assert ((probs >= 0) & (probs <= 1)).all()
    p, d, m = len(stages["proposals"]), len(stages["detections"]["scores"]), 2 * cfg.mask_roi_size
    assert p <= cfg.rpn_post_nms_top_n_test and tuple(stages["proposal_scores"].shape) == (p,)
    assert len(stages["before_nms"]["boxes"]) == min(cfg.rpn_pre_nms_top_n_test, len(stages["anchors"]))
    assert tuple(stages["box_features"].shape[-2:]) == (cfg.box_roi_size, cfg.box_roi_size)
    assert len(stages["box_features"]) == p and tuple(stages["class_probs"].shape) == (p, cfg.num_classes)
    torch.testing.assert_close(stages["class_probs"].sum(1), torch.ones(p))
    assert tuple(stages["mask_logits"].shape) == (d, cfg.num_classes, m, m)
    assert tuple(stages["mask_probs"].shape) == (d, 1, m, m)
    assert tuple(stages["detections"]["masks"].shape) == (d, 1, *image.shape[-2:])


def test_objectness_views_follow_the_anchor_order(net, stages):
    """Panel [s, r] of cell (i, j) is the anchor of size s and ratio r at that cell."""
    (probs,) = stages["objectness"]
    sizes, ratios = stages["anchor_sizes"][0], stages["aspect_ratios"][0]
    s_count, r_count, h, w = probs.shape
    anchors = stages["anchors"].view(h, w, r_count, s_count, 4)                      # ratio-major per cell
    widths, heights = anchors[0, 0, ..., 2] - anchors[0, 0, ..., 0], anchors[0, 0, ..., 3] - anchors[0, 0, ..., 1]
    for r, ratio in enumerate(ratios):
        for s, size in enumerate(sizes):
            assert abs((widths[r, s] * heights[r, s]).sqrt() - size) <= 1.5             # rounded to whole pixels
            assert abs(heights[r, s] / widths[r, s] - ratio) < 0.2
    batch = stages["batch"]
    logits, _ = net.rpn.head(net.features(batch))
    torch.testing.assert_close(probs[2, 1, 3, 5], logits[0][0, 1 * s_count + 2, 3, 5].sigmoid())


def test_proposals_after_nms_are_among_the_top_k_before(stages):
    before, after = stages["before_nms"]["boxes"], stages["proposals"]
    assert (after[:, None] == before[None]).all(-1).any(1).all()                     # [P, K] -> every P found
    assert (stages["proposal_scores"][:-1] >= stages["proposal_scores"][1:]).all()  # best first


def test_times_are_positive_and_cover_every_stage(net, image, stages):
    assert tuple(stages["times"]) == inside.STAGES
    assert all(t > 0 for t in stages["times"].values())
    medians = inside.time_stages(net, image, repeats=2)
    assert tuple(medians) == inside.STAGES and all(ms > 0 for ms in medians.values())
    with pytest.raises(ValueError, match="repeats"):
        inside.time_stages(net, image, repeats=0)


def test_top_rois_are_best_first(stages):
    order = inside.top_rois(stages, 5)
    best = stages["class_probs"][order, 1:].max(1).values
    assert len(order) == 5 and (best[:-1] >= best[1:]).all()
    assert best[0] == stages["class_probs"][:, 1:].max()


def test_a_refined_model_runs_its_refiner_stage(image):
    refined = model.add_refiner(tiny_model()).eval()
    found = inside.run_stages(refined, image)
    assert tuple(found["times"])[-1] == "refine"
    torch.testing.assert_close(found["detections"]["masks"], refined([image])[0]["masks"], rtol=0, atol=0)


def test_refuses_what_is_not_one_image_for_a_mask_rcnn(net):
    with pytest.raises(ValueError, match="H x W"):
        inside.run_stages(net, torch.zeros(3, 0, 5))                                  # an empty image
    with pytest.raises(ValueError, match="0, 1"):
        inside.run_stages(net, torch.full((3, 8, 8), 255.0))                           # 8-bit pixels
    with pytest.raises(ValueError, match="with_mask"):
        inside.run_stages(model.FasterRCNN(presets.quick_config(**TINY)), torch.rand(3, 8, 8))


# ---- the widget's plain functions ---------------------------------------------------------------

def test_count_and_readout_at_the_extreme_thresholds():
    scores = torch.tensor([0.9, 0.5, 0.2])
    assert inside.count_drawn(scores, 0.0) == 3 and inside.count_drawn(scores, 1.0) == 0
    assert inside.count_drawn(scores, 0.5) == 2                                       # >=: a score on the line is drawn
    assert inside.threshold_readout(scores, 0.5, "a.png") == \
        "a.png: 2 of 3 detections drawn (score >= 0.50; best score 0.90)"
    assert inside.threshold_readout(torch.zeros(0), 1.0, "b.png") == \
        "b.png: 0 of 0 detections drawn (score >= 1.00; no detections at all)"
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            inside.count_drawn(scores, bad)


def png_bytes(mode: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_content_and_save(tmp_path):
    content = png_bytes("RGB")
    value = ({"name": "first.png", "content": memoryview(b"x")}, {"name": "shape.png", "content": memoryview(content)})
    assert inside.upload_content(value) == ("shape.png", content)                    # the last file
    assert inside.save_upload(value, tmp_path).read_bytes() == content
    escaping = ({"name": "../../outside.png", "content": memoryview(content)},)
    assert inside.save_upload(escaping, tmp_path) == tmp_path / "outside.png"
    assert inside.save_upload(({"name": "..", "content": memoryview(content)},), tmp_path) == tmp_path / "upload"
    with pytest.raises(ValueError, match="no file"):
        inside.upload_content(())
    with pytest.raises(ValueError, match="empty"):
        inside.upload_content(({"name": "empty.png", "content": memoryview(b"")},))


def test_a_grayscale_upload_goes_through_every_stage(net, tmp_path):
    value = ({"name": "gray.png", "content": memoryview(png_bytes("L", (300, 200)))},)
    image = predict.load_image(inside.save_upload(value, tmp_path), verbose=False)
    assert tuple(image.shape) == (3, 200, 300)
    found = inside.run_stages(net, predict.shrink_to(image, 128))
    assert tuple(found["detections"]["masks"].shape[-2:]) == (85, 128)
    scores = found["detections"]["scores"]
    assert inside.count_drawn(scores, 0.0) == len(scores) and inside.count_drawn(scores, 1.0) == 0
    fig = inside.draw_overview(found, data.CLASSES, 0.0, title="gray.png")             # every detection drawn
    assert fig.get_suptitle() == "gray.png"


def test_an_image_without_detections_still_draws(image):
    net = tiny_model(box_score_thresh=0.99)                                            # nothing scores that high
    found = inside.run_stages(net, image)
    assert len(found["detections"]["scores"]) == 0
    assert tuple(found["mask_logits"].shape[:2]) == (0, net.config.num_classes)
    fig = inside.draw_overview(found, data.CLASSES, 0.5)
    titles = [ax.get_title() for ax in fig.axes]
    assert "0 detections with score >= 0.50" in titles


def test_every_picture_is_titled_and_labelled(stages):
    from matplotlib.figure import Figure

    fig = Figure()
    axes = iter(fig.subplots(3, 5).flat)
    inside.draw_feature_maps([next(axes) for _ in stages["maps"]], stages)              # 2 maps
    inside.draw_objectness([next(axes) for _ in range(4)], stages)                      # 4 anchor sizes
    inside.draw_proposals(next(axes), next(axes), stages)
    inside.draw_top_rois(next(axes), [next(axes), next(axes)], stages, data.CLASSES)
    inside.draw_class_scores(next(axes), stages, data.CLASSES)
    inside.draw_mask_logits([next(axes), next(axes)], stages, 0, data.CLASSES, channels=[0, 2])
    last = next(axes)
    inside.draw_detections(last, stages, data.CLASSES, 0.0)
    drawn = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(drawn) == 15
    for ax in drawn:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    assert last.get_title() == f"{len(stages['detections']['scores'])} detections with score >= 0.00"


def test_config_changes_keep_run_stages_equal_to_forward(image):
    """The mask loss's inference rule (softmax, class-agnostic) goes through mask_probs as in the model."""
    for changes in (dict(mask_loss="softmax"), dict(mask_loss="sigmoid_agnostic")):
        net = tiny_model(**changes)
        torch.testing.assert_close(inside.run_stages(net, image)["detections"]["masks"],
                                   net([image])[0]["masks"], rtol=0, atol=0)
        assert dataclasses.asdict(net.config)["mask_loss"] == changes["mask_loss"]
