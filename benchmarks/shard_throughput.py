"""veil-shard end to end (decode, veil, PNG encode, tar write) against the raw veil rate, same run.

    python benchmarks/shard_throughput.py --device cuda

Per case, on the same images and veil settings:

* ``raw veil``: ``VeilTransform.veil_batch`` on CPU uint8 batches already in
  memory (key hashing, host-device copies and the gradient iteration: all the
  veil needs, none of the file work), timed after a warm-up batch;
* ``veil-shard``: ``shards.write_shards`` (the engine behind the CLI) from an
  ImageFolder of PNG files to finished, fsynced WebDataset shards with a
  manifest, timed whole (listing, decoding, veiling, encoding, writing); with
  decoding/encoding threads (``--io-procs 0``) and with I/O processes.

Cases: MNIST-sized 1x28x28 with LeNet-5 (real MNIST test images, cycled, when
``../shared/data`` has them; else random), and CIFAR-sized 3x32x32 with
ResNet-18 (random images). Random-weight models with the early stop off
(``threshold -inf``), so every image takes all T steps, as in throughput.py.
The issue's bar: veil-shard >= 90% of the raw veil rate.

Writes benchmarks/results/shard_throughput_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from veil_transforms import shards

# veil-shard's I/O processes are spawned: they import this script again (as __mp_main__). Only the
# benchmark itself needs torch; the CLI's processes start without it, so these must too, or the
# whole-run times would include a torch import per I/O process that users do not pay.
if __name__ != "__mp_main__":
    import torch
    import torchvision

    from veil_transforms import VeilTransform
    from veil_transforms.data import load_mnist, mnist_path
    from veil_transforms.nets import LeNet5

CASES = {
    # name: (model builder, sample shape, images on CUDA, batch on CUDA, veil options on CUDA)
    "mnist_lenet5": (lambda: LeNet5(1, 10), (1, 28, 28), 32768, 4096, {"cuda_graph": True}),
    "cifar_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 8192, 1024,
                       {"precision": "bf16", "cuda_graph": True, "fold_bn": True}),
}


def make_source(root: Path, shape, n: int, seed: int = 0) -> torch.Tensor:
    """An ImageFolder of n PNG files (10 classes); returns the images as a uint8 tensor."""
    if shape == (1, 28, 28) and mnist_path() is not None:
        x, _ = load_mnist()
        x = x[torch.arange(n) % len(x)]
    else:
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
    for i, a in enumerate(x.numpy()):
        hw = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        PIL.Image.fromarray(np.ascontiguousarray(hw)).save(root / f"class{i % 10}" / f"img{i:07d}.png")
    return x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_img_s(out: Path) -> float:
    """Images per second between the first and the last finished shard (file times; images of
    the shards after the first, from the manifest): the rate once started, without process
    start-up, model loading and compilation."""
    done = sorted(((out / s["name"]).stat().st_mtime, s["count"]) for s in shards.read_manifest(out)["shards"])
    if len(done) < 3:
        return float("nan")
    return sum(c for _, c in done[1:]) / (done[-1][0] - done[0][0])


def timing_line(secs: float, t: dict) -> str:
    """Where a write_shards call's time went (its summary's ``timings``)."""
    f = lambda v: "?" if v is None else f"{v:.2f} s"  # noqa: E731
    return (f"whole {secs:.2f} s = prepare {f(t['prepare_s'])} + run; first batch decoded at {f(t.get('first_batch_decoded_s'))} "
            f"(GPU warm-up meanwhile {f(t.get('warm_up_s'))}), veiled at {f(t['first_batch_s'])} into the run, "
            f"veil_batch busy {f(t['veil_s'])}, GPU thread waiting on the writer {f(t.get('writer_wait_s'))}, "
            f"after the last batch {f(t['after_last_batch_s'])}")


def cli_module() -> str:
    try:
        import veil_transforms.tools.shard  # noqa: F401 - installed package
        return "veil_transforms.tools.shard"
    except ImportError:  # a checkout on PYTHONPATH (the repo root)
        return "tools.shard"


def run_case(name, device, steps, n, batch, opts, tmp: Path, nprocs=(), io_procs=(0,), mode="paper"):
    build, shape, _, _, _ = CASES[name]
    torch.manual_seed(0)
    model = build().to(device).eval()
    src, out = tmp / f"{name}-src", tmp / f"{name}-out"
    t = time.perf_counter()
    x = make_source(src, shape, n)
    print(f"{name}: wrote {n} PNGs in {time.perf_counter() - t:.1f} s", flush=True)
    # ImageFolder order (sorted class folders, then file names) so both runs veil the same batches
    order = sorted(range(n), key=lambda i: (i % 10, i))
    x = x[order]
    kw = dict(steps=steps, threshold=-math.inf, mode=mode, **opts)
    veil = VeilTransform(model, key=bytes(range(32)), device=device, **kw)
    veil.veil_batch(x[:batch])  # warm-up: cuDNN autotuning, capture, compilation
    sync(device)
    t = time.perf_counter()
    for s in range(0, n, batch):
        veil.veil_batch(x[s : s + batch])
    sync(device)
    raw = time.perf_counter() - t
    runs = {}
    for k in io_procs:  # the engine in this process, with decoding/encoding threads (0) or k I/O processes
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        summary = shards.write_shards(src, out, model, batch_size=batch, device=device, progress=False, io_procs=k, **kw)
        secs = time.perf_counter() - t
        assert summary["complete"] and summary["total_veiled"] == n, summary
        st = summary["steady_img_s"] or float("nan")
        runs[k] = {"seconds": secs, "img_s": n / secs, "ratio": raw / secs, "steady_img_s": st, "steady_ratio": st * raw / n,
                   "timings": summary["timings"]}
        print(f"{name}: veil-shard, {f'{k} I/O processes' if k else 'threads'}: {n / secs:,.0f} img/s (steady {st:,.0f}), "
              f"ratio {raw / secs:.3f}, steady ratio {st * raw / n:.3f}; {timing_line(secs, summary['timings'])}", flush=True)
    size = sum(f.stat().st_size for f in out.glob("veil-*.tar"))
    e2e, steady = runs[io_procs[0]]["seconds"], runs[io_procs[0]]["steady_img_s"]
    multi = {}
    for nproc in nprocs:  # the CLI with --nproc: one process per rank on the same GPU
        shutil.rmtree(out)
        mfile = tmp / f"{name}.pt"
        torch.jit.script(model.cpu()).save(str(mfile))
        model.to(device)
        flags = ["--precision", opts.get("precision", "fp32")] + [f for k, f in (
            ("compile", "--compile"), ("fold_bn", "--fold-bn")) if opts.get(k)] + ([] if opts.get("cuda_graph", True) else ["--no-cuda-graph"])
        cmd = [sys.executable, "-m", cli_module(), str(src), str(out), "--model", str(mfile), "--steps", str(steps),
               "--threshold=-inf", "--mode", mode, "--batch-size", str(batch), "--device", device.type, "--nproc", str(nproc), "--quiet", *flags]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        secs = time.perf_counter() - t
        st = steady_img_s(out)
        multi[nproc] = {"seconds": secs, "img_s": n / secs, "ratio": raw / secs, "steady_img_s": st, "steady_ratio": st * raw / n}
        print(f"{name}: veil-shard CLI --nproc {nproc}: {n / secs:,.0f} img/s (steady {st:,.0f}), ratio {raw / secs:.3f}", flush=True)
    row = {"case": name, "shape": list(shape), "images": n, "batch": batch, "options": opts, "steps": steps,
           "raw_seconds": raw, "raw_img_s": n / raw, "shard_seconds": e2e, "shard_img_s": n / e2e,
           "ratio": raw / e2e, "shard_bytes": size, "steady_img_s": steady, "steady_ratio": steady * raw / n,
           "io_procs": runs, "cli_nproc": multi}
    print(f"{name}: raw veil {n / raw:,.0f} img/s, veil-shard {n / e2e:,.0f} img/s (steady {steady:,.0f}), ratio {raw / e2e:.3f}", flush=True)
    shutil.rmtree(src)
    shutil.rmtree(out)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="T (default: 300 on CUDA, 3 on the CPU)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--images", type=int, default=None, help="images per case (default: per case on CUDA, 512 on the CPU)")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--nproc", type=int, nargs="*", default=[], help="also time the CLI with these --nproc values")
    ap.add_argument("--io-procs", type=int, nargs="+", default=[0, 8],
                    help="time the engine with these io_procs values (0: threads; first one: the table's main row)")
    ap.add_argument("--tag", default="", help="results file suffix: shard_throughput_<device>[_TAG].{json,md}")
    ap.add_argument("--mode", default="paper", choices=["paper", "hardened"],
                    help="veil mode (hardened: its pad is hashed in veil-shard's decoding workers, and inline in the raw veil)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (300 if cuda else 3)
    torch.set_flush_denormal(True)
    rows = []
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="veil-shard-bench-", dir=args.tmp))
    try:
        for name in args.cases:
            _, _, n, batch, opts = CASES[name]
            n = args.images or (n if cuda else 512)
            rows.append(run_case(name, device, steps, n, batch if cuda else 128, opts if cuda else {}, tmp, args.nproc,
                                 args.io_procs, args.mode))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    cmd = "python benchmarks/shard_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stem = f"shard_throughput_{device.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(
        {"command": cmd, "device": dev_name, "torch": torch.__version__, "cases": rows}, indent=1))
    md = [f"# veil-shard end to end vs the raw veil rate, on {dev_name} (torch {torch.__version__})", "",
          f"Command: `{cmd}`", "", "T = " + str(steps) + f", mode {args.mode}, early stop off, random-weight models.", "",
          "Whole run: wall time of the call. Steady: the engine's own rate after its first batch "
          "(`steady_img_s` in its summary: leaves out start-up, warm-up, compilation); for the CLI with "
          "`--nproc`, between the first and the last finished shard (file times).", "",
          "| case | images | batch | veil options | raw veil img/s | veil-shard img/s, whole run | veil-shard / raw | steady img/s | steady / raw |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} {'×'.join(map(str, r['shape']))} | {r['images']:,} | {r['batch']} | {r['options'] or 'fp32'} | "
                  f"{r['raw_img_s']:,.0f} | {r['shard_img_s']:,.0f} | {100 * r['ratio']:.1f}% | {r['steady_img_s']:,.0f} | {100 * r['steady_ratio']:.1f}% |")
        for k, c in list(r["io_procs"].items())[1:]:
            md.append(f"| … {k} I/O processes (`io_procs={k}`) | | | | | {c['img_s']:,.0f} | {100 * c['ratio']:.1f}% | "
                      f"{c['steady_img_s']:,.0f} | {100 * c['steady_ratio']:.1f}% |")
        for k, c in r["cli_nproc"].items():
            md.append(f"| … CLI `--nproc {k}` (same GPU) | | | | | {c['img_s']:,.0f} | {100 * c['ratio']:.1f}% | "
                      f"{c['steady_img_s']:,.0f} | {100 * c['steady_ratio']:.1f}% |")
    md += ["", "Where the engine's time went (its summary's `timings`):", ""]
    md += [f"- {r['case']}, {f'{k} I/O processes' if k else 'threads'}: {timing_line(c['seconds'], c['timings'])}"
           for r in rows for k, c in r["io_procs"].items()]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
