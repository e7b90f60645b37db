"""What veil-export's privacy gate costs per image on this CPU: ``tools.export.attack_ssim`` (the audit's
cheap attacks, per-sample scores) on uniform-noise veils (what hardened veils look like to the attacks;
sign recovery's cost grows with the regions it finds, which noise has many of).

    python benchmarks/gate_cost.py [--n 512] [--sizes 28 64]

Also times the audit with its re-identification gallery (100), which the gate no longer computes, and
the gate's wall-clock time in one thread and in ``--threads`` (veil-export's default: the CPUs, up to 8).
Writes ``benchmarks/results/gate_cost_cpu.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from veil_transforms import audit  # noqa: E402
from veil_transforms.tools import export as export_cli  # noqa: E402


def cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64], help="grey image sizes (square)")
    ap.add_argument("--threads", type=int, default=2, help="veil-export --threads for the wall-clock column")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for s in args.sizes:
        x = rng.integers(0, 256, (args.n, 1, s, s), dtype=np.uint8)
        v = rng.integers(0, 256, (args.n, 1, s, s), dtype=np.uint8)
        gate = cpu_seconds(lambda: export_cli.attack_ssim(x, v, {}))
        with_reid = cpu_seconds(lambda: audit.run(torch.from_numpy(x), torch.from_numpy(v), reid_gallery=100))
        t = time.process_time()
        audit.run(torch.from_numpy(x), torch.from_numpy(v), reid_gallery=0, attacks=["sign_recovery"])
        sign = time.process_time() - t
        t = time.perf_counter()
        export_cli.attack_ssim(x, v, {}, args.threads)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        export_cli.attack_ssim(x, v, {}, 1)
        wall1 = time.perf_counter() - t
        rows.append((s, gate, with_reid, sign, wall1, wall))
        print(f"{s}x{s}: gate {1e3 * gate / args.n:.1f} ms/img, with re-id {1e3 * with_reid / args.n:.1f}, "
              f"sign recovery alone {1e3 * sign / args.n:.1f}", flush=True)
    cmd = "python benchmarks/gate_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md = ["# veil-export's gate: CPU time per image (1 thread)", "", f"Command: `{cmd.strip()}`, torch {torch.__version__}.", "",
          f"{args.n} uniform-noise veils of uniform-noise originals per size; process CPU time.", "",
          f"| size | gate (attack_ssim) CPU ms/img | audit with re-id gallery 100 | sign recovery alone | images/hour "
          f"(gate, 1 thread) | wall ms/img, 1 thread | wall ms/img, {args.threads} threads |",
          "|---|---|---|---|---|---|---|"]
    for s, g, r, sr, w1, w in rows:
        md.append(f"| {s}x{s} | {1e3 * g / args.n:.1f} | {1e3 * r / args.n:.1f} | {1e3 * sr / args.n:.1f} | "
                  f"{3600 * args.n / g:,.0f} | {1e3 * w1 / args.n:.1f} | {1e3 * w / args.n:.1f} |")
    out = HERE / "results" / "gate_cost_cpu.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
