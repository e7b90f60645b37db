"""Read cost of VeiledDataset's caches after prepare(): what a DataLoader worker pays per sample.

    python benchmarks/dataset_cache.py [--images 256] [--batch-size 1024] [--steps 2]

Veils ``--images`` random 1x28x28 uint8 images with LeNet-5 (a few steps: the veil is not what is
timed), once per cache kind, then times one pass of ``ds[i]`` over all of them in a fresh
VeiledDataset on the same cache (as a worker process sees it). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from veil_transforms import VeiledDataset, VeilTransform
from veil_transforms.nets import LeNet5


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if args.images < 1 or args.batch_size < 1 or args.steps < 1:
        ap.error("--images, --batch-size and --steps must be >= 1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    veil = VeilTransform(LeNet5(), steps=args.steps, key=b"bench-key-0123456789", device="cpu")
    data = Images(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cache in ("memory", d):
            ds = VeiledDataset(data, veil, batch_size=args.batch_size, cache=cache, progress=False)
            t = time.perf_counter()
            ds.prepare()
            prep = time.perf_counter() - t
            reader = ds if cache == "memory" else VeiledDataset(data, veil, batch_size=args.batch_size, cache=cache,
                                                                progress=False)
            t = time.perf_counter()
            for i in range(len(reader)):
                reader[i]
            read = time.perf_counter() - t
            rows.append(("memory" if cache == "memory" else "directory", prep, read, 1e3 * read / len(reader)))
    print(f"{args.images} images, batch_size {args.batch_size}, {args.steps} steps, CPU, one thread\n")
    print("| cache | prepare() s | one pass of ds[i] s | ms per sample |")
    print("|---|---|---|---|")
    for name, prep, read, per in rows:
        print(f"| {name} | {prep:.2f} | {read:.2f} | {per:.2f} |")


if __name__ == "__main__":
    main()
