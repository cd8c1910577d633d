"""Checks on COCO-format input that pycocotools would load silently wrong or fail on deep inside.

A duplicate image or category id, an annotation of an unknown image, a ``file_name`` that leaves
the image folder, an RLE of another size or an image file whose size is not the json's: each is
refused here with the file, the entry and its id named, before ``data.CocoDataset`` trusts them.

Public names: ``check_coco``, ``read_image``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def check_coco(dataset: dict, source: str) -> list:
    """The sorted category ids of a COCO dict, after refusing what pycocotools would load silently
    wrong (a later duplicate id replaces the earlier entry) or fail on deep inside ``annToMask``."""
    sizes = {}
    for k, info in enumerate(dataset["images"]):
        where = _check_keys(f"images[{k}]", info, ("id", "file_name", "height", "width"), source)
        if Path(info["file_name"]).is_absolute() or ".." in Path(info["file_name"]).parts:
            raise ValueError(f"{where}: file_name {info['file_name']!r} leaves the image folder; give a path inside it")
        if info["id"] in sizes:
            raise ValueError(f"{where}: image id {info['id']!r} is used twice")
        sizes[info["id"]] = [info["height"], info["width"]]
    cat_ids = [c["id"] for c in dataset["categories"]]
    declared = set(cat_ids)
    if len(declared) != len(cat_ids):
        twice = next(c for c in cat_ids if cat_ids.count(c) > 1)
        raise ValueError(f"categories of {source!r}: category id {twice!r} is used twice")
    for k, ann in enumerate(dataset["annotations"]):
        where = _check_keys(f"annotations[{k}]", ann, ("image_id", "category_id", "bbox", "segmentation"), source)
        if ann["category_id"] not in declared:
            raise ValueError(f"category_id {ann['category_id']!r} of annotation {ann.get('id')!r} "
                             f"is not declared in 'categories' of {source!r}")
        if ann["image_id"] not in sizes:
            raise ValueError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
            raise ValueError(f"{where}: bbox {ann['bbox']!r} is not [x, y, width, height]")
        rle, size = ann["segmentation"], sizes[ann["image_id"]]
        if isinstance(rle, dict) and list(rle.get("size", [])) != size:
            raise ValueError(f"{where}: RLE size {rle.get('size')!r} is not its image's [height, width] {size}")
    return sorted(cat_ids)


def _check_keys(where: str, entry: dict, keys: tuple[str, ...], source: str) -> str:
    """``where`` with the entry's id and the file, for messages; ``ValueError`` if a key is missing."""
    where = f"{where} (id {entry.get('id')!r}) of {source!r}"
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
    return where


def read_image(path: Path, info: dict, source: str) -> Tensor:
    """The RGB image at ``path`` as float ``Tensor[3, H, W]`` in [0, 1], refused when its size is not
    the json's (every mask and box of the image is in the json's pixel frame)."""
    try:
        pil = Image.open(path).convert("RGB")
    except OSError as err:
        raise ValueError(f"image file {str(path)!r} (image id {info['id']!r}) cannot be read: {err}") from None
    if [pil.height, pil.width] != [info["height"], info["width"]]:
        raise ValueError(f"image file {str(path)!r} (image id {info['id']!r}) is {pil.height} x {pil.width} px "
                         f"but {source!r} says {info['height']} x {info['width']} (height x width)")
    pixels = np.asarray(pil, dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # [3, H, W]
