"""veil-shard's pipeline on the CPU, with a stand-in for the GPU: decode, key hashing, batching,
PNG encoding and tar writing as in a real run, while ``veil_batch`` sleeps ``n / --rate`` seconds
(the GIL released, as while a GPU works) and returns its input.

It measures what the engine around the veil costs, without a GPU: whole-run img/s against the
stand-in's rate, the steady rate after the first batch, and the summary's ``timings``.

    python benchmarks/shard_pipeline_cpu.py --io-procs 0 2 --repeats 3

To compare two commits, run the same file from a worktree of each (it imports the checkout it
lives in). Prints one line per run and the median per ``io_procs``; writes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's library

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402 - imported at the top on purpose: spawned I/O processes must not pay for it

from veil_transforms import shards, transform  # noqa: E402
from veil_transforms.nets import LeNet5  # noqa: E402


def make_source(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(d / f"img{i:07d}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--io-procs", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rate", type=float, default=6500.0, help="the stand-in GPU's img/s (default: LeNet-5's raw rate on an H100)")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    def stand_in(self, x, u=None, pad_uniforms=None):
        time.sleep(len(x) / args.rate)
        return x

    transform.VeilTransform.veil_batch = stand_in
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="veil-pipeline-"))
    try:
        make_source(tmp / "src", args.images)
        runs: dict[int, list[float]] = {k: [] for k in args.io_procs}
        for _ in range(args.repeats):  # interleaved: drifts of a shared machine hit every setting alike
            for k in args.io_procs:
                out = tmp / "out"
                t = time.perf_counter()
                s = shards.write_shards(tmp / "src", out, LeNet5(1, 10).eval(), steps=1, device="cpu",
                                        batch_size=args.batch, progress=False, io_procs=k, threshold=-1e9)
                w = time.perf_counter() - t
                runs[k].append(w)
                print(f"io_procs={k}: whole {w:.2f} s ({args.images / w:,.0f} img/s, {100 * args.images / w / args.rate:.0f}% "
                      f"of the stand-in's rate), steady {s['steady_img_s'] or 0:,.0f} img/s; "
                      + ", ".join(f"{n} {v:.2f}" for n, v in s["timings"].items() if v is not None), flush=True)
                shutil.rmtree(out)
        for k, ws in runs.items():
            m = statistics.median(ws)
            print(f"median io_procs={k}: {m:.2f} s ({args.images / m:,.0f} img/s) over {len(ws)} runs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
