"""The issue's "60,000 MNIST-sized images with LeNet-5 in under 5 s", lever by lever.

    python benchmarks/mnist60k_levers.py [--images 60000] [--configs NAME ...]

Each config veils the same 60,000 random 1x28x28 uint8 images (on the GPU, flip
from a generator, T = 300, early stop off, random-weight LeNet-5) with
``veil()``: once cold (cuDNN autotuning, graph capture, compilation), then
once more, timed ("warm"). Between configs the compile and graph caches are
cleared, so each config compiles and captures on its own. Levers: one batch
vs chunks (a chunk replays the graph the previous chunk captured), compile,
TF32 off for cuDNN, channels-last, inductor's max-autotune and forced
channels-last layout. Writes
benchmarks/results/mnist60k_levers_<device>.{md,json} after every config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from veil_transforms import functional as F
from veil_transforms.nets import LeNet5

G = {"cuda_graph": True}
C = {"cuda_graph": True, "compile": True}
CONFIGS = {  # name -> (veil() options, cudnn.allow_tf32[, torch._inductor.config patch])
    "graph, one batch": (G, True),
    "graph, chunks of 4096": ({**G, "chunk": 4096}, True),
    "graph + compile, one batch": (C, True),
    "graph + compile, chunks of 4096": ({**C, "chunk": 4096}, True),
    "graph + compile, chunks of 8192": ({**C, "chunk": 8192}, True),
    "graph + compile, chunks of 4096, no TF32": ({**C, "chunk": 4096}, False),
    "graph + compile, chunks of 4096, channels-last": ({**C, "chunk": 4096, "channels_last": True}, True),
    # inductor picking Triton kernels for the convolutions and matmuls where they time faster
    "graph + compile (max-autotune), one batch": (C, True, {"max_autotune": True}),
    # inductor keeping every convolution's tensors channels-last (no NCHW<->NHWC transposes)
    "graph + compile (forced layout optimization), one batch": (C, True, {"force_layout_optimization": True}),
}


def reset():
    F._COMPILED.clear()
    F.clear_graph_cache()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = LeNet5(1, 10).to(dev).eval()
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dev)
    cmd = "python benchmarks/mnist60k_levers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows, ref = {}, None
    out = Path(__file__).resolve().parent / "results"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    for label in args.configs:
        opts, allow_tf32, *patch = CONFIGS[label]
        reset()

        def run():
            with F.cudnn_setting("allow_tf32", allow_tf32), torch._inductor.config.patch(patch[0] if patch else {}):
                return F.veil(model, images, generator=torch.Generator().manual_seed(0), steps=args.steps,
                              threshold=-math.inf, device=dev, **opts)

        try:
            sync()
            t = time.perf_counter()
            run()
            sync()
            cold = time.perf_counter() - t
            t = time.perf_counter()
            got = run()
            sync()
            warm = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - report and go on
            rows[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{label:50s} FAILED {rows[label]['error']}", flush=True)
            continue
        if ref is None:
            ref = got
        d = (got.int() - ref.int()).abs()
        rows[label] = {"cold_s": cold, "warm_s": warm, "img_s": args.images / warm,
                       "max_grey_diff_vs_first": int(d.max()), "frac_off_by_more_than_1": float((d > 1).float().mean())}
        print(f"{label:50s} cold {cold:6.2f} s  warm {warm:6.2f} s  {args.images / warm:8,.0f} img/s  "
              f"max diff {int(d.max())}", flush=True)
        md = [f"# {args.images:,} MNIST-sized images, LeNet-5, T = {args.steps}, on {name} (torch {torch.__version__})", "",
              f"Command: `{cmd}`", "",
              "Random weights, random images on the GPU, early stop off. Cold: first call (autotuning, capture, "
              "compilation); warm: second call. Diff: grey levels against the first config's veil.", "",
              "| config | cold (s) | warm (s) | img/s | max diff | pixels off by > 1 |", "|---|---|---|---|---|---|"]
        for k, r in rows.items():
            md.append(f"| {k} | failed: {r['error']} | | | | |" if "error" in r else
                      f"| {k} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['img_s']:,.0f} | {r['max_grey_diff_vs_first']} | "
                      f"{100 * r['frac_off_by_more_than_1']:.3f}% |")
        (out / f"mnist60k_levers_{dev.type}.md").write_text("\n".join(md) + "\n")
        (out / f"mnist60k_levers_{dev.type}.json").write_text(json.dumps(
            {"command": cmd, "device": name, "torch": torch.__version__, "images": args.images, "steps": args.steps,
             "configs": rows}, indent=1))
    print((out / f"mnist60k_levers_{dev.type}.md").read_text())


if __name__ == "__main__":
    main()
