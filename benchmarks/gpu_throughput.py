"""Training images/s of our Mask R-CNN against torchvision's on one GPU, with peak GPU memory.

    .venv/bin/python benchmarks/gpu_throughput.py [--steps 30] [--warmup 5] [--batch-size 8]
                                                  [--image-size 512] [--json FILE]
    .venv/bin/python benchmarks/gpu_throughput.py --cpu-smoke     # a tiny run that checks the script

Both models are ResNet-50-FPN Mask R-CNNs trained from scratch (``weights=None``,
``weights_backbone=None``) with the same heads' sizes and RoI counts (the ``gpu`` preset,
``presets.gpu_config``, which matches torchvision's defaults), on the same pre-generated
batches of 512 px shapes images already on the GPU (so the data pipeline is not measured), with
the same mixed precision (bf16 where supported, else fp16 with a GradScaler), ``channels_last``
and SGD. torchvision's transform is told not to resize (min_size = max_size = image size), as
ours never does. The last line is ``ratio ours/torchvision: ...``; ``--json`` also writes the
figures with the machine they were measured on. On a CPU it refuses, unless ``--cpu-smoke``:
64 px, batch 2, 1 timed step, few RoIs in both models, to check the script runs (its
figures mean nothing, and the json says so). ``benchmarks/gpu_session.sh`` runs it first.
"""
import argparse
import contextlib
import dataclasses
import json
import sys
import time

import torch
import torchvision

from course_lib import data, model, presets, train, utils

# --cpu-smoke: few proposals and RoIs in both models (the 256-channel mask head on 128 positive RoIs
# per image would take most of a minute per step on a CPU; 8 RoIs per image hold 2 positives).
SMOKE_ROIS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, box_batch_size_per_image=8)


def _batches(image_size: int, batch_size: int, count: int, device: torch.device) -> list:
    dataset = data.ShapesDataset(batch_size * count, image_size=image_size, seed=0)
    out = []
    for b in range(count):
        images, targets = data.collate_fn([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)])
        out.append(([img.to(device) for img in images],
                    [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]))
    return out


def _ours(num_classes: int, image_size: int, smoke: bool) -> torch.nn.Module:
    config = presets.gpu_config(image_size, **(SMOKE_ROIS if smoke else {}))
    return model.MaskRCNN(dataclasses.replace(config, num_classes=num_classes))


def _torchvision(num_classes: int, image_size: int, smoke: bool) -> torch.nn.Module:
    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=image_size, max_size=image_size,
        **(SMOKE_ROIS if smoke else {}))


def _measure(net, batches, steps: int, warmup: int, device: torch.device, channels_last: bool) -> dict:
    """Train ``warmup`` untimed steps then ``steps`` timed ones; images/s and peak memory."""
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    dtype = train.amp_dtype(True, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, targets = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = sum(net(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None  # no CPU counter
    return {"images_per_s": steps * len(batches[0][0]) / seconds, "peak_memory_GiB": peak,
            "amp_dtype": str(dtype), "final_loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run that only checks the script")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.batch_size, args.image_size = 1, 0, 2, 64
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA GPU visible. This benchmark measures GPU training "
                         "throughput; run it on a GPU machine, or pass --cpu-smoke to check the script.")
    else:
        device = torch.device("cuda")
    num_classes = len(data.CLASSES) + 1
    batches = _batches(args.image_size, args.batch_size, 2 if args.cpu_smoke else 4, device)
    results = {}
    for name, build in (("ours", lambda: _ours(num_classes, args.image_size, args.cpu_smoke)),
                        ("torchvision", lambda: _torchvision(num_classes, args.image_size, args.cpu_smoke))):
        torch.manual_seed(0)
        results[name] = _measure(build(), batches, args.steps, args.warmup, device, not args.no_channels_last)
        print(f"{name:12s} {results[name]['images_per_s']:8.1f} images/s  "
              f"peak {_gib(results[name]['peak_memory_GiB'])}  ({results[name]['amp_dtype']})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke test: figures mean nothing)"
    ratio = results["ours"]["images_per_s"] / results["torchvision"]["images_per_s"]
    record = {"status": "cpu smoke test: figures mean nothing" if args.cpu_smoke else "measured",
              "command": " ".join(["benchmarks/gpu_throughput.py", *sys.argv[1:]]), "device": gpu,
              "machine": utils.machine_info(device), "torchvision": torchvision.__version__,
              "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
              "warmup": args.warmup, "channels_last": not args.no_channels_last, **results,
              "ratio_images_per_s": ratio}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    print(f"ratio ours/torchvision: images/s {ratio:.2f} (ours {results['ours']['images_per_s']:.1f}, "
          f"torchvision {results['torchvision']['images_per_s']:.1f}), peak memory ours "
          f"{_gib(results['ours']['peak_memory_GiB'])}, torchvision {_gib(results['torchvision']['peak_memory_GiB'])}")


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


if __name__ == "__main__":
    main()
