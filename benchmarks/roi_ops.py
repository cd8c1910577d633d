"""Speed of the hand-built RoIPool / RoIAlign (course_lib.roi_ops) against torchvision's kernels.

    .venv/bin/python benchmarks/roi_ops.py [--threads 2] [--repeats 5] [--device cpu]

Setting (a Mask R-CNN training step at stride 16): batch of 2 feature maps, 256 channels,
50 x 50 cells (an 800 px image), 512 RoIs of 16..400 px, outputs 7 x 7 (box head) and
14 x 14 (mask head), RoIAlign with sampling_ratio 2 and aligned=True. Prints one table of
the best-of-``repeats`` times (forward, and forward + backward) and ours / torchvision.
"""
from __future__ import annotations

import argparse
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


def make_inputs(device: torch.device, num_rois: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[2, 256, 50, 50]`` and rois ``[512, 5]`` in the pixels of an 800 px image."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 256, 50, 50, generator=g)
    xy = torch.rand(num_rois, 2, generator=g) * 600
    wh = torch.rand(num_rois, 2, generator=g) * 384 + 16
    index = torch.randint(0, 2, (num_rois, 1), generator=g).float()
    rois = torch.cat([index, xy, (xy + wh).clamp(max=800)], 1)
    return features.to(device), rois.to(device)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    features, rois = make_inputs(device)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {device}, "
          f"{torch.get_num_threads()} threads; features {tuple(features.shape)}, {len(rois)} RoIs")
    print(f"{'op':<10} {'output':>6} {'pass':<9} {'ours ms':>9} {'torchvision ms':>15} {'ratio':>6}")
    for name, (ours, theirs) in OPS.items():
        for size in (7, 14):
            for backward in (False, True):
                t_ours = best_time(lambda x: ours(x, rois, size), features, backward, args.repeats)
                t_tv = best_time(lambda x: theirs(x, rois, size), features, backward, args.repeats)
                pass_name = "fwd+bwd" if backward else "forward"
                print(f"{name:<10} {size:>3}x{size:<2} {pass_name:<9} {t_ours * 1e3:>9.1f} "
                      f"{t_tv * 1e3:>15.1f} {t_ours / t_tv:>6.2f}")


if __name__ == "__main__":
    main()
