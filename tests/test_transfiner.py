"""Mask Transfiner: incoherent regions on hand-made masks, the quadtree, pasting back, the refiner."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from course_lib import transfiner, transfiner_refiner

SIZES = (28, 56, 112)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread is as fast, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _square(size=8, top=2, left=2, side=4):
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[top:top + side, left:left + side] = 1
    return mask


def _disc_masks(num, size=112, seed=0):
    """``Tensor[num, size, size]`` float discs of random centre and radius."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centres = torch.rand(num, 2, generator=g) * size * 0.4 + size * 0.3
    radii = torch.rand(num, generator=g) * size * 0.2 + size * 0.15
    dist2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return (dist2 < radii[:, None, None] ** 2).float()


def _levels(gt112):
    """Ground truth at S/4, S/2, S by block averaging (what roi_align of the gt gives, roughly)."""
    return [F.avg_pool2d(gt112[:, None], 4)[:, 0], F.avg_pool2d(gt112[:, None], 2)[:, 0], gt112]


# ---- incoherent regions ----------------------------------------------------------------------

def test_square_on_the_grid_has_no_incoherent_pixels():
    for factor in (2, 4):
        mask = _square(size=16, top=4, left=8, side=4)
        assert not transfiner.incoherent_mask(mask, factor).any()


def test_square_shifted_by_one_pixel_has_incoherent_edges():
    mask = _square(top=3, left=3)  # rows/cols 3..6: every edge cuts a 2x2 block
    expected = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 1, 1, 0, 0],  # block rows 2-3, cols 4-5: 2 of 4 -> object
                             [0, 0, 0, 1, 0, 0, 1, 0],  # corners: 1 of 4 -> background
                             [0, 0, 1, 0, 0, 0, 0, 1],
                             [0, 0, 1, 0, 0, 0, 0, 1],
                             [0, 0, 0, 1, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(transfiner.incoherent_mask(mask, 2), expected)


def test_diagonal_edge_hand_worked():
    mask = torch.tril(torch.ones(4, 4))  # y >= x
    incoherent = transfiner.incoherent_mask(mask, 2)
    # blocks on the diagonal hold 3 of 4 object pixels: the vote says object, (0,1) and (2,3) flip
    assert incoherent.nonzero().tolist() == [[0, 1], [2, 3]]


def test_empty_and_full_masks_are_coherent():
    for mask in (torch.zeros(2, 8, 8), torch.ones(2, 8, 8)):
        assert not transfiner.incoherent_mask(mask, 2).any()
        assert not transfiner.soft_incoherent_band(mask, 2).any()


def test_dtypes_and_batch_dims_agree():
    masks = _disc_masks(3, size=32)
    ref = transfiner.incoherent_mask(masks, 2)
    assert ref.shape == (3, 32, 32) and ref.dtype == torch.bool
    assert torch.equal(transfiner.incoherent_mask(masks.bool(), 2), ref)
    assert torch.equal(transfiner.incoherent_mask(masks.to(torch.uint8), 2), ref)
    assert torch.equal(transfiner.incoherent_mask(masks[1], 2), ref[1])


def test_bad_factor_raises():
    with pytest.raises(ValueError, match="factor=3"):
        transfiner.incoherent_mask(torch.zeros(8, 8), 3)
    with pytest.raises(ValueError, match="factor"):
        transfiner.incoherent_mask(torch.zeros(8, 8), 0)


def test_coarsened_incoherence_marks_exactly_the_mixed_blocks():
    masks = (torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    for factor in (2, 4):
        block_sum = F.avg_pool2d(masks[:, None], factor)[:, 0] * factor * factor
        mixed = (block_sum > 0) & (block_sum < factor * factor)
        cells = transfiner.coarsen_incoherent(transfiner.incoherent_mask(masks, factor), factor)
        assert torch.equal(cells, mixed)


def test_soft_band_is_wider_than_strict():
    masks = _disc_masks(4, size=56)
    strict = transfiner.incoherent_mask(masks, 2)
    soft = transfiner.soft_incoherent_band(masks, 2)
    assert (soft | ~strict).all()  # strict is inside soft
    assert soft.sum() > 2 * strict.sum()
    aligned = _square(size=16, top=4, left=4, side=8)
    assert not transfiner.incoherent_mask(aligned, 2).any()
    band = transfiner.soft_incoherent_band(aligned, 2)
    assert band[4, 4:12].all() and band[3, 4:12].all() and not band[8, 8]  # both sides, not inside


# ---- quadtree --------------------------------------------------------------------------------

def test_quadtree_counts_and_parents_on_hand_case():
    roots = torch.zeros(2, 2, 2, dtype=torch.bool)
    roots[0, 0, 1] = roots[1, 1, 0] = True
    tree = transfiner.build_quadtree(roots, num_levels=3)
    assert tree.sizes == (2, 4, 8) and tree.num_nodes() == [2, 8, 32]
    assert tree.nodes[0].tolist() == [[0, 0, 1], [1, 1, 0]]
    assert tree.nodes[1][:4].tolist() == [[0, 0, 2], [0, 0, 3], [0, 1, 2], [0, 1, 3]]
    assert tree.parents[0].tolist() == [-1, -1]
    assert tree.parents[1].tolist() == [0] * 4 + [1] * 4
    for level in (1, 2):
        child, parent = tree.nodes[level], tree.nodes[level - 1][tree.parents[level]]
        assert torch.equal(child[:, 0], parent[:, 0])
        assert torch.equal(child[:, 1:] // 2, parent[:, 1:])


def test_quadtree_filtered_by_finer_incoherence():
    roots = torch.zeros(1, 2, 2, dtype=torch.bool)
    roots[0, 0, 0] = True
    fine56 = torch.zeros(1, 4, 4, dtype=torch.bool)
    fine56[0, 1, 1] = fine56[0, 3, 3] = True  # (3, 3) has no root above it: dropped
    fine112 = torch.ones(1, 8, 8, dtype=torch.bool)
    tree = transfiner.build_quadtree(roots, 3, finer_incoherent=[fine56, fine112])
    assert tree.num_nodes() == [1, 1, 4]
    assert tree.nodes[1].tolist() == [[0, 1, 1]]
    assert tree.nodes[2].tolist() == [[0, 2, 2], [0, 2, 3], [0, 3, 2], [0, 3, 3]]


def test_quadtree_rejects_bad_input():
    with pytest.raises(ValueError, match="incoherent_roots"):
        transfiner.build_quadtree(torch.zeros(2, 3, dtype=torch.bool))


# ---- pasting back ----------------------------------------------------------------------------

def test_paste_with_true_labels_on_error_cells_is_exact():
    gt112 = _disc_masks(5)
    gt = _levels(gt112)
    noise = 0.3 * torch.randn(5, 28, 28, generator=torch.Generator().manual_seed(2))
    coarse = (gt[0] + noise).clamp(0, 1)  # a coarse mask that is wrong here and there
    roots = transfiner.error_cells(coarse, gt112)
    assert roots.any()
    tree = transfiner.build_quadtree(roots, 3)
    labels = [transfiner_refiner.gather_nodes(g[:, None], n)[:, 0] for g, n in zip(gt, tree.nodes)]
    pasted = transfiner.paste_refined(coarse, labels, tree, mode="nearest")
    assert torch.equal(pasted >= 0.5, gt112.bool())  # exact as a mask
    refined = torch.zeros_like(gt112, dtype=torch.bool)
    refined[tree.nodes[2][:, 0], tree.nodes[2][:, 1], tree.nodes[2][:, 2]] = True
    assert torch.equal(pasted[refined], gt112[refined])  # and exact as values where refined
    upsampled = transfiner.upsample_nearest(coarse, 4)
    assert ((upsampled >= 0.5) != gt112.bool()).any()  # without the nodes it is wrong


def test_paste_bilinear_shape_range_and_gradient():
    coarse = torch.rand(2, 28, 28)
    roots = torch.zeros(2, 28, 28, dtype=torch.bool)
    roots[:, 10:12, 5] = True
    tree = transfiner.build_quadtree(roots, 3)
    labels = [torch.rand(n, requires_grad=True) for n in tree.num_nodes()]
    pasted = transfiner.paste_refined(coarse, labels, tree)
    assert pasted.shape == (2, 112, 112) and 0 <= pasted.min() and pasted.max() <= 1
    pasted.sum().backward()
    assert labels[2].grad.abs().min() > 0  # finest labels land untouched
    with pytest.raises(ValueError, match="mode"):
        transfiner.paste_refined(coarse, labels, tree, mode="cubic")


# ---- measurements ------------------------------------------------------------------------------

def test_error_statistics_hand_case():
    gt = torch.zeros(1, 4, 4)
    gt[0, 1, 1:3] = gt[0, 2, 1:3] = 1  # 4 object pixels
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, 1, :] = True  # a row holding 2 of them
    stats = transfiner.error_statistics(torch.zeros(1, 4, 4), gt, region)
    assert stats == {"region_area": 0.25, "errors_in_region": 0.5, "error_rate": 0.25}


def test_mask_boundary_and_boundary_fscore():
    square = _square(size=8, top=2, left=2, side=4)[None]
    boundary = transfiner.mask_boundary(square)
    assert boundary.sum() == 12 and not boundary[0, 3:5, 3:5].any()
    shifted = torch.roll(square, 1, dims=-1)
    far = torch.roll(square, 3, dims=-1)
    scores = transfiner.boundary_fscore(torch.cat([square, shifted, far]), square.repeat(3, 1, 1), tolerance=1)
    assert scores[0] == 1 and scores[1] == 1 and scores[2] < 0.5
    empty = torch.zeros(1, 8, 8)
    assert transfiner.boundary_fscore(empty, empty) == 1 and transfiner.boundary_fscore(empty, square) == 0


# ---- node encoder pieces ---------------------------------------------------------------------

def test_neighbourhood_matches_unfold():
    maps = torch.randn(2, 3, 5, 5)
    nodes = torch.tensor([[0, 0, 0], [1, 4, 2], [1, 2, 4], [0, 2, 2]])
    unfolded = F.unfold(maps, 3, padding=1).reshape(2, 27, 5, 5)  # [K, C*9, S, S]
    expected = unfolded[nodes[:, 0], :, nodes[:, 1], nodes[:, 2]]
    torch.testing.assert_close(transfiner_refiner.gather_neighbourhood(maps, nodes), expected)


def test_sine_position_encoding_hand_values():
    points = torch.tensor([[0.0, 0.25]])
    enc = transfiner_refiner.sine_position_encoding(points, 8)  # x: sin, sin, cos, cos; y: ...
    assert enc.shape == (1, 8)
    torch.testing.assert_close(enc[0, :4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(enc[0, 4], torch.tensor(1.0))  # sin(2 pi * 0.25)
    centres = transfiner_refiner.node_centres(torch.tensor([[0, 0, 27]]), 28)
    torch.testing.assert_close(centres, torch.tensor([[27.5 / 28, 0.5 / 28]]))


def test_node_sequences_cover_every_node_once():
    roi_index = torch.tensor([0] * 7 + [2] * 3 + [1] * 1)
    index, padding = transfiner_refiner.node_sequences(roi_index, max_len=3, generator=torch.Generator().manual_seed(0))
    used = index[~padding]
    assert sorted(used.tolist()) == list(range(11))
    assert index.shape == (3 + 1 + 1, 3)
    for row, pad in zip(index, padding):
        assert len(set(roi_index[row[~pad]].tolist())) == 1
    index, padding = transfiner_refiner.node_sequences(roi_index, 3, torch.Generator().manual_seed(0), first_only=True)
    assert index.shape == (3, 3) and (~padding).sum(1).tolist() == [3, 1, 3]


def test_losses_hand_values():
    torch.testing.assert_close(transfiner_refiner.refine_loss(torch.zeros(4), torch.ones(4), "l1"), torch.tensor(0.5))
    torch.testing.assert_close(transfiner_refiner.refine_loss(torch.zeros(4), torch.ones(4), "bce"),
                               torch.log(torch.tensor(2.0)))
    logits, targets = torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[True, False]]])
    expected = (torch.log(torch.tensor(2.0)) + F.softplus(torch.tensor(2.0))) / 2
    torch.testing.assert_close(transfiner_refiner.incoherent_loss(logits, targets), expected)


# ---- the refinement stage ---------------------------------------------------------------------

SMALL = (8, 16, 32)  # the refiner is size-agnostic; small grids keep these tests fast


def _two_step_upsample(coarse_probs, sizes):
    """What ``paste_refined`` gives when no node is refined: bilinear x2, level by level."""
    masks = coarse_probs[:, None]
    for size in sizes[1:]:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return masks[:, 0]


def _small_refiner(seed=0, **changes):
    torch.manual_seed(seed)
    config = transfiner_refiner.TransfinerConfig(sizes=changes.pop("sizes", SMALL), d_model=32, num_heads=4,
                                                 ffn_dim=64, detector_channels=16, max_nodes=64, **changes)
    return transfiner_refiner.TransfinerRefiner(config, in_channels=(8, 6, 4))


def _inputs(num_rois=3, seed=0, sizes=SMALL):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(num_rois, c, s, s, generator=g) for c, s in zip((8, 6, 4), sizes)]
    gt = _levels(_disc_masks(num_rois, size=sizes[-1], seed=seed))
    coarse_logits = 4 * (gt[0] - 0.5) + torch.randn(num_rois, sizes[0], sizes[0], generator=g)
    return features, coarse_logits, gt


def test_training_losses_reach_every_parameter():
    refiner = _small_refiner().train()
    features, coarse_logits, gt = _inputs()
    losses = refiner(features, coarse_logits, gt)
    assert set(losses) == {"loss_incoherent", "loss_refine"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [name for name, p in refiner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_inference_shapes_range_and_determinism():
    features, coarse_logits, _ = _inputs()
    refiner = _small_refiner(detector_thresh=0.0).eval()  # every coarse cell becomes a root
    masks = refiner(features, coarse_logits)
    assert masks.shape == (3, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    assert torch.equal(masks, refiner(features, coarse_logits))
    assert torch.equal(masks, _small_refiner(detector_thresh=0.0).eval()(features, coarse_logits))
    details = refiner.refine(features, coarse_logits)
    assert details["quadtree"].num_nodes() == [3 * 64, 3 * 64 * 4, 3 * 64 * 16]
    assert not torch.allclose(masks, _two_step_upsample(coarse_logits.sigmoid(), SMALL))


def test_paper_sizes_give_112_masks():
    features, coarse_logits, gt = _inputs(num_rois=2, sizes=SIZES)
    refiner = _small_refiner(sizes=SIZES)
    assert refiner.train()(features, coarse_logits, gt)["loss_refine"] > 0
    assert refiner.eval()(features, coarse_logits).shape == (2, 112, 112)


def test_roots_are_capped_to_the_most_confident():
    refiner = _small_refiner(detector_thresh=0.3, max_roots=5)
    probs = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    roots = refiner.select_roots(probs)
    assert roots.flatten(1).sum(1).tolist() == [5, 5, 5, 5]
    top5 = probs.flatten(1).topk(5, dim=1).indices
    assert roots.flatten(1).gather(1, top5).all()


def test_no_rois_and_no_roots():
    refiner = _small_refiner(detector_thresh=1.0)
    features, coarse_logits, gt = _inputs(num_rois=0)
    losses = refiner.train()(features, coarse_logits, gt)
    assert all(v == 0 for v in losses.values())
    assert refiner.eval()(features, coarse_logits).shape == (0, 32, 32)
    features, coarse_logits, _ = _inputs(num_rois=2)
    plain = _two_step_upsample(coarse_logits.sigmoid(), SMALL)
    torch.testing.assert_close(refiner(features, coarse_logits), plain)  # nothing to refine


def test_bad_inputs_raise():
    refiner = _small_refiner().train()
    features, coarse_logits, gt = _inputs()
    with pytest.raises(ValueError, match="coarse_mask_logits"):
        refiner(features, coarse_logits[:, :4], gt)
    with pytest.raises(ValueError, match=r"features\[2\]"):
        refiner(features[:2] + [features[2][:, :, :16, :16]], coarse_logits, gt)
    with pytest.raises(ValueError, match="gt_masks"):
        refiner(features, coarse_logits)
    with pytest.raises(ValueError, match="incoherent_target"):
        transfiner_refiner.TransfinerConfig(incoherent_target="wide")


def test_refiner_learns_boundaries_from_informative_features():
    """Features that carry the ground truth: 40 steps must beat the upsampled coarse mask."""
    torch.manual_seed(0)
    gt = _levels(_disc_masks(4, size=32, seed=3))
    coarse_logits = 6 * (transfiner.upsample_nearest(F.avg_pool2d(gt[0][:, None], 2)[:, 0], 2) - 0.5)
    features = [torch.stack([g, 1 - g], 1) for g in gt]  # [K, 2, S, S]
    config = transfiner_refiner.TransfinerConfig(sizes=SMALL, d_model=32, ffn_dim=64, detector_channels=16)
    refiner = transfiner_refiner.TransfinerRefiner(config, in_channels=2)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for _ in range(40):
        loss = sum(refiner.train()(features, coarse_logits, gt).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    refined = refiner.eval()(features, coarse_logits)
    plain = _two_step_upsample(coarse_logits.sigmoid(), SMALL)
    wrong = lambda probs: ((probs >= 0.5) != gt[2].bool()).float().mean().item()  # noqa: E731
    assert wrong(refined) < 0.5 * wrong(plain)


# ---- on top of a (here untrained) Mask R-CNN ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mask_rcnn():
    from course_lib import data, model, presets
    torch.manual_seed(0)
    return model.MaskRCNN(presets.quick_config()).eval(), data.ShapesDataset(4, seed=0)


def test_refiner_stage_trains_only_the_refiner_and_roi_masks_run(tiny_mask_rcnn, tmp_path):
    from course_lib import evaluate, model, train
    from course_lib.config import TrainConfig
    mask_rcnn, dataset = tiny_mask_rcnn
    config = transfiner_refiner.TransfinerConfig(d_model=32, ffn_dim=64, detector_channels=16, max_nodes=64)
    refined = model.add_refiner(mask_rcnn, config)
    before = {name: p.clone() for name, p in refined.named_parameters()}
    stage = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=None,
                        optimizer="adam", stage="refiner")
    history = train.fit(refined, dataset, stage, out=tmp_path, progress=False)
    assert [h["step"] for h in history["train"]] == [1, 2] and history["train"][0]["loss_refine"] > 0
    for name, p in refined.named_parameters():  # the detector is frozen, the refiner learned
        assert torch.equal(p, before[name]) != name.startswith("refiner."), name
    out = evaluate.roi_masks(refined, dataset, indices=[0, 1])
    num_objects = sum(len(dataset[i][1]["boxes"]) for i in (0, 1))
    assert out["coarse"].shape == (num_objects, 28, 28) and out["refined"].shape == (num_objects, 112, 112)
    assert out["gt_112"].shape == (num_objects, 112, 112) and out["nodes"].shape == (num_objects,)
    coarse_only = evaluate.roi_masks(mask_rcnn, dataset, indices=[0, 1])
    assert set(coarse_only) == {"coarse", "labels", "gt_28", "gt_56", "gt_112"}
    torch.testing.assert_close(coarse_only["coarse"], out["coarse"])


def test_refiner_stage_resumes_exactly(tiny_mask_rcnn, tmp_path):
    from course_lib import model, train
    from course_lib.config import TrainConfig
    mask_rcnn, dataset = tiny_mask_rcnn
    config = transfiner_refiner.TransfinerConfig(d_model=32, ffn_dim=64, detector_channels=16, max_nodes=64)
    stage = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=None,
                        optimizer="adam", stage="refiner")
    torch.manual_seed(0)
    history = train.fit(model.add_refiner(mask_rcnn, config), dataset, stage, out=tmp_path / "a", progress=False)
    torch.manual_seed(0)
    train.fit(model.add_refiner(mask_rcnn, config), dataset, stage, out=tmp_path / "b", stop_at=1, progress=False)
    torch.manual_seed(1)  # the resumed run must not depend on the fresh refiner's weights
    again = train.fit(model.add_refiner(mask_rcnn, config), dataset, stage, out=tmp_path / "b", resume=True,
                      progress=False)
    assert [h["loss"] for h in history["train"]] == [h["loss"] for h in again["train"]]


def test_refined_model_keeps_the_detections(tiny_mask_rcnn):
    from course_lib import model
    mask_rcnn, dataset = tiny_mask_rcnn
    image = dataset[0][0]
    with torch.no_grad():
        plain = mask_rcnn([image])[0]
    third_best = float(plain["scores"].sort(descending=True).values[2])
    config = transfiner_refiner.TransfinerConfig(d_model=32, ffn_dim=64, detector_channels=16, score_thresh=third_best)
    refined = model.add_refiner(mask_rcnn, config).eval()([image])[0]
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(refined[key], plain[key])
    assert refined["masks"].shape == plain["masks"].shape
    assert 0 <= refined["masks"].min() and refined["masks"].max() <= 1
    # the three most confident masks went through the refiner; the others are the plain model's
    assert not torch.equal(refined["masks"][:3], plain["masks"][:3])
    torch.testing.assert_close(refined["masks"][3:], plain["masks"][3:])


def test_refined_masks_paste_at_the_plain_masks_geometry():
    # a full 28x28 mask padded by one cell and a full 112x112 one padded by four grow the box by the
    # same factor 30/28 = 120/112, so both cross 0.5 on the box edge; one cell of 112 would not
    from course_lib import mask_head
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 80
    boxes = torch.cat([xy, xy + 6 + torch.rand(50, 2, generator=gen) * 40], dim=1)  # [50, 4] 6-46 px sides

    def pasted(size, padding):
        return mask_head.paste_masks_in_image(torch.ones(50, 1, size, size), boxes, (128, 128), padding) >= 0.5

    def iou(a, b):
        return ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1)).mean().item()

    plain = pasted(28, 1)
    assert iou(plain, pasted(112, 4)) > 0.99
    assert iou(plain, pasted(112, 4)) > iou(plain, pasted(112, 1)) + 0.02


def test_add_refiner_copies_the_detector_and_leaves_the_original():
    from course_lib import model, presets
    torch.manual_seed(0)
    plain = model.MaskRCNN(presets.quick_config())
    refined = model.add_refiner(plain)
    assert plain.refiner is None and refined.config.refiner is not None and refined.refiner is not None
    for name, value in plain.state_dict().items():
        assert torch.equal(refined.state_dict()[name], value), name
    assert all(name.startswith("refiner.") for name in set(refined.state_dict()) - set(plain.state_dict()))


def test_refine_config_needs_the_sigmoid_mask_branch():
    from course_lib import presets
    with pytest.raises(ValueError, match="refiner needs the sigmoid mask branch"):
        presets.quick_config(refiner=transfiner_refiner.TransfinerConfig(), mask_loss="softmax")
    with pytest.raises(ValueError, match="refiner needs the sigmoid mask branch"):
        presets.quick_config(refiner=transfiner_refiner.TransfinerConfig(), with_mask=False)


def test_refiner_gets_no_gradient_from_the_detector_losses():
    from course_lib import data, model, presets
    torch.manual_seed(0)
    net = model.MaskRCNN(presets.quick_config(refiner=transfiner_refiner.TransfinerConfig())).train()
    images, targets = data.collate_fn([data.ShapesDataset(2, seed=0)[i] for i in range(2)])
    losses = net(images, targets)
    assert not any(name.startswith("loss_refine") for name in losses)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in net.refiner.parameters())
    assert net.roi_heads.mask_head is not None and any(p.grad is not None for p in net.roi_heads.parameters())
