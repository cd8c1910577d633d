"""COCO json out and in: round trips through pycocotools, a hand-written set, every error."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from course_lib import data


def coco_api(dataset_dict):
    api = COCO()
    api.dataset = dataset_dict
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def test_to_coco_round_trip_through_pycocotools():
    ds = data.ShapesDataset(8, seed=11)
    coco = json.loads(json.dumps(data.to_coco(ds)))  # must survive json
    assert [c["name"] for c in coco["categories"]] == list(data.CLASSES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    api = coco_api(coco)
    assert len(coco["images"]) == 8 and len(coco["annotations"]) == sum(len(ds[i][1]["labels"]) for i in range(8))
    for i in range(len(ds)):
        _, target = ds[i]
        anns = api.imgToAnns[target["image_id"]]
        assert [a["category_id"] for a in anns] == target["labels"].tolist()
        for ann, box, mask in zip(anns, target["boxes"], target["masks"]):
            np.testing.assert_array_equal(api.annToMask(ann), mask.numpy())
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == box.tolist()
            assert ann["area"] == mask.sum() == mask_utils.area(ann["segmentation"])
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)


def test_save_coco_then_coco_dataset_equals_shapes(tmp_path):
    ds = data.ShapesDataset(6, seed=12, image_id_offset=100)
    out = data.save_coco(ds, tmp_path / "shapes")
    back = data.CocoDataset(out / "images", out / "annotations.json")
    assert len(back) == 6 and back.classes == data.CLASSES
    assert back.cat_id_to_label == {1: 1, 2: 2, 3: 3}
    for i in range(6):
        (image, target), (image2, target2) = ds[i], back[i]
        torch.testing.assert_close(image2, image, rtol=0, atol=0.5 / 255 + 1e-6)  # uint8 PNG
        assert target2["image_id"] == target["image_id"] == 100 + i
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            torch.testing.assert_close(target2[key], target[key], rtol=0, atol=0)


def square(height, width, x1, y1, x2, y2):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def write_handmade_set(root):
    """Two images: the first with polygon, compressed RLE, uncompressed RLE, crowd, degenerate
    and partly outside annotations; the second with none. Category ids 7, 3, 12 (gappy)."""
    (root / "img").mkdir()
    for name, (h, w) in {"a.png": (20, 30), "b.png": (16, 16)}.items():
        pixels = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
        Image.fromarray(pixels).save(root / "img" / name)
    rle = mask_utils.encode(np.asfortranarray(square(20, 30, 15, 4, 25, 9)))
    rle["counts"] = rle["counts"].decode("ascii")
    uncompressed = {"size": [20, 30], "counts": [20 * 2 + 10, 10, 540]}  # column-major
    crowd = {"size": [20, 30], "counts": [200, 40, 360]}  # columns 10 and 11
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 6], "area": 60, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [15, 4, 10, 5], "area": 50, "iscrowd": 0,
         "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 12, "bbox": [2, 10, 1, 10], "area": 10, "iscrowd": 0,
         "segmentation": uncompressed},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 0, 2, 20], "area": 40, "iscrowd": 1,
         "segmentation": crowd},
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 9, 5, 9]]},
        {"id": 6, "image_id": 1, "category_id": 12, "bbox": [40, 5, 3, 3], "area": 9, "iscrowd": 0,
         "segmentation": [[40, 5, 43, 5, 43, 8]]},
    ]
    dataset = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                          {"id": 2, "file_name": "b.png", "height": 16, "width": 16}],
               "annotations": anns,
               "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"},
                              {"id": 12, "name": "twelve"}]}
    (root / "ann.json").write_text(json.dumps(dataset))
    return root / "img", root / "ann.json"


def test_coco_dataset_reads_polygons_rle_crowd_and_empty_images(tmp_path):
    image_dir, ann_file = write_handmade_set(tmp_path)
    ds = data.CocoDataset(image_dir, ann_file)
    assert len(ds) == 2
    assert ds.cat_id_to_label == {3: 1, 7: 2, 12: 3} and ds.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    assert ds.classes == ("three", "seven", "twelve")
    image, target = ds[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    expected = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    torch.testing.assert_close(image, torch.from_numpy(expected / 255).permute(2, 0, 1).float())
    # kept: polygon (7), compressed RLE (3), uncompressed RLE (12); dropped: crowd, degenerate,
    # and the box wholly right of the 30 px wide image (clipped to zero width)
    assert target["labels"].tolist() == [2, 1, 3]
    assert target["boxes"].tolist() == [[2, 2, 12, 8], [15, 4, 25, 9], [2, 10, 3, 20]]
    np.testing.assert_array_equal(target["masks"][1].numpy(), square(20, 30, 15, 4, 25, 9))
    np.testing.assert_array_equal(target["masks"][2].numpy(), square(20, 30, 2, 10, 3, 20))
    rows, cols = np.nonzero(target["masks"][0].numpy())
    assert 2 <= cols.min() and cols.max() <= 12 and 2 <= rows.min() and rows.max() <= 8
    assert 60 <= target["masks"][0].sum() <= 77  # 10 x 6 polygon, boundary pixels either way
    assert target["iscrowd"].tolist() == [0, 0, 0] and target["image_id"] == 1
    image, empty = ds[1]
    assert image.shape == (3, 16, 16)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 16, 16)
    assert empty["labels"].dtype == torch.int64 and len(empty["labels"]) == 0


def test_coco_dataset_keep_crowd_and_export_maps_ids_back(tmp_path):
    image_dir, ann_file = write_handmade_set(tmp_path)
    ds = data.CocoDataset(image_dir, ann_file, keep_crowd=True)
    target = ds[0][1]
    assert target["iscrowd"].tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(target["masks"][3].numpy(), square(20, 30, 10, 0, 12, 20))
    coco = data.to_coco(data.CocoDataset(image_dir, ann_file))
    assert [a["category_id"] for a in coco["annotations"]] == [7, 3, 12]
    assert [c["id"] for c in coco["categories"]] == [3, 7, 12]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        data.CocoDataset(tmp_path, tmp_path / "nowhere.json")


def test_malformed_json(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid json"):
        data.CocoDataset(tmp_path, tmp_path / "broken.json")
    (tmp_path / "partial.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="partial.json.*lacks the keys"):
        data.CocoDataset(tmp_path, tmp_path / "partial.json")


def test_missing_image_file(tmp_path):
    image_dir, ann_file = write_handmade_set(tmp_path)
    (image_dir / "b.png").unlink()
    ds = data.CocoDataset(image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds[1]


def test_undeclared_category_id(tmp_path):
    image_dir, ann_file = write_handmade_set(tmp_path)
    dataset = json.loads(ann_file.read_text())
    dataset["annotations"][2]["category_id"] = 99
    ann_file.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="category_id 99 of annotation 3 is not declared"):
        data.CocoDataset(image_dir, ann_file)
