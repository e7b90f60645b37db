"""What a last partial batch costs with ``compile=True``: recompiling for its size vs padding it.

    python benchmarks/compile_tail.py [--device cpu|cuda] [--batch 512] [--tail 88] [--steps 20]

Whole batches compile with static shapes (functional.COMPILE_FULL_DYNAMIC), so a batch of a new size
(veil()'s last chunk, a DataLoader's last batch, veil-shard's last batch) compiles again, and on CUDA
captures a new graph. Padding it to the compiled size would replay what exists but veils the padding.
In one process, LeNet-5, random images, early stop off, it times veil() of ``batch`` images (cold, then
warm), then of ``batch + tail`` (its tail chunk a new size: cold, then warm). The tail's first-time cost is
the cold minus the warm ``batch + tail`` call; padding would cost ``batch - tail`` images' veil, taken
from the warm ``batch`` call and scaled to T = 300. Inductor's on-disk caches go to a fresh temporary
folder (a cache warm from an earlier run hides the compilation). Writes
benchmarks/results/compile_tail_<device>.md.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

CACHE = tempfile.mkdtemp(prefix="compile_tail-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE  # before torch reads it
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
import torch  # noqa: E402

from veil_transforms import functional as F  # noqa: E402
from veil_transforms.nets import LeNet5  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="the compiled batch (default: 512 on the CPU, 4096 on CUDA)")
    ap.add_argument("--tail", type=int, default=88, help="the last partial batch's size")
    ap.add_argument("--steps", type=int, default=20, help="T of the timed calls (the compilation does not depend on it)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    batch = args.batch or (4096 if dev.type == "cuda" else 512)
    if not 0 < args.tail < batch:
        ap.error(f"--tail must be between 1 and --batch - 1 ({batch - 1})")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = LeNet5().to(dev).eval()

    def run(n):
        imgs = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        sync()
        t = time.perf_counter()
        F.veil(model, imgs, generator=torch.Generator().manual_seed(0), steps=args.steps, threshold=-math.inf,
               device=dev, compile=True, chunk=batch)
        sync()
        return time.perf_counter() - t

    t = {"batch cold": run(batch), "batch warm": run(batch)}
    t["batch + tail cold"] = run(batch + args.tail)
    t["batch + tail warm"] = run(batch + args.tail)
    recompile = t["batch + tail cold"] - t["batch + tail warm"]
    pad300 = (batch - args.tail) * t["batch warm"] / batch * 300 / args.steps
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    cmd = "python benchmarks/compile_tail.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md = [f"# A last partial batch with compile=True: LeNet-5 on {name} (torch {torch.__version__})", "",
          f"Command: `{cmd}`", "", f"Batch {batch}, tail {args.tail}, T = {args.steps} in the timed calls.", "",
          "| call | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in t.items()] + [
          "", f"- the tail's first time (compilation{', capture' if dev.type == 'cuda' else ''}): **{recompile:.2f} s**",
          f"- padding it to {batch} instead: {batch - args.tail} more images, **{pad300:.2f} s** at T = 300"]
    out = Path(__file__).resolve().parent / "results" / f"compile_tail_{dev.type}.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
