"""The model on your own images: ``python -m course_lib.predict CHECKPOINT IMAGE_OR_FOLDER... --out DIR``.

Any course checkpoint (a run's ``last.pt``/``best.pt`` or a notebook's ``checkpoints.save_model``)
rebuilds its network from the file alone (``checkpoints.load_model``). Each image is read as RGB
(grayscale, palette, CMYK and transparent images are converted, and a line says so), shrunk like
training when its longest side exceeds the checkpoint's ``image_size`` (``data.Resized``: the
model never saw larger objects), run, and its detections mapped back to the original pixels: boxes
scaled, mask probabilities resized. The run writes into ``--out``:

* ``<name>_pred.png`` per image: masks, boxes, class names and scores (``viz.draw_instances``);
* ``detections.json``: COCO results (a list; ``bbox`` ``[x, y, w, h]`` in original pixels, RLE
  ``segmentation``), ``image_id`` a running number from 1;
* ``images.json``: ``{"images": [{"id", "file_name", "height", "width", "overlay"}], "categories"}``,
  which names the file behind each ``image_id`` and the class behind each ``category_id``.

Every bad input ends in one line naming it. Public names: ``IMAGE_SUFFIXES``, ``collect_images``,
``load_image``, ``shrink_to``, ``predict_image``, ``draw_prediction``, ``detection_records``,
``class_names``, ``build_parser``, ``run_predictions``, ``main``.

Dimensions: D detections, H x W the original image, h x w the image the model sees.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from course_lib import checkpoints, data, evaluate, utils, viz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Image files named, and those directly inside named folders (by suffix, sorted), in order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ValueError(f"folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{str(path)!r}: no such file or folder")
    return list(dict.fromkeys(found))  # a file named twice is predicted once


def load_image(path: str | Path, verbose: bool = True) -> Tensor:
    """The image at ``path`` as float ``Tensor[3, H, W]`` in [0, 1], RGB, read as ``data.CocoDataset`` reads.

    Other modes are converted (with ``verbose``, a line says so): transparent pixels are laid on
    white, grayscale repeats over the three channels. An unreadable or empty file is a
    ``ValueError`` naming it.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            pil, note = _to_rgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"image {str(path)!r} cannot be read (not an image, or corrupt): {err}") from None
    if min(pil.size) == 0:
        raise ValueError(f"image {str(path)!r} is empty ({pil.width} x {pil.height} px)")
    if note and verbose:
        tqdm.write(f"{Path(path).name}: {note}")
    pixels = np.asarray(pil, dtype=np.float32) / 255                                # [H, W, 3]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()                   # [3, H, W]


def _to_rgb(pil: Image.Image) -> tuple[Image.Image, str | None]:
    """``(RGB copy, what was converted or None)``; transparency is laid on white."""
    if pil.mode == "RGB":
        return pil.copy(), None
    if pil.mode in ("RGBA", "LA", "PA") or "transparency" in pil.info:
        white = Image.new("RGBA", pil.size, "white")
        return Image.alpha_composite(white, pil.convert("RGBA")).convert("RGB"), \
            f"{pil.mode} image with transparency converted to RGB (transparent pixels laid on white)"
    return pil.convert("RGB"), f"{pil.mode} image converted to RGB"


def shrink_to(image: Tensor, max_size: int) -> Tensor:
    """``image`` ``Tensor[3, H, W]`` shrunk so its longest side is ``max_size`` px, exactly as
    ``data.Resized`` shrinks training images (bilinear, sides rounded); smaller images unchanged."""
    height, width = image.shape[-2:]
    scale = max_size / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # [3, h, w]


@torch.no_grad()
def predict_image(model: nn.Module, image: Tensor, train_size: int | None,
                  score_thresh: float = 0.0) -> dict[str, Tensor]:
    """Detections of ``model`` (eval mode) on one ``Tensor[3, H, W]``, in its original pixels, on the CPU.

    The image is shrunk to the training size first (``shrink_to``; ``train_size=None`` keeps it):
    a detector trained on 128 px shapes finds 400 px shapes poorly. Detections scoring below
    ``score_thresh`` are dropped before masks are resized back, which keeps a large image's masks
    small in memory. Returns ``boxes`` ``Tensor[D, 4]`` xyxy, ``labels``, ``scores`` and, for
    Mask R-CNN, ``masks`` ``Tensor[D, 1, H, W]`` probabilities.
    """
    height, width = image.shape[-2:]
    small = image if train_size is None else shrink_to(image, train_size)          # [3, h, w]
    device = next(model.parameters()).device
    found = model([small.to(device)])[0]
    keep = found["scores"] >= score_thresh
    found = {name: value[keep].cpu() for name, value in found.items()}
    h, w = small.shape[-2:]
    if (h, w) == (height, width):
        return found
    factors = torch.tensor([width / w, height / h] * 2)
    found["boxes"] = torch.min(found["boxes"] * factors, torch.tensor([width, height] * 2, dtype=torch.float32))  # [D, 4]
    if "masks" in found and len(found["masks"]):
        found["masks"] = F.interpolate(found["masks"], size=(height, width), mode="bilinear",
                                       align_corners=False)                        # [D, 1, H, W]
    elif "masks" in found:
        found["masks"] = found["masks"].new_zeros((0, 1, height, width))
    return found


def class_names(info: dict, num_classes: int) -> tuple[str, ...]:
    """The checkpoint's class names by label (``info["classes"]``); the shapes classes for a
    shapes-sized model saved without them; else ``"class 1"``, ``"class 2"``, ..."""
    names = tuple(info.get("classes") or ())
    if len(names) == num_classes - 1:
        return names
    return data.CLASSES if num_classes == data.NUM_CLASSES else tuple(f"class {k}" for k in range(1, num_classes))


def draw_prediction(image: Tensor, detection: dict[str, Tensor], names: tuple[str, ...],
                    title: str | None = None) -> Figure:
    """A figure of ``image`` ``Tensor[3, H, W]`` with every detection drawn (no threshold here:
    ``predict_image`` applies it). Sized so a large image keeps about its resolution."""
    height, width = image.shape[-2:]
    dpi = min(400.0, max(100.0, max(height, width) / 6))
    fig = Figure(figsize=(6 * width / max(height, width) + 0.8, 6 * height / max(height, width) + 0.6), dpi=dpi)
    ax = fig.add_subplot()
    viz.draw_instances(ax, image, detection["boxes"], detection["labels"], detection["scores"],
                       detection.get("masks"), class_names=names, score_thresh=float("-inf"), title=title)
    fig.tight_layout()
    return fig


def detection_records(detections: list[dict[str, Tensor]]) -> list[dict]:
    """COCO results for detections carrying an int ``image_id``: one record per detection with
    ``image_id``, ``category_id`` (the label), ``bbox`` ``[x, y, w, h]``, ``score`` and, when
    masks were predicted, an RLE ``segmentation`` (as Detectron2 writes its results file)."""
    bbox_results, segm_results = evaluate.coco_results(detections)
    return segm_results if any("masks" in det for det in detections) else bbox_results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib.predict",
                                     description="Run a course checkpoint on images: overlays and COCO results.")
    parser.add_argument("checkpoint", help="a course checkpoint (a run's last.pt/best.pt, or save_model's file)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of them")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--device", choices=utils.DEVICES, default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def _overlay_name(path: Path, taken: set[str]) -> str:
    name, k = f"{path.stem}_pred.png", 2
    while name in taken:
        name, k = f"{path.stem}_pred_{k}.png", k + 1
    taken.add(name)
    return name


def run_predictions(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Predict every image of ``args`` into ``args.out``; returns ``(records, images)`` as written."""
    if not 0 <= args.score_thresh <= 1:
        raise ValueError(f"--score-thresh={args.score_thresh}; expected a value in [0, 1]")
    paths = collect_images(args.images)
    net, info = checkpoints.load_model(args.checkpoint, utils.device(args.device, verbose=False))
    names, train_size = class_names(info, net.config.num_classes), info.get("image_size")
    if train_size is None:
        print("the checkpoint records no training image size, so images are used at their own size")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    records, images, taken = [], [], set()
    for image_id, path in enumerate(tqdm(paths, desc="predict", unit="image", disable=args.no_progress), start=1):
        image = load_image(path)
        found = predict_image(net, image, train_size, args.score_thresh)
        overlay = _overlay_name(path, taken)
        fig = draw_prediction(image, found, names, title=f"{path.name}: {len(found['scores'])} detections")
        fig.savefig(out / overlay)
        records += detection_records([{**found, "image_id": image_id}])
        images.append({"id": image_id, "file_name": str(path), "height": image.shape[1],
                       "width": image.shape[2], "overlay": overlay})
    categories = [{"id": k, "name": name} for k, name in enumerate(names, start=1)]
    (out / "detections.json").write_text(json.dumps(records) + "\n")
    (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1) + "\n")
    return records, images


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the arguments, predict, print where the results are; exit with one line on a bad input."""
    args = build_parser().parse_args(argv)
    try:
        records, images = run_predictions(args)
    except (ValueError, OSError, utils.DeviceError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"course_lib.predict: error: {error}") from None
    print(f"{len(records)} detections on {len(images)} images (score >= {args.score_thresh}): "
          f"{Path(args.out) / 'detections.json'}, overlays and images.json beside it")
    return records


if __name__ == "__main__":
    main()
