"""CPU cost of the hardened mode's keyed pad, next to the mask's: what veil-shard moved off its veil thread.

    python benchmarks/hardened_pad.py [--batch 1024] [--repeats 3]

The hardened veil starts from a pad: SHAKE-256 of each sample's flip-mask bits, 4 bytes per pixel,
as much hashing as the keyed mask itself. ``veil-shard`` derives both in its decoding workers
(threads or ``--io-procs`` processes); before, the pad was hashed on the thread that drives the GPU,
between batches. This times, on one CPU core, per image: the mask (``keys.keyed_uniforms_np``),
the pad (``keys.pad_uniforms_np``) and the library's in-loop pad (``hardened.pad_uniforms``, which
also moves the mask bits to the host), for the throughput benchmark's three image sizes. Writes
``benchmarks/results/hardened_pad_cpu.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil_transforms import functional as F
from veil_transforms import hardened, keys

SHAPES = {"lenet5_28": (1, 28, 28), "resnet18_32": (3, 32, 32), "vgg16_112": (3, 112, 112)}
OUT = Path(__file__).resolve().parent / "results" / "hardened_pad_cpu.md"


def best(fn, repeats: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024, help="images per timed call")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many calls")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    key = bytes(range(32))
    rows = []
    for name, shape in SHAPES.items():
        n = args.batch if shape[-1] < 100 else max(1, args.batch // 8)
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        xn = F.normalize(x)
        xnp = xn.numpy()
        u = keys.keyed_uniforms_np(key, xnp)
        bits = (u < np.float32(0.5)) & (xnp != 0)
        x0 = F.random_pixel_flip(xn, 0.5, uniform=torch.from_numpy(u))
        t_mask = best(lambda: keys.keyed_uniforms_np(key, xnp), args.repeats) / n
        t_pad = best(lambda: keys.pad_uniforms_np(bits), args.repeats) / n
        t_lib = best(lambda: hardened.pad_uniforms(x0, xn), args.repeats) / n
        same = np.array_equal(keys.pad_uniforms_np(bits), hardened.pad_uniforms(x0, xn).numpy())
        rows.append((name, shape, n, t_mask, t_pad, t_lib, same))
        print(f"{name:12s} mask {t_mask * 1e6:8.1f} us/img  pad {t_pad * 1e6:8.1f} us/img  in-loop pad "
              f"{t_lib * 1e6:8.1f} us/img  same pad: {same}", flush=True)
    cmd = "python benchmarks/hardened_pad.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Hardened pad: CPU cost per image (one core)", "",
        f"Command: `{cmd.strip()}`", "",
        f"torch {torch.__version__}; best of {args.repeats}; microseconds per image and images/s on one core.", "",
        "| case | shape | images | mask (keyed uniforms) | pad (`keys.pad_uniforms_np`) | in-loop pad (`hardened.pad_uniforms`) | same pad |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, shape, n, a, b, c, same in rows:
        lines.append(f"| {name} | {'×'.join(map(str, shape))} | {n} | {a * 1e6:.1f} us ({1 / a:,.0f}/s) | "
                     f"{b * 1e6:.1f} us ({1 / b:,.0f}/s) | {c * 1e6:.1f} us ({1 / c:,.0f}/s) | {same} |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
