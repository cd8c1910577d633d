"""How fast is the synthetic data? Generates ShapesDataset images on one core and prints the rate.

    .venv/bin/python benchmarks/data_gen.py [--images 1000] [--size 128]

The course's budget: 1,000 images of 128 px in under 10 s on one core, so data never limits
CPU training. Also times the COCO export (RLE encoding with pycocotools) of the same set.
"""
import argparse
import time

import torch

from course_lib import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = data.ShapesDataset(args.images, image_size=args.size, seed=0)
    start = time.perf_counter()
    objects = sum(len(dataset[i][1]["labels"]) for i in range(len(dataset)))
    seconds = time.perf_counter() - start
    print(f"generated {args.images} images of {args.size} px ({objects} objects) in {seconds:.2f} s "
          f"on 1 thread: {args.images / seconds:.0f} images/s, {1000 * seconds / args.images:.2f} ms/image")
    print(f"budget: 1000 images in < 10 s -> {'OK' if seconds * 1000 / args.images < 10 else 'TOO SLOW'}")
    start = time.perf_counter()
    coco = data.to_coco(dataset)
    seconds = time.perf_counter() - start
    print(f"to_coco (generation + RLE encoding) of {len(coco['annotations'])} annotations: {seconds:.2f} s")


if __name__ == "__main__":
    main()
