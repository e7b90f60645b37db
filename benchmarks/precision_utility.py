"""Do the veil's speed options cost utility? MNIST, LeNet-5, paper mode, same key for every config.

    python benchmarks/precision_utility.py --device cuda [--n-train 8000] [--n-test 2000] [--seeds 0 1 2 3 4]

Trains the owner's F on the first ``n-train`` MNIST images, veils them once per
config (the fp32 reference, then the fast configs: bf16 autocast, CUDA graph,
torch.compile), trains a third-party LeNet-5 on each veiled set for every seed,
and tests on the last ``n-test`` original images. The same seeds are used for
every config, so the differences to fp32 are paired. Also reports how far
each veil is from the fp32 veil (mean |diff| in grey levels, flip-sign
agreement on pixels with |x| > 0.5, F's argmax agreement with the originals).
The issue's bar: veiled-model accuracy on X within 0.5 points of the fp32 veil.

Writes benchmarks/results/precision_utility_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil_transforms import functional as F
from veil_transforms.data import mnist_split
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, predict

CONFIGS = {
    "fp32 (reference)": {},
    "fp32 + CUDA graph + compile": {"cuda_graph": True, "compile": True},
    "bf16 + CUDA graph": {"precision": "bf16", "cuda_graph": True},
    "bf16 + CUDA graph + compile": {"precision": "bf16", "cuda_graph": True, "compile": True},
}


def lenet(seed: int) -> LeNet5:
    torch.manual_seed(seed)  # same initial weights for every config: the comparison is paired
    return LeNet5()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS)[1:],
                    help="CUDA: fast configs to compare with fp32 (default: all)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the models trained on originals")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_flush_denormal(True)
    configs = CONFIGS if dev.type == "cuda" else {"fp32 (reference)": {}, "bf16": {"precision": "bf16"}}
    if args.configs and dev.type == "cuda":
        configs = {k: v for k, v in CONFIGS.items() if k == "fp32 (reference)" or k in args.configs}
    (xtr, ytr), (xte, yte) = mnist_split(args.n_train, args.n_test)
    owner = fit(lenet(1234), xtr, ytr, epochs=args.epochs, seed=1234, device=dev)
    baseline = [] if args.no_baseline else [
        accuracy(fit(lenet(s), xtr, ytr, epochs=args.epochs, seed=s, device=dev), xte, yte, device=dev) for s in args.seeds]
    if baseline:
        print(f"baseline {100 * np.mean(baseline):.2f} ± {100 * np.std(baseline):.2f}", flush=True)
    key = bytes(range(32))
    f_orig = predict(owner, xtr, device=dev)
    rows, ref = {}, None
    for label, opts in configs.items():
        t = time.perf_counter()
        try:
            v = F.veil(owner, xtr, key=key, device=dev, **opts).cpu()
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile missing a compiler: report, go on
            print(label, "FAILED:", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
            continue
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        accs = [accuracy(fit(lenet(s), v, ytr, epochs=args.epochs, seed=s, device=dev), xte, yte, device=dev) for s in args.seeds]
        row = {"veil_seconds_incl_warmup": secs, "acc_on_X": accs, "mean": float(np.mean(accs)), "sd": float(np.std(accs)),
               "F_agreement": float((predict(owner, v, device=dev) == f_orig).float().mean())}
        if ref is None:
            ref = (v, accs)
        else:
            d = (v.float() - ref[0].float()).abs()
            xn, a, b = F.normalize(xtr), F.normalize(ref[0]), F.normalize(v)
            big = xn.abs() > 0.5
            diffs = np.array(accs) - np.array(ref[1])
            row.update(mean_grey_diff=float(d.mean()), frac_pixels_off_by_more_than_1=float((d > 1).float().mean()),
                       sign_agreement=float((a.sign() == b.sign())[big].float().mean()),
                       paired_diff_mean=float(diffs.mean()), paired_diff_sd=float(diffs.std()))
        rows[label] = row
        print(label, json.dumps({k: v for k, v in row.items() if k != "acc_on_X"}), flush=True)
    cmd = "python benchmarks/precision_utility.py " + " ".join(sys.argv[1:] if argv is None else argv)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    data = {"command": cmd, "device": name, "torch": torch.__version__, **vars(args), "baseline": baseline, "configs": rows}
    (out / f"precision_utility_{dev.type}.json").write_text(json.dumps(data, indent=1))
    md = [f"# Speed options vs utility (MNIST {args.n_train}/{args.n_test}, LeNet-5, paper mode, lr {F.DEFAULT_LR}, "
          f"seeds {args.seeds}, on {name}, torch {torch.__version__})", "", f"Command: `{cmd}`", "",
          (f"Baseline (trained on originals): {100 * np.mean(baseline):.2f} ± {100 * np.std(baseline):.2f}%." if baseline
           else "Baseline not run (--no-baseline)."), "",
          "| veil config | veiled model on X | paired Δ vs fp32 (points) | mean \\|Δ\\| vs fp32 veil (grey levels) | "
          "pixels off by > 1 | flip-sign agreement | F agreement X~ vs X |",
          "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        pd = "–" if "paired_diff_mean" not in r else f"{100 * r['paired_diff_mean']:+.2f} ± {100 * r['paired_diff_sd']:.2f}"
        md.append(f"| {label} | {100 * r['mean']:.2f} ± {100 * r['sd']:.2f}% | {pd} | {r.get('mean_grey_diff', 0):.3f} | "
                  f"{100 * r.get('frac_pixels_off_by_more_than_1', 0):.2f}% | {100 * r.get('sign_agreement', 1):.2f}% | {100 * r['F_agreement']:.1f}% |")
    (out / f"precision_utility_{dev.type}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return data


if __name__ == "__main__":
    main()
