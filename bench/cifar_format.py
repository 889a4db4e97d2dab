"""Write CIFAR-10-format files of random images, to time CIFAR-10 work where it cannot be downloaded.

    python bench/cifar_format.py ./fake-cifar               # CIFAR-10's size: 5 x 10,000 + 10,000 images
    bnctl study claims --profile laptop data.root=./fake-cifar --jobs 2

The files are CIFAR-10's own 'python version' (cifar-10-batches-py/data_batch_1..5, test_batch),
written by bnctl.data.write_cifar_format. The pixels are noise: every run stays at chance
accuracy, so such data measure time and memory only, never a verdict.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bnctl.data import write_cifar_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="data.root to write (cifar-10-batches-py/ is created inside)")
    parser.add_argument("--per-batch", type=int, default=10000, help="images per data_batch file (10000)")
    parser.add_argument("--test-images", type=int, default=None, help="images in test_batch (as --per-batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    folder = write_cifar_format(args.root, args.per_batch, args.test_images, args.seed)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"{folder}: {5 * args.per_batch} training + {args.test_images or args.per_batch} test images, "
          f"{size:.0f} MB, {time.perf_counter() - start:.1f}s; use data.root={args.root}")


if __name__ == "__main__":
    main()
