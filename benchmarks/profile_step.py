"""Where one veil step's GPU time goes: torch.profiler's kernel table for a throughput.py case.

    python benchmarks/profile_step.py --case lenet5_28 [--compile] [--bf16] [--rewrite] [--steps 20]

Runs gradient iteration eagerly (no CUDA graph, so the profiler sees each
kernel) after a warm-up, and prints the kernels by total GPU time, with their
share of the step. ``--rewrite`` (LeNet-5 only): mnist60k_levers.rewrite()'s exact rewrites.
Writes benchmarks/results/profile_<case>[_compile][_bf16][_rewrite].md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import CASES  # noqa: E402

from veil_transforms import functional as F  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="lenet5_28")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--rewrite", action="store_true", help="LeNet-5 with mnist60k_levers.rewrite() (lenet5_28 only)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.rewrite and args.case != "lenet5_28":
        ap.error("--rewrite: LeNet-5 only (--case lenet5_28)")
    if not torch.cuda.is_available():
        ap.error("profiles GPU kernels: needs a CUDA device")
    build, shape, batch, _ = CASES[args.case]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build().to(dev).eval()
    if args.rewrite:
        from mnist60k_levers import rewrite
        model = rewrite(model)
    x = (torch.rand((batch, *shape), device=dev) * 2 - 1).contiguous(
        memory_format=torch.channels_last if shape[0] >= 3 else torch.contiguous_format)
    kw = dict(threshold=-math.inf, precision="bf16" if args.bf16 else "fp32", compile=args.compile)
    F.gradient_iteration(model, -x, x, steps=5, **kw)  # warm-up, compilation, cuDNN autotuning
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.gradient_iteration(model, -x, x, steps=args.steps, **kw)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    total = sum(e.device_time_total for e in rows)
    rows.sort(key=lambda e: -e.device_time_total)
    tag = args.case + ("_compile" if args.compile else "") + ("_bf16" if args.bf16 else "") + ("_rewrite" if args.rewrite else "")
    md = [f"# GPU time of one veil step, {args.case} (batch {batch}), {torch.cuda.get_device_name()}, "
          f"{'bf16' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}{', rewritten' if args.rewrite else ''}", "",
          f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          f"Kernel time per step: {total / args.steps / 1e3:.3f} ms ({args.steps} eager steps profiled).", "",
          "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
    for e in rows[: args.top]:
        name = e.key.replace("|", "/")[:110]
        md.append(f"| `{name}` | {e.count / args.steps:.1f} | {e.device_time_total / args.steps / 1e3:.3f} | {100 * e.device_time_total / total:.1f}% |")
    out = Path(__file__).resolve().parent / "results" / f"profile_{tag}.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
