"""Cost of one VeiledDataset memory-cache hit (``ds[i]`` after prepare()) in the main process and in a
DataLoader worker, with F a ResNet: each hit checks that F's weights have not changed since.

    python benchmarks/cache_hit.py [--models resnet18 resnet50] [--seconds 1] [--repeats 3]

8 prepared 3x16x16 images (1 veil step: the veil is not what is timed); ``ds[i]`` in a loop for
``--seconds``, best of ``--repeats``. "worker": ``get_worker_info`` patched to say so (a worker checks
F once, not per hit). Compare libraries by running this file against each, back to back:
``PYTHONPATH=<worktree> python benchmarks/cache_hit.py``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import torchvision

import veil_transforms
from veil_transforms import VeiledDataset, VeilTransform
from veil_transforms import dataset as vd


class Images(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def per_hit_ms(ds, seconds: float) -> float:
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        ds[n % len(ds)]
        n += 1
    return 1000 * (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"library: {veil_transforms.__file__}\n")
    print("| F | main process, ms per hit | worker, ms per hit |\n|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        m = getattr(torchvision.models, name)(num_classes=10).eval()
        veil = VeilTransform(m, key=b"k" * 32, steps=1, device="cpu")
        ds = VeiledDataset(Images(), veil, batch_size=8, progress=False).prepare()
        main_ms = min(per_hit_ms(ds, args.seconds) for _ in range(args.repeats))
        with mock.patch.object(vd, "get_worker_info", lambda: object()):
            worker_ms = min(per_hit_ms(ds, args.seconds) for _ in range(args.repeats))
        print(f"| {name} | {main_ms:.3f} | {worker_ms:.3f} |")


if __name__ == "__main__":
    main()
