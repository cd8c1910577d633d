"""Speed of the hand-built RoIPool / RoIAlign (course_lib.roi_ops) against torchvision's kernels.

    .venv/bin/python benchmarks/roi_ops.py [--threads 2] [--repeats 5] [--device cpu]
    .venv/bin/python benchmarks/roi_ops.py --adaptive [--threads 2] [--repeats 3]

Setting (a Mask R-CNN training step at stride 16): batch of 2 feature maps, 256 channels,
50 x 50 cells (an 800 px image), 512 RoIs of 16..400 px, outputs 7 x 7 (box head) and
14 x 14 (mask head), RoIAlign with sampling_ratio 2 and aligned=True. Prints one table of
the best-of-``repeats`` times (forward, and forward + backward) and ours / torchvision.

``--adaptive`` instead measures RoIAlign with an adaptive grid (sampling_ratio -1, whose
ceil(bin size) samples per bin side grow with the box) in two settings: 10 RoIs of 400..800 px
on one 800 x 800 map of 8 channels at stride 1, and the 512 RoIs above at stride 16. It prints
the peak memory (MB) and best time of ours and torchvision's, and the ratios ours / torchvision.
torchvision's forward needs memory too: its kernel tabulates one RoI's samples at a time.

How peak memory is measured, CPU only: each (setting, op, pass) runs in a fresh process, which
builds its inputs, reads its peak resident set size (``ru_maxrss``), runs the op once and reads
it again; the difference is the memory the op needed on top of its inputs (output and, for
fwd+bwd, the input's gradient included). The process runs with glibc's ``MALLOC_MMAP_THRESHOLD_``
pinned at 64 KiB, so every tensor larger than that is its own mapping, returned to the system
when freed: the peak is then neither hidden by memory malloc kept from before nor by reuse.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torchvision

from course_lib import roi_ops

OPS = {
    "roi_align": (lambda x, r, s: roi_ops.roi_align(x, r, s, 1 / 16, 2, True),
                  lambda x, r, s: torchvision.ops.roi_align(x, r, s, 1 / 16, 2, True)),
    "roi_pool": (lambda x, r, s: roi_ops.roi_pool(x, r, s, 1 / 16),
                 lambda x, r, s: torchvision.ops.roi_pool(x, r, s, 1 / 16)),
}
ALIGN = {"ours": roi_ops.roi_align, "torchvision": torchvision.ops.roi_align}  # for --adaptive


def make_inputs(device: torch.device, num_rois: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[2, 256, 50, 50]`` and rois ``[512, 5]`` in the pixels of an 800 px image."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 256, 50, 50, generator=g)
    xy = torch.rand(num_rois, 2, generator=g) * 600
    wh = torch.rand(num_rois, 2, generator=g) * 384 + 16
    index = torch.randint(0, 2, (num_rois, 1), generator=g).float()
    rois = torch.cat([index, xy, (xy + wh).clamp(max=800)], 1)
    return features.to(device), rois.to(device)


def make_large_rois() -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[1, 8, 800, 800]`` (stride 1) and 10 rois ``[10, 5]`` of 400..800 px."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 8, 800, 800, generator=g)
    wh = torch.rand(10, 2, generator=g) * 400 + 400
    xy = torch.rand(10, 2, generator=g) * (800 - wh)
    return features, torch.cat([torch.zeros(10, 1), xy, xy + wh], 1)


# --adaptive: setting -> (inputs, spatial_scale, output sizes); sampling_ratio -1, aligned=True
ADAPTIVE = {"800x800, 10 RoIs": (make_large_rois, 1.0, (7,)),
            "stride 16, 512 RoIs": (lambda: make_inputs(torch.device("cpu")), 1 / 16, (7, 14))}


def best_time(fn, features: torch.Tensor, backward: bool, repeats: int) -> float:
    """Best wall time in seconds over ``repeats`` runs (after one warm-up run)."""
    times = []
    for i in range(repeats + 1):
        x = features.detach().requires_grad_(backward)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(x)
        if backward:
            out.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def measure_one(setting: str, op: str, size: int, backward: bool, repeats: int) -> dict:
    """In this (fresh) process: the op's peak memory in MB on top of its inputs, and best time."""
    make, scale, _ = ADAPTIVE[setting]
    features, rois = make()
    fn = lambda x: ALIGN[op](x, rois, size, scale, -1, True)  # noqa: E731
    tiny = torch.tensor([[0.0, 1, 1, 6, 6]], dtype=features.dtype)
    ALIGN[op](torch.ones(1, 1, 8, 8, requires_grad=True), tiny, 2, 1.0, -1, True).sum().backward()
    x = features.detach().requires_grad_(backward)  # after a warm-up that loads the kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = fn(x)
    if backward:
        out.sum().backward()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"peak_mb": peak_mb, "ms": best_time(fn, features, backward, repeats) * 1e3}


def adaptive_table(threads: int, repeats: int) -> None:
    """Peak memory and time of RoIAlign with an adaptive grid, each op in its own process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    print(f"RoIAlign, sampling_ratio -1, aligned; CPU, {threads} threads; peak MB on top of inputs")
    print(f"{'setting':<20} {'output':>6} {'pass':<8} {'ours MB':>8} {'tv MB':>7} {'ratio':>6} "
          f"{'ours ms':>8} {'tv ms':>7} {'ratio':>6}")
    for setting, (_, _, sizes) in ADAPTIVE.items():
        for size in sizes:
            for backward in (False, True):
                res = {}
                for op in ALIGN:
                    cmd = [sys.executable, __file__, "--child", json.dumps(
                        [setting, op, size, backward]), "--threads", str(threads),
                           "--repeats", str(repeats)]
                    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                    res[op] = json.loads(out.stdout.splitlines()[-1])
                ours, tv = res["ours"], res["torchvision"]
                pass_name = "fwd+bwd" if backward else "forward"
                print(f"{setting:<20} {size:>3}x{size:<2} {pass_name:<8} {ours['peak_mb']:>8.1f} "
                      f"{tv['peak_mb']:>7.1f} {ours['peak_mb'] / max(tv['peak_mb'], 0.1):>6.1f} "
                      f"{ours['ms']:>8.1f} {tv['ms']:>7.1f} {ours['ms'] / tv['ms']:>6.2f}")


def speed_table(device: torch.device, repeats: int) -> None:
    """The training setting's times, forward and forward + backward, for both ops."""
    features, rois = make_inputs(device)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {device}, "
          f"{torch.get_num_threads()} threads; features {tuple(features.shape)}, {len(rois)} RoIs")
    print(f"{'op':<10} {'output':>6} {'pass':<9} {'ours ms':>9} {'torchvision ms':>15} {'ratio':>6}")
    for name, (ours, theirs) in OPS.items():
        for size in (7, 14):
            for backward in (False, True):
                t_ours = best_time(lambda x: ours(x, rois, size), features, backward, repeats)
                t_tv = best_time(lambda x: theirs(x, rois, size), features, backward, repeats)
                pass_name = "fwd+bwd" if backward else "forward"
                print(f"{name:<10} {size:>3}x{size:<2} {pass_name:<9} {t_ours * 1e3:>9.1f} "
                      f"{t_tv * 1e3:>15.1f} {t_ours / t_tv:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adaptive", action="store_true",
                        help="peak memory and time of RoIAlign with sampling_ratio -1 (CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one --adaptive measurement, as JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child), repeats=args.repeats)))
    elif args.adaptive:
        adaptive_table(args.threads, args.repeats)
    else:
        speed_table(torch.device(args.device), args.repeats)


if __name__ == "__main__":
    main()
