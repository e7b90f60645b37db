"""Throughput of the veil's gradient iteration: Algorithm 1 as written, a plain batched loop, the library.

GPU (the issue's cases; about 3 minutes on an H100 / H200):

    python benchmarks/throughput.py --device cuda

CPU (small, for CI; about a minute; exits 1 if the library's default fp32 path
is more than 1.1x slower than the plain batched loop):

    python benchmarks/throughput.py --device cpu

The CPU run uses one thread unless ``--threads N``: on shared cores, two
OpenMP threads per process ran 2-3x slower than one, and the ratios jumped
from run to run. It tunes glibc's allocator before the first method, as the
library's first CPU veil would (``veil_transforms.allocator``), so every method
runs under the same allocator; ``VEIL_TUNE_ALLOCATOR=0`` measures glibc's
defaults instead (``benchmarks/cpu_allocator.py`` compares the two).

On the same inputs (random-weight models, random uint8 images, one flip mask
per image) and T = ``--steps`` steps, it times:

1. ``one-sample``: the paper's Algorithm 1 as written, one image at a time
   (batch 1, ``.item()`` on the loss each step for the early stop). Only
   ``--one-sample`` images are timed; img/s is extrapolated from them.
2. ``plain batched``: a batched eager fp32 loop as in torchattacks' PGD,
   written here: detach, ``autograd.grad``, step, per-sample early stop by a
   mask (no compaction), model in eval mode, NCHW input.
3. ``library ...``: ``veil_transforms.functional.veil`` end to end (flip,
   channels-last, gradient iteration, uint8 output), default fp32 and with its
   speed options (``precision="bf16"``, ``cuda_graph``, ``compile``, ``fold_bn``;
   "library fp32" is the eager loop, ``cuda_graph=False``; bf16 on the CPU
   uses ``torch.autocast("cpu")``; the CPU's compiled variants, e.g.
   "library fp32 + compile", run only when ``--methods`` names them);
   "hardened ..." is ``mode="hardened"`` (the mode to ship: the same loop from
   a keyed pad, so it differs from the plain loop's veil by design; on the CPU
   only when named).
4. on CUDA, a bf16 8192^3 matmul: the card's practical peak.

The early stop is off by default (``--threshold -inf``): with random weights it
would fire at once and time nothing; on trained models at the paper's settings
it never fired (shared/FINDINGS.md), so every method runs all T steps.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one step
(forward + input-gradient backward); TFLOP/s = FLOP per image-step x T x img/s.
Times are the best of ``--repeats`` interleaved runs, after one short warm-up
run each. On the CPU the library-vs-plain check compares process CPU time
(best of the runs), which other processes on shared cores barely move.

Writes benchmarks/results/throughput_<device>.{md,json} (``--out-name`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from veil_transforms import functional as F
from veil_transforms.allocator import tune_for_cpu_veil
from veil_transforms.model import frozen
from veil_transforms.nets import LeNet5

HERE = Path(__file__).resolve().parent
ALPHA, BETA, LR = F.PAPER["alpha"], F.PAPER["beta"], F.DEFAULT_LR

# name -> (builder, sample shape, batch on CUDA, batch on CPU)
CASES = {
    "lenet5_28": (lambda: LeNet5(1, 10), (1, 28, 28), 4096, 512),
    "lenet5_112x92": (lambda: LeNet5(1, 10), (1, 112, 92), 1024, 64),
    "resnet18_32": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 1024, 16),
    "vgg16_112": (lambda: torchvision.models.vgg16(num_classes=10), (3, 112, 112), 256, 4),
}
DEFAULT_CASES = {"cuda": ["lenet5_28", "resnet18_32", "vgg16_112"], "cpu": ["lenet5_28", "resnet18_32"]}
DEFAULT_STEPS = {"cuda": 300, "cpu": 20}


# -- the two reference loops -------------------------------------------------------------------
def algorithm1(model, x0, x, steps, threshold, lr=LR, alpha=ALPHA, beta=BETA):
    """The paper's Algorithm 1 for one image ``[1, C, H, W]``, as written."""
    with torch.no_grad():
        target = model(x)
    xt = x0.clone()
    for _ in range(steps):
        xt.requires_grad_(True)
        loss = F.paper_loss(model(xt), target, xt, x, alpha, beta)
        (grad,) = torch.autograd.grad(loss.sum(), xt)
        xt = (xt - lr * grad).detach()
        if loss.item() < threshold:
            break
    return xt


def plain_batched(model, x0, x, steps, threshold, lr=LR, alpha=ALPHA, beta=BETA):
    """A batched eager fp32 loop in the style of torchattacks' PGD; stopped samples are masked."""
    model.eval()
    with torch.no_grad():
        target = model(x)
    adv = x0.clone().detach()
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        adv.requires_grad = True
        loss = F.paper_loss(model(adv), target, adv, x, alpha, beta)
        grad = torch.autograd.grad(loss.sum(), adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() - lr * grad * active.view(-1, *[1] * (adv.ndim - 1))
        active = active & (loss.detach() >= threshold)
    return adv


# -- measuring ---------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def flop_per_image_step(model, shape, device, n=4):
    """FLOP of one step (forward + input-gradient backward) per image, by FlopCounterMode."""
    x = torch.zeros((n, *shape), device=device)
    with torch.no_grad():
        target = model(x)
    xa = x.clone().requires_grad_(True)
    # .backward() with frozen weights: only the input gradient, as autograd.grad(loss, x~) computes
    # (FlopCounterMode's module hooks do not support autograd.grad on a leaf)
    with frozen(model), FlopCounterMode(display=False) as counter:
        loss = F.paper_loss(model(xa), target, xa, x, ALPHA, BETA)
        loss.sum().backward()
    return counter.get_total_flops() / n


def matmul_tflops(device):
    """CUDA: bf16 8192^3 matmul, mean of 10; CPU: fp32 2048^3 matmul, best of 5 (for context only)."""
    if device.type == "cuda":
        n, dtype, reps, tries = 8192, torch.bfloat16, 10, 1
    else:
        n, dtype, reps, tries = 2048, torch.float32, 1, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    dt = min(timed(lambda: [a @ b for _ in range(reps)], device)[0] for _ in range(tries))
    return 2 * n**3 * reps / dt / 1e12, f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {n}^3 matmul"


CPU_DEFAULT = ("library fp32", "library bf16")  # the CPU variants timed unless --methods names others


def library_variants(device, shape, has_bn):
    """label -> options of veil() timed for one case."""
    if device.type != "cuda":  # the compiled ones only when --methods names them (CPU_DEFAULT: CI's run)
        v = {"library fp32": {}, "library bf16": {"precision": "bf16"},
             "library fp32 + compile": {"compile": True}, "library bf16 + compile": {"precision": "bf16", "compile": True},
             "hardened fp32": {"mode": "hardened"}}
        if has_bn:
            v["library bf16 + fold BN + compile"] = {"precision": "bf16", "fold_bn": True, "compile": True}
        return v
    g, bf = {"cuda_graph": True}, {"precision": "bf16", "cuda_graph": True}
    v = {"library fp32": {"cuda_graph": False}, "library fp32 + CUDA graph": g}
    if shape[0] < 3:  # the default layout for 1-channel input is NCHW; show what channels-last costs
        v["library fp32 + CUDA graph, channels-last"] = {**g, "channels_last": True}
        v["library fp32 + CUDA graph + compile"] = {**g, "compile": True}
    v["library bf16 + CUDA graph"] = bf
    if has_bn:
        v["library bf16 + CUDA graph + fold BN"] = {**bf, "fold_bn": True}
        v["library bf16 + CUDA graph + fold BN + compile"] = {**bf, "fold_bn": True, "compile": True}
    else:
        v["library bf16 + CUDA graph + compile"] = {**bf, "compile": True}
    # the mode to ship: the same loop from its keyed pad (SHAKE-256 on the host, per sample)
    v["hardened fp32 + CUDA graph"] = {**g, "mode": "hardened"}
    return v


def run_case(name, device, steps, threshold, batch, one_sample, repeats, seed=0, only=None, plain=True):
    """Time one case; ``one_sample`` 0 skips Algorithm 1, ``plain=False`` the plain loop, ``only``
    keeps those library variants (labels)."""
    build, shape, _, _ = CASES[name]
    torch.manual_seed(seed)
    model = build().to(device).eval()
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    variants = library_variants(device, shape, has_bn)
    if only and set(only) - set(variants):  # before any timing: a typo must not cost the run
        raise SystemExit(f"--methods: {name} on {device.type} has no {sorted(set(only) - set(variants))}; "
                         f"its library variants: {list(variants)}")
    keep = only or (CPU_DEFAULT if device.type != "cuda" else variants)
    variants = {k: v for k, v in variants.items() if k in keep}
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    # the library's own flip (veil with this generator) reproduced for the reference loops: same inputs
    xn = F.normalize(images).to(device)
    x0 = F.random_pixel_flip(xn, F.PAPER["p"], torch.Generator().manual_seed(seed)).to(device)
    images = images.to(device)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731

    flop = flop_per_image_step(model, shape, device)
    row = {"case": name, "shape": list(shape), "batch": batch, "steps": steps, "gflop_per_image_step": flop / 1e9, "methods": {}}

    def record(method, seconds, n, **extra):
        ips = n / seconds
        row["methods"][method] = {"seconds": seconds, "images": n, "img_s": ips, "tflop_s": flop * steps * ips / 1e12, **extra}
        print(f"  {name:14s} {method:28s} {ips:10.1f} img/s  ({seconds:.3f} s for {n})", flush=True)

    # (1) Algorithm 1 as written, one sample at a time: a few samples, extrapolated
    if one_sample > 0:
        k = min(one_sample, batch)
        algorithm1(model, x0[:1], xn[:1], min(steps, 3), threshold)  # warm-up
        dt, _ = timed(lambda: [algorithm1(model, x0[i : i + 1], xn[i : i + 1], steps, threshold) for i in range(k)], device)
        record("one-sample (Algorithm 1)", dt, k, extrapolated=True)

    # (2) plain batched loop and (3) the library, interleaved, best of `repeats`
    methods = {"plain batched": lambda s: plain_batched(model, x0, xn, s, threshold)} if plain else {}
    for label, opts in variants.items():
        methods[label] = lambda s, o=opts: F.veil(
            model, images, generator=gen(), steps=s, threshold=threshold, lr=LR, device=device, **o
        )
    outs, best, best_cpu, warm = {}, {m: math.inf for m in methods}, {m: math.inf for m in methods}, {}
    for m, fn in list(methods.items()):  # warm-up: lazy init, cuDNN autotuning, graph capture, compilation
        t = time.perf_counter()
        try:
            fn(min(steps, 5))
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile missing a compiler: report, go on
            print(f"  {name:14s} {m:28s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            row.setdefault("failed", {})[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del methods[m]
            continue
        warm[m] = time.perf_counter() - t
    for _ in range(repeats):
        for m, fn in methods.items():
            t_cpu = time.process_time()
            dt, outs[m] = timed(lambda: fn(steps), device)
            best[m], best_cpu[m] = min(best[m], dt), min(best_cpu[m], time.process_time() - t_cpu)
    ref = F.denormalize(outs["plain batched"]).int() if "plain batched" in outs else None  # None: skipped, or failed
    for m in methods:
        diff = None if m == "plain batched" or ref is None else (outs[m].int() - ref).abs()
        record(
            m, best[m], batch, cpu_seconds=best_cpu[m], warmup_seconds=warm[m],
            max_grey_diff_vs_plain=None if diff is None else int(diff.max()),
            frac_pixels_off_by_more_than_1=None if diff is None else float((diff > 1).float().mean()),
        )
    if device.type == "cuda":
        row["auto_batch_size"] = {p: F.auto_batch_size(model, shape, device, precision=p) for p in ("fp32", "bf16")}
    base1 = row["methods"].get("one-sample (Algorithm 1)", {}).get("img_s")
    base2 = row["methods"].get("plain batched", {}).get("img_s")
    for m, r in row["methods"].items():
        r["speedup_vs_one_sample"] = r["img_s"] / base1 if base1 else None
        r["speedup_vs_plain_batched"] = r["img_s"] / base2 if base2 else None
    del model, outs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# the issue's "60,000 MNIST-sized images with LeNet-5" run: label -> veil() options
MNIST60K_CONFIGS = {
    "fp32 + CUDA graph": {"cuda_graph": True},
    "fp32 + CUDA graph + compile": {"cuda_graph": True, "compile": True},
    "bf16 + CUDA graph": {"precision": "bf16", "cuda_graph": True},
}


def mnist60k(device, steps, threshold, n=60_000, seed=0):
    """Veil n random 1x28x28 uint8 images with a random LeNet-5 in one veil() call (one batch), per config.

    ``cold``: the first call (cuDNN autotuning, graph capture, compilation included);
    ``warm``: the second. Images start on the GPU and the flip comes from a generator; the
    ``keyed`` run starts from CPU images with a key (per-sample HMAC + SHAKE on the CPU,
    host-device copies) as VeilTransform does.
    """
    torch.manual_seed(seed)
    model = LeNet5(1, 10).to(device).eval()
    cpu_images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    images = cpu_images.to(device)
    rows = {}
    for label, opts in MNIST60K_CONFIGS.items():
        run = lambda: F.veil(model, images, generator=torch.Generator().manual_seed(seed), steps=steps,  # noqa: E731
                             threshold=threshold, device=device, **opts)
        try:
            cold, _ = timed(run, device)
        except Exception as e:  # noqa: BLE001
            print(f"  mnist60k {label:30s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        warm, _ = timed(run, device)
        rows[label] = {"cold_seconds": cold, "warm_seconds": warm, "img_s": n / warm}
        print(f"  mnist60k {label:30s} cold {cold:6.2f} s  warm {warm:6.2f} s  ({n / warm:,.0f} img/s)", flush=True)
    best = min(rows, key=lambda k: rows[k]["warm_seconds"])
    key = bytes(range(32))
    keyed, _ = timed(lambda: F.veil(model, cpu_images, key=key, steps=steps, threshold=threshold, device=device,
                                    **MNIST60K_CONFIGS[best]), device)
    t = time.perf_counter()
    F.keyed_uniforms(key, F.normalize(cpu_images))
    hashing = time.perf_counter() - t
    rows[best + ", keyed, CPU images"] = {"warm_seconds": keyed, "img_s": n / keyed, "hashing_seconds": hashing}
    print(f"  mnist60k {best + ', keyed, CPU images':30s} {keyed:6.2f} s (of which key hashing {hashing:.2f} s)", flush=True)
    del model, images
    torch.cuda.empty_cache()
    return {"images": n, "steps": steps, "configs": rows, "best": best}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if F.cpu_has_native_bf16() else "bf16 emulated"
    n = torch.get_num_threads()
    return f"{model}, {n} thread{'' if n == 1 else 's'}, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def write(result, out_name):
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{out_name}.json").write_text(json.dumps(result, indent=1))
    peak, peak_what = result["matmul_tflops"], result["matmul_what"]
    lines = [
        f"# Veil throughput on {result['device_name']} ({result['device']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"torch {result['torch']}, T = {result['steps']} steps, early-stop threshold {result['threshold']}, lr {LR}; "
        f"random-weight models, random uint8 images; best of {result['repeats']} runs (one-sample: "
        f"{result['one_sample']} images timed, img/s extrapolated). Reference rate for the % column: {peak_what} at {peak:.3f} TFLOP/s."
        + (" cudnn.benchmark on." if result["device"] == "cuda" else "")
        + {True: " glibc's allocator tuned (veil_transforms.allocator).", False: " glibc's allocator untuned."}.get(
            result.get("cpu_allocator_tuned"), ""),
        "",
        "| case | batch | GFLOP/img/step | method | img/s | × one-sample | × plain batched | TFLOP/s | % of ref. matmul | max Δ vs plain (grey levels) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["cases"]:
        for m, r in row["methods"].items():
            lines.append(
                f"| {row['case']} {'×'.join(map(str, row['shape']))} | {row['batch']} | {row['gflop_per_image_step']:.4f} | {m} | "
                f"{r['img_s']:,.1f}{' (extrapolated)' if r.get('extrapolated') else ''} | {fmt(r['speedup_vs_one_sample'], '.0f')} | "
                f"{fmt(r['speedup_vs_plain_batched'], '.2f')} | {r['tflop_s']:.3f} | {100 * r['tflop_s'] / peak:.1f}% | "
                f"{fmt(r.get('max_grey_diff_vs_plain'), 'd')} |"
            )
    for row in result["cases"]:
        for m, why in row.get("failed", {}).items():
            lines.append(f"\n{row['case']}: {m} failed: {why}")
    if result.get("mnist60k"):
        r = result["mnist60k"]
        lines += ["", f"## {r['images']:,} MNIST-sized images, LeNet-5, T = {r['steps']}, one veil() call", "",
                  "| config | first call (s) | second call (s) | img/s |", "|---|---|---|---|"]
        for k, c in r["configs"].items():
            lines.append(f"| {k} | {fmt(c.get('cold_seconds'), '.2f')} | {c['warm_seconds']:.2f} | {c['img_s']:,.0f} |")
    if any("auto_batch_size" in r for r in result["cases"]):
        lines += ["", "auto_batch_size (largest power-of-two batch whose step fits): " + "; ".join(
            f"{r['case']}: fp32 {r['auto_batch_size']['fp32']}, bf16 {r['auto_batch_size']['bf16']}" for r in result["cases"] if "auto_batch_size" in r
        )]
    if result.get("check"):
        lines += ["", result["check"]]
    (out / f"{out_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="T (default: 300 on CUDA, 20 on the CPU)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None)
    ap.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    ap.add_argument("--threshold", type=float, default=-math.inf, help="early-stop threshold (default: off)")
    ap.add_argument("--one-sample", type=int, default=3, help="images timed for Algorithm 1 one at a time (0: skip it)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                    help="time only these library variants (their table labels, e.g. 'library bf16 + CUDA graph + compile'); "
                         "the plain batched loop runs too (the reference) unless --skip-plain")
    ap.add_argument("--skip-plain", action="store_true",
                    help="do not time the plain batched loop (e.g. at a batch where its fp32 memory does not fit)")
    ap.add_argument("--repeats", type=int, default=None, help="best of this many runs (default: 1 on CUDA, 3 on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default on the CPU: 1)")
    ap.add_argument("--no-check", action="store_true", help="CPU: do not fail when the library is slower than the plain loop")
    ap.add_argument("--cudnn-benchmark-limit", type=int, default=None, metavar="N",
                    help="CUDA: torch.backends.cudnn.benchmark_limit, the cuDNN algorithms tried per convolution "
                         "(torch's default 10; 0: all)")
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--no-60k", action="store_true", help="CUDA: skip the 60,000-image LeNet-5 run")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    kind = device.type
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.cudnn_benchmark_limit is not None:
            torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    if args.threads or kind == "cpu":
        torch.set_num_threads(args.threads or 1)
    tuned = tune_for_cpu_veil() if kind == "cpu" else None  # before any method: all under the same allocator
    torch.set_flush_denormal(True)
    steps = args.steps or DEFAULT_STEPS[kind]
    repeats = args.repeats or (1 if kind == "cuda" else 3)
    cases = args.cases or DEFAULT_CASES[kind]
    peak, peak_what = matmul_tflops(device)
    print(f"{device_name(device)}: {peak_what} {peak:.2f} TFLOP/s", flush=True)
    result = {
        "device": kind, "device_name": device_name(device), "torch": torch.__version__,
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")",
        "steps": steps, "threshold": args.threshold if math.isfinite(args.threshold) else str(args.threshold), "repeats": repeats, "one_sample": args.one_sample,
        "matmul_tflops": peak, "matmul_what": peak_what, "cpu_allocator_tuned": tuned, "cases": [],
    }
    for name in cases:
        batch = args.batch or CASES[name][2 if kind == "cuda" else 3]
        result["cases"].append(run_case(name, device, steps, args.threshold, batch, args.one_sample, repeats, only=args.methods,
                                        plain=not args.skip_plain))
        write(result, args.out_name or f"throughput_{kind}")  # after each case: a killed run keeps what it measured
    if kind == "cuda" and not args.no_60k:
        result["mnist60k"] = mnist60k(device, steps, args.threshold)
    ok = True
    # the CPU check, on process CPU time (other processes on shared cores shift wall time by 10-20%)
    if kind == "cpu" and all({"library fp32", "plain batched"} <= set(r["methods"]) for r in result["cases"]):
        ratios = [(r["case"], r["methods"]["plain batched"], r["methods"]["library fp32"]) for r in result["cases"]]
        ok = all(lib["cpu_seconds"] <= 1.1 * plain["cpu_seconds"] for _, plain, lib in ratios)
        result["check"] = ("PASS" if ok else "FAIL") + ": library fp32 / plain batched, process CPU time (wall time) = " + ", ".join(
            f"{c} {lib['cpu_seconds'] / plain['cpu_seconds']:.2f} ({lib['seconds'] / plain['seconds']:.2f})" for c, plain, lib in ratios
        ) + "; the CPU-time ratio must be <= 1.1"
    write(result, args.out_name or f"throughput_{kind}")
    if not ok and not args.no_check:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
