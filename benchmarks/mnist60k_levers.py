"""The issue's "60,000 MNIST-sized images with LeNet-5 in under 5 s", lever by lever.

    python benchmarks/mnist60k_levers.py [--images 60000] [--configs NAME ...]

Each config veils the same 60,000 random 1x28x28 uint8 images (on the GPU, flip
from a generator, T = 300, early stop off, random-weight LeNet-5) with
``veil()``: once cold (cuDNN autotuning, graph capture, compilation), then
once more, timed ("warm"). Between configs the compile and graph caches are
cleared, so each config compiles and captures on its own. Levers: one batch
vs chunks (a chunk replays the graph the previous chunk captured), compile,
TF32 off for cuDNN, channels-last, inductor's max-autotune and forced
channels-last layout, and two exact rewrites of LeNet-5 (``rewrite()``) aimed at
kernels the H100 profile shows (benchmarks/results/profile_lenet5_28_compile.md):
conv1's input gradient as 25 shifted products (cuDNN runs it as a TF32 GEMM
padded from 1 to 64 output channels, 18% of the step, plus layout transposes;
shifted products are elementwise work inductor can fuse into one kernel), and
the adaptive max pool on conv2's 10x10 output as the 2x2 max pool it equals
(its backward is an atomic scatter, 4%). Writes
benchmarks/results/mnist60k_levers_<device>.{md,json} after every config.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

from veil_transforms import functional as F
from veil_transforms.nets import LeNet5


def shifted_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, in_hw, padding: int) -> torch.Tensor:
    """The input gradient of a stride-1 ``conv2d(x, weight, padding=padding)`` as k*k shifted products.

    ``conv_transpose2d(grad_out, weight, padding=padding)`` written out: for each kernel tap (i, j),
    the zero-padded output gradient shifted by the tap, weighted per channel pair. Exact up to the
    order of the sums; cheap only when the channel counts are small (LeNet's conv1: 6 -> 1)."""
    k, (h, w) = weight.shape[-1], in_hw
    pad = k - 1 - padding
    gp = Fn.pad(grad_out, (pad, pad, pad, pad))
    o, c = weight.shape[:2]
    acc = None  # [B, O, C, H, W]: broadcast products, not einsum (which lowers to a K = O matmul)
    for i in range(k):
        for j in range(k):
            tap = gp[:, :, k - 1 - i:k - 1 - i + h, k - 1 - j:k - 1 - j + w].unsqueeze(2)
            term = tap * weight[:, :, i, j].view(1, o, c, 1, 1)
            acc = term if acc is None else acc + term
    return acc.sum(1)


class _ShiftedGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return Fn.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        gx = shifted_input_grad(grad_out, weight, x.shape[-2:], p) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # F's own training: the usual kernels
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return gx, gw, gb, None


class _ShiftedGradConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or len(set(conv.padding)) != 1 \
                or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding_mode != "zeros":
            raise ValueError(f"shifted input gradient: needs a square stride-1 conv, got {conv}")
        self.weight, self.bias, self.padding = conv.weight, conv.bias, conv.padding[0]

    def forward(self, x):
        return _ShiftedGradConv.apply(x, self.weight, self.bias, self.padding)


class _EvenAdaptiveMaxPool2d(nn.Module):
    """``AdaptiveMaxPool2d(s)`` as ``max_pool2d`` where the input size is a multiple of s (the same windows)."""

    def __init__(self, pool: nn.AdaptiveMaxPool2d):
        super().__init__()
        self.pool = pool
        s = pool.output_size
        self.size = (s, s) if isinstance(s, int) else tuple(s)

    def forward(self, x):
        (h, w), (sh, sw) = x.shape[-2:], self.size
        if sh and sw and h % sh == 0 and w % sw == 0:
            return Fn.max_pool2d(x, (h // sh, w // sw))
        return self.pool(x)


def rewrite(model: LeNet5, conv1: bool = True, pool: bool = True) -> LeNet5:
    """A LeNet-5 computing the same function with ``model``'s weight tensors (shared, not copied)."""
    new = LeNet5.__new__(LeNet5)
    nn.Module.__init__(new)
    for name, mod in model.named_children():
        if conv1 and name == "conv1":
            mod = _ShiftedGradConv2d(mod)
        elif pool and isinstance(mod, nn.AdaptiveMaxPool2d):
            mod = _EvenAdaptiveMaxPool2d(mod)
        new.add_module(name, mod)
    return new.train(model.training)


G = {"cuda_graph": True}
C = {"cuda_graph": True, "compile": True}
CONFIGS = {  # name -> (veil() options, cudnn.allow_tf32[, torch._inductor.config patch[, rewrite() options]])
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
    # exact rewrites of LeNet-5 (rewrite()): conv1's input gradient as shifted products, the even adaptive pool
    "graph + compile, one batch, conv1 input gradient as shifted products": (C, True, {}, {"pool": False}),
    "graph + compile, one batch, even adaptive pool as max pool": (C, True, {}, {"conv1": False}),
    "graph + compile, one batch, both rewrites": (C, True, {}, {}),
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here (--device cpu smoke-tests the script)")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = LeNet5(1, 10).to(dev).eval()
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dev)
    cmd = "python benchmarks/mnist60k_levers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows, ref = {}, None
    out = Path(__file__).resolve().parent / "results"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    for label in args.configs:
        opts, allow_tf32, *extra = CONFIGS[label]
        patch = extra[0] if extra else {}
        f = rewrite(model, **extra[1]) if len(extra) > 1 else model
        reset()

        def run():
            with F.cudnn_setting("allow_tf32", allow_tf32), torch._inductor.config.patch(patch):
                return F.veil(f, images, generator=torch.Generator().manual_seed(0), steps=args.steps,
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
              "Random weights, random images on the device, early stop off. Cold: first call (autotuning, capture, "
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
