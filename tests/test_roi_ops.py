"""RoIPool and RoIAlign against hand-worked values and torchvision's C++ kernels, plus the
chapter 04 teaching helpers (the paper's worked example, the widget's read-out)."""
import itertools
import math

import pytest
import torch
import torchvision

from course_lib import roi_ops, roi_teaching

torch.set_num_threads(2)


def random_case(seed: int, dtype=torch.float32, k: int = 8):
    """A random feature map and boxes that go off the map, are tiny, zero-size or inverted."""
    g = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(1, 13, (2,), generator=g))
    n = 1 + seed % 2
    scale = (1.0, 0.5, 0.25, 1 / 3)[seed % 4]
    features = torch.randn(n, 3, h, w, generator=g, dtype=dtype)
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * (max(h, w) / scale + 8) - 4
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * (max(h, w) / scale) * 1.2 - 1
    wh[0] = 0.0  # zero-size box
    wh[1] = torch.tensor([0.3, 0.2], dtype=dtype)  # smaller than one cell
    idx = torch.randint(0, n, (k, 1), generator=g).to(dtype)
    return features, torch.cat([idx, xy, xy + wh], 1), scale


# ---------------------------------------------------------------- hand-worked values
ARANGE = torch.arange(25.0).reshape(1, 1, 5, 5)  # value = 5 * row + column
BOX = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]])


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_hand_worked_first_row(sampling_ratio):
    # aligned=False: bins 0.5 cells wide from x = 1, sample centres at 1.25, 1.75, ...; on a
    # linear map the mean is the value at the bin centre: 5 * 1.25 + (1.25, 1.75, 2.25, 2.75).
    legacy = roi_ops.roi_align(ARANGE, BOX, 4, 1.0, sampling_ratio, aligned=False)
    torch.testing.assert_close(legacy[0, 0, 0], torch.tensor([7.5, 8.0, 8.5, 9.0]))
    # aligned=True shifts everything by -0.5 cell: 5 * 0.75 + (0.75, 1.25, 1.75, 2.25).
    aligned = roi_ops.roi_align(ARANGE, BOX, 4, 1.0, sampling_ratio, aligned=True)
    torch.testing.assert_close(aligned[0, 0, 0], torch.tensor([4.5, 5.0, 5.5, 6.0]))


def test_roi_pool_hand_worked():
    # round(1)=1, round(3)=3, +1 -> cells 1..3 (3 cells); 2 bins of 1.5 -> rows [1, 3) and [2, 4)
    out = roi_ops.roi_pool(ARANGE, BOX, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[12.0, 13.0], [17.0, 18.0]]))
    half = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]])  # C++ round: 0.5 -> 1 and 2.5 -> 3 (away from 0)
    torch.testing.assert_close(roi_ops.roi_pool(ARANGE, half, 1)[0, 0, 0, 0], torch.tensor(18.0))


# ---------------------------------------------------------------- agreement with torchvision
@pytest.mark.parametrize("seed", range(12))
def test_roi_align_matches_torchvision(seed):
    features, rois, scale = random_case(seed)
    for size, ratio, aligned in itertools.product([1, (2, 3), 7], [-1, 0, 1, 2, 3], [False, True]):
        ours = roi_ops.roi_align(features, rois, size, scale, ratio, aligned)
        theirs = torchvision.ops.roi_align(features, rois, size, scale, ratio, aligned)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(16))
def test_roi_pool_matches_torchvision(seed):
    features, rois, scale = random_case(seed)
    for size in [1, (2, 3), 7]:
        ours = roi_ops.roi_pool(features, rois, size, scale)
        theirs = torchvision.ops.roi_pool(features, rois, size, scale)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_backward_matches_torchvision(seed, op):
    features, rois, scale = random_case(100 + seed)
    kwargs = {"sampling_ratio": -1, "aligned": seed % 2 == 0} if op == "roi_align" else {}
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = getattr(roi_ops, op)(ours_in, rois, (3, 4), scale, **kwargs)
    theirs = getattr(torchvision.ops, op)(theirs_in, rois, (3, 4), scale, **kwargs)
    grad_out = torch.randn_like(theirs)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=0)


def test_roi_pool_gradient_goes_to_first_max_on_ties():
    ones = torch.ones(1, 1, 6, 6, requires_grad=True)
    twin = torch.ones(1, 1, 6, 6, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]])
    roi_ops.roi_pool(ones, rois, 2).sum().backward()
    torchvision.ops.roi_pool(twin, rois, 2).sum().backward()
    torch.testing.assert_close(ones.grad, twin.grad)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck_float64(aligned):
    features = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, -1.5, 2.2, 3.3, 7.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_ops.roi_align(f, rois, (2, 3), 0.9, -1, aligned),
                                    (features,))


def test_float64_matches_torchvision():
    features, rois, scale = random_case(7, torch.float64)
    for aligned in (False, True):
        torch.testing.assert_close(roi_ops.roi_align(features, rois, 5, scale, -1, aligned),
                                   torchvision.ops.roi_align(features, rois, 5, scale, -1, aligned))
    torch.testing.assert_close(roi_ops.roi_pool(features, rois, 5, scale),
                               torchvision.ops.roi_pool(features, rois, 5, scale))


def test_corner_boxes():
    features = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, -30.0, -30.0, -20.0, -20.0],  # wholly outside (top-left)
                         [0, 20.0, 20.0, 40.0, 40.0],  # wholly outside (bottom-right)
                         [0, 3.0, 3.0, 1.0, 1.0],  # inverted
                         [0, 2.0, 2.0, 2.0, 2.0],  # a point
                         [0, -2.0, 1.0, 7.0, 3.5]])  # partly outside
    for aligned, ratio in itertools.product([False, True], [-1, 2]):
        torch.testing.assert_close(roi_ops.roi_align(features, rois, 3, 1.0, ratio, aligned),
                                   torchvision.ops.roi_align(features, rois, 3, 1.0, ratio, aligned))
    pooled = roi_ops.roi_pool(features, rois, 3)
    torch.testing.assert_close(pooled, torchvision.ops.roi_pool(features, rois, 3))
    assert pooled[0].abs().sum() == 0 and pooled[1].abs().sum() == 0  # empty bins give 0


# ---------------------------------------------------------------- argument forms
def test_list_of_boxes_and_empty_lists():
    features = torch.randn(3, 4, 8, 8)
    boxes = [torch.tensor([[1.0, 1, 5, 5], [0, 0, 7, 3]]), torch.zeros(0, 4), torch.tensor([[2.0, 2, 6, 7]])]
    for op in ("roi_align", "roi_pool"):
        ours = getattr(roi_ops, op)(features, boxes, (2, 3), 0.5)
        torch.testing.assert_close(ours, getattr(torchvision.ops, op)(features, boxes, (2, 3), 0.5))
        assert getattr(roi_ops, op)(features, torch.zeros(0, 5), 3).shape == (0, 4, 3, 3)
        assert getattr(roi_ops, op)(features, [torch.zeros(0, 4)], 3).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("pooler", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("aligned", [False, True])
def test_pool_rois_fast_and_hand_built_agree(pooler, aligned):
    features, rois, scale = random_case(3)
    fast = roi_ops.pool_rois(features, rois, 7, scale, pooler, 2, aligned, fast=True)
    slow = roi_ops.pool_rois(features, rois, 7, scale, pooler, 2, aligned, fast=False)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooler"):
        roi_ops.pool_rois(features, rois, 7, scale, "roi_max")


@pytest.mark.parametrize("bad, match", [
    (dict(input=torch.randn(3, 5, 5)), "input"),
    (dict(boxes=torch.zeros(2, 4)), "boxes"),
    (dict(boxes=[torch.zeros(2, 5)]), "boxes"),
    (dict(boxes=torch.zeros(2, 5, dtype=torch.float64)), "dtype"),
    (dict(boxes=torch.tensor([[2.0, 0, 0, 1, 1]])), "image indices"),
    (dict(boxes=torch.tensor([[0.0, 0, 0, float("nan"), 1]])), "NaN"),
    (dict(output_size=0), "output_size"),
    (dict(output_size=(2, 3, 4)), "output_size"),
    (dict(spatial_scale=0.0), "spatial_scale"),
])
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_bad_inputs_raise_value_error(bad, match, op):
    args = dict(input=torch.randn(1, 2, 5, 5), boxes=torch.tensor([[0.0, 0, 0, 2, 2]]), output_size=2,
                spatial_scale=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        getattr(roi_ops, op)(args["input"], args["boxes"], args["output_size"], args["spatial_scale"])


def test_roi_align_rejects_a_non_int_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_ops.roi_align(torch.randn(1, 2, 5, 5), torch.tensor([[0.0, 0, 0, 2, 2]]), 2, 1.0, 2.5)


def test_no_gradient_to_boxes_as_torchvision():
    boxes = torch.tensor([[0.0, 0.5, 0.5, 3.2, 3.7]], requires_grad=True)
    out = roi_ops.roi_align(torch.randn(1, 2, 5, 5, requires_grad=True), boxes, 2, 1.0, 2, True)
    out.sum().backward()
    assert boxes.grad is None


# ---------------------------------------------------------------- teaching helpers
def test_paper_worked_example():
    ex = roi_teaching.quantization_example()  # 800 px image, stride 32, 665 px box, 7 x 7
    assert ex["feature_size"] == 25
    assert round(ex["box_cells"], 2) == 20.78 and ex["roi_cells"] == 20
    assert round(ex["bin_cells"], 2) == 2.86 and ex["bin_quantized"] == 2
    assert ex["covered_cells"] == 14 and ex["covered_px"] == 448
    assert ex["lost_px_first"] == pytest.approx(25.0) and ex["lost_px_second"] == 192
    assert round(ex["align_bin_cells"], 2) == 2.97 and ex["samples_per_bin"] == 4
    # torchvision's RoIPool rounds 20.78 up to 21 and counts the end cell: 22 cells
    assert ex["torchvision_roi_cells"] == 22
    cells = roi_teaching.roi_pool_cells([0, 0, 665, 665], 32, 7, (25, 25))
    assert cells["rounded_cells"].tolist() == [0, 0, 21, 21]
    assert cells["x_bins"][:, 0].tolist() == [math.floor(i * 22 / 7) for i in range(7)]
    assert cells["x_bins"][:, 1].tolist() == [min(math.ceil((i + 1) * 22 / 7), 25) for i in range(7)]


def test_roi_pool_cells_are_the_bins_roi_pool_maxes_over():
    features, rois, scale = random_case(4)
    box = rois[-1, 1:].tolist()
    cells = roi_teaching.roi_pool_cells(box, 1 / scale, (2, 3), tuple(features.shape[-2:]))
    out = roi_ops.roi_pool(features[:1], torch.tensor([[0.0] + box]), (2, 3), scale)
    for i, (ys, ye) in enumerate(cells["y_bins"].tolist()):
        for j, (xs, xe) in enumerate(cells["x_bins"].tolist()):
            region = features[0, :, ys:ye, xs:xe]
            want = region.amax((1, 2)) if region.numel() else torch.zeros(3)
            torch.testing.assert_close(out[0, :, i, j], want)


def test_roi_align_points_reproduce_roi_align():
    # Interpolating the sample points by hand (grid_sample at pixel centres) gives roi_align.
    features = torch.randn(1, 2, 8, 8)
    box, stride = [5.0, 9.0, 27.0, 21.0], 4
    pts = roi_teaching.roi_align_points(box, stride, (3, 2), 2, aligned=True)
    yy, xx = torch.meshgrid(pts["ys_px"].reshape(-1), pts["xs_px"].reshape(-1), indexing="ij")
    grid = torch.stack([xx / (8 * stride) * 2 - 1, yy / (8 * stride) * 2 - 1], -1)[None].float()
    samples = torch.nn.functional.grid_sample(features, grid, align_corners=False)  # [1, 2, 6, 4]
    by_hand = samples.reshape(1, 2, 3, 2, 2, 2).mean((3, 5))
    torch.testing.assert_close(by_hand, roi_ops.roi_align(features, [torch.tensor([box])], (3, 2),
                                                          1 / stride, 2, True))


def test_quantization_error_grows_with_stride_and_aligned_has_none():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 60 + 4], 1)
    pool = [roi_teaching.quantization_error(boxes, s, 7, "roi_pool")["mean_px"] for s in (4, 8, 16, 32)]
    assert pool == sorted(pool) and pool[-1] > 4 * pool[0] * 0.8
    for s in (4, 8, 16, 32):
        assert roi_teaching.quantization_error(boxes, s, 7, "roi_align", aligned=True)["max_px"] < 1e-9
        legacy = roi_teaching.quantization_error(boxes, s, 7, "roi_align", aligned=False)
        assert legacy["mean_px"] >= s / 2 - 1e-9  # the half-cell shift, at least


@pytest.mark.parametrize("stride", [4, 8, 16, 32])
@pytest.mark.parametrize("output_size", [1, 7, 14])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 4])
@pytest.mark.parametrize("aligned", [False, True])
def test_widget_readout_over_its_range(stride, output_size, sampling_ratio, aligned):
    for x, y, w, h in [(0, 0, 0, 0), (127.9, 127.9, 0.1, 0.1), (0.05, 63.55, 128, 0.5), (-20, 140, 64, 64)]:
        r = roi_teaching.roi_readout(x, y, w, h, stride, output_size, sampling_ratio, aligned)
        assert all(math.isfinite(v) for v in r.values())
        assert r["roipool_w_cells"] >= 1 and r["roipool_max_px"] >= r["roipool_mean_px"] >= 0
        if aligned:
            assert r["roialign_max_px"] < 1e-6  # aligned bins are exact
        if sampling_ratio > 0:
            assert r["samples_per_bin"] == sampling_ratio ** 2
        text = roi_teaching.readout_text(r)
        assert f"{r['roipool_max_px']:.2f} px" in text and f"{r['roialign_bin_cells']:.2f} cells" in text
    with pytest.raises(ValueError, match="w and h"):
        roi_teaching.roi_readout(0, 0, -1, 5, stride)


def test_mask_roundtrip_roialign_beats_roipool_on_a_small_circle():
    yy, xx = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    mask = (((xx - 53.3) ** 2 + (yy - 61.7) ** 2) <= 10.0 ** 2).to(torch.uint8)  # 20 px circle
    box = [43.3, 51.7, 63.3, 71.7]
    _, iou_pool = roi_teaching.mask_roundtrip(mask, box, 8, 14, "roi_pool")
    pasted, iou_align = roi_teaching.mask_roundtrip(mask, box, 8, 14, "roi_align")
    assert pasted.shape == mask.shape and pasted.dtype == torch.uint8
    assert iou_align > iou_pool and iou_align > 0.7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_cuda_matches_torchvision(op):
    features, rois, scale = random_case(11)
    features, rois = features.cuda().requires_grad_(), rois.cuda()
    kwargs = {"sampling_ratio": -1, "aligned": True} if op == "roi_align" else {}
    ours = getattr(roi_ops, op)(features, rois, 5, scale, **kwargs)
    theirs = getattr(torchvision.ops, op)(features, rois, 5, scale, **kwargs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    grad_ours, = torch.autograd.grad(ours.sum(), features)
    grad_theirs, = torch.autograd.grad(theirs.sum(), features)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- adaptive grid, in chunks
def large_rois_case(seed: int = 0):
    """A [1, 2, 240, 300] map, 5 RoIs nearly as large as it (one partly off the map) and 3 tiny
    ones (zero-size, under a cell, slightly inverted): an adaptive grid of up to 43 x 35."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 2, 240, 300, generator=g)
    large = torch.tensor([[0.0, 0, 0, 299, 239], [0, -40, 10, 260, 250], [0, 20, 5, 290, 230],
                          [0, 3.5, 7.2, 280.1, 200.9], [0, 100, 30, 298, 238]])
    tiny = torch.tensor([[0.0, 50, 50, 50, 50], [0, 10.2, 20.1, 10.5, 20.3], [0, 30, 30, 29.6, 31]])
    return features, torch.cat([large, tiny])[torch.randperm(8, generator=g)]


@pytest.mark.parametrize("budget", [None, 120_000])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_adaptive_in_chunks_matches_torchvision(monkeypatch, budget, aligned):
    # default budget: the RoIs split into groups; 120,000 entries: large RoIs cut into bands
    if budget:
        monkeypatch.setattr(roi_ops, "_CHUNK_ENTRIES", budget)
    features, rois = large_rois_case()
    grid = roi_ops.roi_align_samples(rois, (7, 7), 1.0, -1, aligned)["grid"]
    assert len(roi_ops._align_chunks(grid, (7, 7), roi_ops._CHUNK_ENTRIES)) > 1  # really chunked
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = roi_ops.roi_align(ours_in, rois, 7, 1.0, -1, aligned)
    theirs = torchvision.ops.roi_align(theirs_in, rois, 7, 1.0, -1, aligned)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(theirs)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=0)


def test_roi_align_adaptive_tables_stay_within_the_chunk_budget(monkeypatch):
    # One table for all 8 RoIs would hold 8 x 7 x 7 x 43 x 43 x 4 = 2.9 M entries (the largest
    # grid for every RoI), 35 MB. Chunked, no table handed to embedding_bag, in forward or in
    # backward's recomputation, exceeds the budget, and autograd keeps none between the passes.
    budget = 200_000
    monkeypatch.setattr(roi_ops, "_CHUNK_ENTRIES", budget)
    sizes, saved = [], {}  # saved: bytes of each distinct storage autograd keeps for backward
    embedding_bag = torch.nn.functional.embedding_bag

    def spy(index, *args, **kwargs):
        sizes.append(index.numel())
        return embedding_bag(index, *args, **kwargs)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    monkeypatch.setattr(roi_ops.F, "embedding_bag", spy)
    features, rois = large_rois_case()
    x = features.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = roi_ops.roi_align(x, rois, 7, 1.0, -1, True)
    forward = list(sizes)
    out.sum().backward()
    assert sum(forward) > 5 * budget and max(sizes) <= budget
    assert sorted(sizes) == sorted(forward * 2)  # backward recomputed the same chunks
    assert sum(saved.values()) < 12 * budget  # 8 B index + 4 B weight: not even one full chunk
