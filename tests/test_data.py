"""ShapesDataset: determinism, geometry worked by hand, target invariants, input validation."""
import math

import numpy as np
import pytest
import torch

from course_lib import data, viz


def assert_same_sample(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        if key == "image_id":
            assert a[1][key] == b[1][key]
        else:
            torch.testing.assert_close(a[1][key], b[1][key], rtol=0, atol=0)


def test_constants():
    assert data.CLASSES == ("square", "circle", "triangle")
    assert data.NUM_CLASSES == 4


def test_same_seed_same_tensors_in_any_order():
    ds = data.ShapesDataset(12, seed=3)
    forward = [ds[i] for i in range(12)]
    backward = [data.ShapesDataset(12, seed=3)[i] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert_same_sample(a, b)
    assert_same_sample(ds[-1], forward[11])


def test_global_rng_state_does_not_matter():
    ds = data.ShapesDataset(3, seed=1)
    torch.manual_seed(0)
    np.random.seed(0)
    a = ds[2]
    torch.manual_seed(123)
    np.random.seed(123)
    np.random.random(10)
    assert_same_sample(a, ds[2])


def test_different_seeds_and_indices_differ():
    a, b = data.ShapesDataset(2, seed=0), data.ShapesDataset(2, seed=1)
    assert not torch.equal(a[0][0], b[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_dataloader_with_two_workers_equals_direct_indexing():
    ds = data.ShapesDataset(8, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate_fn)
    loaded = [(img, tgt) for images, targets in loader for img, tgt in zip(images, targets)]
    assert len(loaded) == 8
    for i, sample in enumerate(loaded):
        assert_same_sample(sample, ds[i])


def test_collate_fn_keeps_lists():
    ds = data.ShapesDataset(3)
    images, targets = data.collate_fn([ds[0], ds[1], ds[2]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    assert targets[1]["image_id"] == 1


def test_square_mask_worked_by_hand():
    # side 10 centred at (20, 30): x in [15, 25), y in [25, 35) -> 100 pixels
    mask = data.shape_mask("square", 20.0, 30.0, 10.0, 0.0, 64, 64)
    assert mask.sum() == 100
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (15, 25, 25, 35)


def test_circle_and_triangle_areas_near_continuous_formula():
    circle = data.shape_mask("circle", 40.0, 40.0, 30.0, 0.0, 80, 80)
    assert abs(circle.sum() - math.pi * 15 ** 2) < 0.02 * math.pi * 15 ** 2
    triangle = data.shape_mask("triangle", 40.0, 40.0, 40.0, 0.3, 80, 80)
    assert abs(triangle.sum() - math.sqrt(3) / 4 * 40 ** 2) < 0.03 * math.sqrt(3) / 4 * 40 ** 2
    with pytest.raises(ValueError, match="shape='hexagon'"):
        data.shape_mask("hexagon", 1.0, 1.0, 1.0, 0.0, 8, 8)


def test_lone_square_box_and_area():
    ds = data.ShapesDataset(200, max_objects=1, seed=2)
    squares = [ds[i][1] for i in range(len(ds))]
    squares = [t for t in squares if len(t["labels"]) == 1 and t["labels"][0] == 1]
    assert len(squares) > 20
    for target in squares:
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        width, height = x2 - x1, y2 - y1
        assert abs(width - height) <= 1  # the same side, up to one pixel of centre rounding
        assert target["area"][0] == width * height == target["masks"][0].sum()  # fills its box


def test_target_invariants():
    ds = data.ShapesDataset(40, seed=7)
    seen_empty, seen_overlap = False, False
    for i in range(len(ds)):
        image, target = ds[i]
        n = len(target["labels"])
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
        assert target["masks"].shape == (n, 128, 128) and target["masks"].dtype == torch.uint8
        assert target["labels"].dtype == torch.int64 and bool(((target["labels"] >= 1) & (target["labels"] <= 3)).all())
        assert target["image_id"] == i and target["iscrowd"].tolist() == [0] * n
        assert bool((target["masks"].sum(0) <= 1).all())  # occlusion: visible masks are disjoint
        assert bool((target["area"] >= ds.min_visible_pixels).all())
        torch.testing.assert_close(target["area"], target["masks"].flatten(1).sum(1).float())
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        hidden = ds.occlusion(i)
        assert hidden.shape == (n,) and bool(((hidden >= 0) & (hidden <= 1 - ds.min_visible_fraction)).all())
        seen_empty |= n == 0
        seen_overlap |= bool((hidden > 0).any())
    assert seen_empty and seen_overlap


def test_sizes_scale_with_image_size_and_id_offset():
    ds = data.ShapesDataset(2, image_size=256, image_id_offset=1000)
    assert (ds.min_size, ds.max_size) == (12, 100)
    image, target = ds[1]
    assert image.shape == (3, 256, 256) and target["image_id"] == 1001


@pytest.mark.parametrize("kwargs, match", [
    ({"num_images": -1}, "num_images=-1"),
    ({"num_images": 2.5}, "num_images=2.5"),
    ({"num_images": 1, "image_size": 8}, "image_size=8"),
    ({"num_images": 1, "seed": -3}, "seed=-3"),
    ({"num_images": 1, "max_objects": -1}, "max_objects=-1"),
    ({"num_images": 1, "min_size": 20, "max_size": 10}, "min_size=20"),
    ({"num_images": 1, "max_size": 120}, "max_size=120"),
    ({"num_images": 1, "min_visible_fraction": 1.5}, "min_visible_fraction=1.5"),
    ({"num_images": 1, "noise": -0.1}, "noise=-0.1"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.ShapesDataset(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="index 5"):
        data.ShapesDataset(5)[5]


def test_draw_instances_and_grid_smoke():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ds = data.ShapesDataset(3, seed=4)
    image, target = ds[0]
    n = len(target["labels"])
    fig, ax = plt.subplots()
    viz.draw_instances(ax, image, target["boxes"], target["labels"], torch.linspace(0, 1, n),
                       target["masks"][:, None].float(), title="t")
    assert ax.get_title() == "t" and ax.get_xlim() == (0, 128)
    with pytest.raises(ValueError, match="image.shape"):
        viz.draw_instances(ax, image[0], target["boxes"])
    with pytest.raises(ValueError, match="different counts"):
        viz.draw_instances(ax, image, torch.zeros(n + 1, 4), target["labels"])
    grid = viz.show_grid(ds, n=3, ncols=2)
    assert len(grid.axes) == 4
    plt.close("all")
