"""Sweep the gradient-iteration step size on MNIST / LeNet-5 (paper mode) to choose DEFAULT_LR.

    python benchmarks/lr_sweep.py [--n-train 8000] [--n-test 2000] [--lrs 0.01 0.03 0.1 0.3] [--seeds 0 1]

Writes benchmarks/results/lr_sweep.{md,json}.
"""

import argparse
import json
from pathlib import Path

import torch

from veil_transforms.data import mnist_split
from veil_transforms.nets import LeNet5
from veil_transforms.training import utility_experiment

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--n-train", type=int, default=8000)
ap.add_argument("--n-test", type=int, default=2000)
ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
ap.add_argument("--epochs", type=int, default=15)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = ap.parse_args()
dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
torch.set_flush_denormal(True)
try:
    train, test = mnist_split(args.n_train, args.n_test)
except FileNotFoundError as e:  # no MNIST here: say so in one line
    raise SystemExit(f"{Path(__file__).name}: {e}") from None
from veil_transforms.training import fit, seeded

F = fit(seeded(LeNet5, 1234), *train, epochs=args.epochs, seed=1234, device=args.device)
rows = []
for lr in args.lrs:
    r = utility_experiment(LeNet5, train, test, local_model=F, veil_kwargs={"lr": lr}, epochs=args.epochs, seeds=args.seeds, device=args.device)
    r = {k: v for k, v in r.items() if k not in ("veiled_train", "local_model")}
    r["lr"] = lr
    rows.append(r)
    print(json.dumps(r), flush=True)
out = Path(__file__).parent / "results"
out.mkdir(exist_ok=True)
(out / "lr_sweep.json").write_text(json.dumps(rows, indent=1))
lines = [
    f"# GIA step size sweep, MNIST {args.n_train}/{args.n_test}, LeNet-5, paper mode, seeds {args.seeds}, on {dev_name}",
    "", "Command: `python benchmarks/lr_sweep.py " + " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()) + "`", "",
    "| lr | baseline acc (X) | veiled model on X~ | veiled model on X | SSIM(X, X~) mean | F agreement | veil s |",
    "|---|---|---|---|---|---|---|",
]
for r in rows:
    f = lambda m: f"{100*m[0]:.2f} ± {100*m[1]:.2f}%"  # noqa: E731
    lines.append(f"| {r['lr']} | {f(r['baseline_acc'])} | {f(r['veiled_acc_on_Xv'])} | {f(r['veiled_acc_on_X'])} | {r['ssim_mean']:.4f} | {100*r['agreement']:.1f}% | {r['veil_seconds']:.0f} |")
(out / "lr_sweep.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
