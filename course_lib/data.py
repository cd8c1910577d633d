"""The course's data: synthetic shapes with instance masks, and COCO json in and out.

Mask R-CNN learns from images whose every object carries a class, a box and a binary mask
(the COCO "instances" format of Lin et al. 2014, the data of Mask R-CNN §4). COCO itself is 20 GB; the course instead draws its own images
in milliseconds: squares (straight edges), circles (curved edges) and triangles (diagonal
edges), of 6 to 50 px on a 128 px image, over a textured colour gradient, where later objects
occlude earlier ones. The same code path then reads any real COCO-format set.

Public names: ``CLASSES``, ``NUM_CLASSES``, ``ShapesDataset``, ``shape_mask``, ``collate_fn``,
``to_coco``, ``save_coco``, ``CocoDataset``, ``split_indices``, ``Subset``, ``Resized``.

Conventions (torchvision's): image float ``Tensor[3, H, W]`` in [0, 1]; a target dict with
``boxes`` float32 ``Tensor[N, 4]`` (xyxy, continuous pixel coordinates: pixel (row r, col c)
covers [c, c + 1) x [r, r + 1), its centre is at +0.5), ``labels`` int64 ``Tensor[N]``
(1..K, 0 is background), ``masks`` uint8 ``Tensor[N, H, W]``, ``image_id`` int, ``area``
float32 ``Tensor[N]`` (mask pixels, as COCO's segmentation area) and ``iscrowd`` int64
``Tensor[N]``. N objects per image; N may be 0.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from course_lib import coco_checks, utils

CLASSES = ("square", "circle", "triangle")
NUM_CLASSES = len(CLASSES) + 1  # background is label 0


def shape_mask(shape: str, cx: float, cy: float, size: float, angle: float,
               height: int, width: int) -> np.ndarray:
    """Rasterise one shape on the pixel-centre grid: a pixel is inside when its centre is.

    ``size`` is the square's side, the circle's diameter and the triangle's side (equilateral,
    rotated by ``angle`` radians); squares stay axis-aligned so their area is checkable by
    hand (side 10 at an integer corner covers exactly 10 x 10 pixels: the test is half-open,
    ``x1 <= x < x2``). Only a window around the shape is evaluated, which keeps it fast.
    Returns bool ``ndarray[H, W]``.
    """
    radius = size / math.sqrt(3) if shape == "triangle" else size / 2
    x0, x1 = max(0, math.floor(cx - radius)), min(width, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(height, math.ceil(cy + radius) + 1)
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # [1, w] centre offsets
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # [h, 1]
    if shape == "square":
        inside = (xs >= -radius) & (xs < radius) & (ys >= -radius) & (ys < radius)
    elif shape == "circle":
        inside = xs ** 2 + ys ** 2 <= radius ** 2
    elif shape == "triangle":
        corners = [(radius * math.cos(angle + k * 2 * math.pi / 3),
                    radius * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
            # corners turn the same way, so the inside is on the same side of every edge
            inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    else:
        raise ValueError(f"shape={shape!r}; expected one of {CLASSES}")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r}; expected an int >= {low}")


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic synthetic instance-segmentation images: ``ds[i] -> (image, target)``.

    Sample ``i`` depends only on ``(seed, i)`` (its own ``np.random.default_rng([seed, i])``,
    never global random state), so any access order, DataLoader workers and reruns give
    identical tensors. Each image holds 0..``max_objects`` objects drawn in order; a later
    object hides what it covers of earlier ones, and masks and boxes describe only what stays
    visible. An object left with fewer than ``min_visible_pixels`` pixels, or with less than
    ``min_visible_fraction`` of its own area, is dropped and not drawn at all (so no
    unlabelled fragment remains in the image).

    Args:
        num_images: length of the data set.
        image_size: height = width in pixels.
        seed: data-set seed (an int >= 0).
        max_objects: most objects drawn per image (the count is uniform in 0..max_objects).
        min_size, max_size: object size range in pixels, sampled log-uniformly so that small
            objects are as common as large ones. ``None`` means 6 and 50 px at 128 px images,
            scaled with ``image_size``.
        image_id_offset: ``target["image_id"] = image_id_offset + i``.
    """

    classes = CLASSES

    def __init__(self, num_images: int, image_size: int = 128, seed: int = 0,
                 max_objects: int = 4, min_size: float | None = None,
                 max_size: float | None = None, min_visible_pixels: int = 12,
                 min_visible_fraction: float = 0.25, noise: float = 0.03,
                 image_id_offset: int = 0):
        _check_int("num_images", num_images, 0)
        _check_int("image_size", image_size, 16)
        _check_int("seed", seed, 0)
        _check_int("max_objects", max_objects, 0)
        _check_int("min_visible_pixels", min_visible_pixels, 1)
        _check_int("image_id_offset", image_id_offset, 0)
        min_size = 6 * image_size / 128 if min_size is None else min_size
        max_size = 50 * image_size / 128 if max_size is None else max_size
        if not 0 < min_size <= max_size:
            raise ValueError(f"min_size={min_size!r}, max_size={max_size!r}; need 0 < min_size <= max_size")
        if max_size > 0.8 * image_size:
            raise ValueError(f"max_size={max_size!r}; must be <= 0.8 * image_size = {0.8 * image_size}")
        if not 0 <= min_visible_fraction <= 1:
            raise ValueError(f"min_visible_fraction={min_visible_fraction!r}; expected a value in [0, 1]")
        if not 0 <= noise <= 0.5:
            raise ValueError(f"noise={noise!r}; expected a standard deviation in [0, 0.5]")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.max_objects, self.min_size, self.max_size = max_objects, min_size, max_size
        self.min_visible_pixels, self.min_visible_fraction = min_visible_pixels, min_visible_fraction
        self.noise, self.image_id_offset = noise, image_id_offset

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        image, target, _ = self._generate(self._index(i))
        return image, target

    def occlusion(self, i: int) -> Tensor:
        """Fraction of each kept object's own area hidden by later objects: float ``Tensor[N]``
        (0 = fully visible), in the order of ``ds[i]``'s targets."""
        return self._generate(self._index(i))[2]

    def _index(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"index {i!r} out of range for ShapesDataset of length {len(self)}")
        return int(i) % len(self)

    def _generate(self, i: int) -> tuple[Tensor, dict, Tensor]:
        rng = np.random.default_rng([self.seed, i])
        s = self.image_size
        background = _background(rng, s)  # [S, S, 3]
        n = int(rng.integers(0, self.max_objects + 1))
        objects = _sample_objects(rng, n, s, self.min_size, self.max_size)
        full = [shape_mask(CLASSES[c - 1], x, y, size, a, s, s) for c, x, y, size, a in objects]
        owner = _composite(full, range(n), s)  # [S, S] index of the visible object, -1 = none
        visible = np.bincount(owner[owner >= 0], minlength=n)
        areas = np.array([m.sum() for m in full], dtype=np.int64)
        keep = np.flatnonzero((visible >= self.min_visible_pixels)
                              & (visible >= self.min_visible_fraction * areas))
        owner = _composite(full, keep, s)  # redraw without the dropped objects
        colours = _colours(rng, n, background, objects)  # [n, 3]
        pixels, inside = background, owner >= 0
        pixels[inside] = colours[owner[inside]]  # [S, S, 3]
        pixels += self.noise * rng.standard_normal(pixels.shape, dtype=np.float32)
        image = torch.from_numpy(pixels.clip(0, 1).transpose(2, 0, 1).copy())  # [3, S, S]
        masks = owner[None] == keep[:, None, None]  # [N, S, S]
        target = _target(masks, [objects[j][0] for j in keep], self.image_id_offset + i)
        hidden = torch.from_numpy(1 - masks.sum((1, 2)) / areas[keep].clip(min=1)).float()
        return image.contiguous(), target, hidden


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """A colour gradient in a random direction plus a low-frequency wave: float32 ``[S, S, 3]``."""
    start, end = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    angle, wave_angle, phase = rng.uniform(0, 2 * math.pi, size=3)
    cycles = rng.uniform(1.5, 4.0)
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    xx, yy = grid[None, :], grid[:, None]
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)
    wave = 0.08 * np.sin(2 * math.pi * cycles * (xx * math.cos(wave_angle) + yy * math.sin(wave_angle)) + phase)
    return (start + (end - start) * t[..., None] + wave[..., None]).astype(np.float32)


def _sample_objects(rng: np.random.Generator, n: int, s: int, min_size: float,
                    max_size: float) -> list[tuple[int, float, float, float, float]]:
    """``(label, cx, cy, size, angle)`` per object, each shape wholly inside the image."""
    labels = rng.integers(1, len(CLASSES) + 1, size=n)
    sizes = np.exp(rng.uniform(math.log(min_size), math.log(max_size), size=n))
    angles = rng.uniform(0, 2 * math.pi, size=n)
    radii = np.where(labels == 3, sizes / math.sqrt(3), sizes / 2)  # reach from the centre
    centres = radii[:, None] + rng.uniform(0, 1, size=(n, 2)) * (s - 2 * radii[:, None])  # [n, 2]
    return [(int(c), float(x), float(y), float(z), float(a))
            for c, (x, y), z, a in zip(labels, centres, sizes, angles)]


def _composite(full_masks: list[np.ndarray], order, s: int) -> np.ndarray:
    """Paint objects in ``order``; later ones cover earlier ones. Returns int64 ``[S, S]``."""
    owner = np.full((s, s), -1, dtype=np.int64)
    for j in order:
        owner[full_masks[j]] = j
    return owner


def _colours(rng: np.random.Generator, n: int, background: np.ndarray, objects) -> np.ndarray:
    """A random colour per object, re-drawn (8 candidates) until it differs from the
    background under the object's centre by at least 0.35 (RGB distance). ``[n, 3]``."""
    candidates = rng.uniform(0, 1, size=(n, 8, 3)).astype(np.float32)
    if n == 0:
        return candidates[:, 0]
    under = np.stack([background[int(y), int(x)] for _, x, y, _, _ in objects])  # [n, 3]
    distance = np.linalg.norm(candidates - under[:, None], axis=2)  # [n, 8]
    ok = distance >= 0.35
    pick = np.where(ok.any(1), ok.argmax(1), distance.argmax(1))
    return candidates[np.arange(n), pick]


def _target(masks: np.ndarray, labels: list[int], image_id: int) -> dict:
    """The torchvision target dict for bool ``masks`` ``[N, H, W]``: boxes are the tight
    boxes of the masks, x2 = last column + 1 (continuous coordinates). NumPy until the end:
    it is faster than many small torch ops."""
    cols, rows = masks.any(1), masks.any(2)  # [N, W], [N, H]
    width, height = masks.shape[2], masks.shape[1]
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      width - cols[:, ::-1].argmax(1), height - rows[:, ::-1].argmax(1)], axis=1)
    return {"boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),  # [N, 4]
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks.astype(np.uint8)),  # [N, H, W]
            "image_id": image_id,
            "area": torch.from_numpy(masks.sum((1, 2)).astype(np.float32)),
            "iscrowd": torch.zeros(len(masks), dtype=torch.int64)}


def collate_fn(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Keep images and targets as lists: detection images differ in size and object count."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# ---- COCO json: out (to_coco, save_coco) and in (CocoDataset) ---------------------------------

def to_coco(dataset) -> dict:
    """A COCO "instances" dict for any data set yielding ``(image, target)`` as above.

    Segmentations are RLE (``pycocotools.mask.encode``, counts as str so json can hold
    them); ``bbox`` is COCO's ``[x, y, width, height]``; ``area`` is the mask's pixel count.
    Category ids are the labels, or mapped back through ``dataset.label_to_cat_id`` when the
    data set has one (a ``CocoDataset``).
    """
    names = getattr(dataset, "classes", CLASSES)
    to_cat = getattr(dataset, "label_to_cat_id", {k: k for k in range(1, len(names) + 1)})
    images, annotations = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png",
                       "height": image.shape[1], "width": image.shape[2]})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": to_cat[label], "segmentation": rle,
                                "area": float(mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "iscrowd": 0})
    categories = [{"id": to_cat[k], "name": name, "supercategory": "shape"}
                  for k, name in enumerate(names, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def save_coco(dataset, out_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/images/<image_id>.png`` and ``out_dir/annotations.json``; return
    ``out_dir`` (default: ``data/generated/shapes_coco``, git-ignored). Read it back with
    ``CocoDataset(out_dir / "images", out_dir / "annotations.json")``."""
    out_dir = utils.generated_dir("shapes_coco") if out_dir is None else Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    coco = to_coco(dataset)
    for entry, i in zip(coco["images"], range(len(dataset))):
        pixels = (dataset[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(out_dir / "images" / entry["file_name"])
    (out_dir / "annotations.json").write_text(json.dumps(coco))
    return out_dir


class CocoDataset(torch.utils.data.Dataset):
    """Any COCO-format instance set as ``ds[i] -> (image, target)``, like ``ShapesDataset``.

    * Category ids (arbitrary, e.g. COCO's 1..90 with gaps) map to contiguous labels 1..K in
      increasing id order; ``cat_id_to_label`` and ``label_to_cat_id`` convert both ways
      (evaluation needs the original ids), ``classes`` holds the names by label.
    * Masks come from ``COCO.annToMask`` (polygons and RLE alike).
    * Crowd regions (``iscrowd=1``) are dropped, as torchvision's detection references do;
      pass ``keep_crowd=True`` to keep them with ``iscrowd`` 1 in the target.
    * ``bbox`` is clipped to the image; an annotation whose box then has width or height
      <= 0 is dropped (torchvision's rule: keep only boxes with x2 > x1 and y2 > y1).
    * Images without annotations are kept, with empty targets.
    * What would load silently wrong is refused with a ``ValueError`` naming the entry and the
      value (``coco_checks.check_coco``): a ``file_name`` outside ``image_dir``, duplicate image or category
      ids, an annotation without ``bbox``, ``category_id`` or ``segmentation``, an RLE mask or an
      image file whose size is not the json's.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, keep_crowd: bool = False):
        self.image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        self.annotation_file = str(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"annotation_file {str(annotation_file)!r} does not exist")
        try:
            dataset = json.loads(annotation_file.read_text())
            missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise ValueError(f"annotation_file {str(annotation_file)!r} is not valid json: {error}") from None
        if missing:
            raise ValueError(f"annotation_file {str(annotation_file)!r} lacks the keys {missing}")
        cat_ids = coco_checks.check_coco(dataset, str(annotation_file))
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.cat_id_to_label = {cat_id: k for k, cat_id in enumerate(cat_ids, start=1)}
        self.label_to_cat_id = {k: cat_id for cat_id, k in self.cat_id_to_label.items()}
        self.classes = tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.keep_crowd = keep_crowd

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        info = self.coco.imgs[self.ids[i]]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} (image id {info['id']}) does not exist")
        image = coco_checks.read_image(path, info, self.annotation_file)  # [3, H, W]
        height, width = image.shape[1:]
        anns = [a for a in self.coco.imgToAnns[info["id"]] if self.keep_crowd or not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # [N] bool
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, height, width), np.uint8)
        return image, {"boxes": boxes[keep], "masks": torch.from_numpy(masks),  # [N, 4], [N, H, W]
                       "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                       "image_id": info["id"],
                       "area": torch.tensor([float(a.get("area", 0)) for a in anns], dtype=torch.float32),
                       "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}


def split_indices(num_images: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)``: a seeded random ``val_fraction`` of the indices ``0 .. num_images - 1`` held out.

    Both sorted, disjoint, together every index; at least one each (else ``ValueError``). The same
    ``seed`` gives the same split, so a resumed run trains and evaluates on the same images. Why:
    AP on the images a model trained on measures how well it remembers them, not how well it
    detects objects it has not seen (a from-scratch detector can score high on one and low on the other).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}; expected a fraction strictly between 0 and 1")
    num_val = max(1, round(val_fraction * num_images))
    if num_images - num_val < 1:
        raise ValueError(f"val_fraction={val_fraction} of {num_images} images leaves {num_images - num_val} to "
                         "train on; a held-out split needs at least 2 images (1 to train, 1 to evaluate)")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


class Subset(torch.utils.data.Dataset):
    """The images ``indices`` of ``dataset``: ``subset[k] = dataset[indices[k]]`` (a held-out split).

    Keeps ``classes`` and ``label_to_cat_id`` (labels and category ids stay the full set's) but not
    the full set's ``coco`` json: ``evaluate.coco_evaluate`` then builds the ground truth of these
    images alone (``to_coco``); the full json would count every other image's objects as misses.
    """

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        outside = [i for i in self.indices if not 0 <= i < len(dataset)]
        if outside:
            raise ValueError(f"indices {outside[:5]} are outside the data set of {len(dataset)} images")
        self.classes = getattr(dataset, "classes", CLASSES)
        if hasattr(dataset, "label_to_cat_id"):
            self.label_to_cat_id = dataset.label_to_cat_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.dataset[self.indices[k]]


class Resized(torch.utils.data.Dataset):
    """A data set whose images are shrunk so the longest side is at most ``max_size`` pixels.

    Boxes scale with the image, masks are resized nearest-neighbour (they stay 0/1). Smaller
    images are left as they are. ``classes`` is kept, so ``to_coco`` can build the ground
    truth of the resized images for evaluation.
    """

    def __init__(self, dataset, max_size: int):
        self.dataset, self.max_size, self.image_size = dataset, max_size, max_size
        self.classes = getattr(dataset, "classes", CLASSES)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        height, width = image.shape[-2:]
        scale = self.max_size / max(height, width)
        if scale >= 1:
            return image, target
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # [3, h, w]
        masks = target["masks"].new_zeros((0, *size))                                         # [0, h, w]
        if len(target["masks"]):
            masks = F.interpolate(target["masks"][None].float(), size=size, mode="nearest")[0]  # [N, h, w]
        factors = torch.tensor([size[1] / width, size[0] / height] * 2)
        return image, {**target, "boxes": target["boxes"] * factors, "masks": masks.to(torch.uint8)}
