"""Does rounding the veil to uint8 (PNG-safe, the default) cost utility? MNIST, LeNet-5, paper mode.

    python benchmarks/uint8_rounding.py [--n-train 3000] [--n-test 2000] [--seeds 0 1] [--device cpu]

Veils the same float images with the same key twice: ``output="float"`` (full
precision) and ``output="uint8"`` (snapped to 256 levels), trains a LeNet-5 on
each, and tests both on original images. Writes benchmarks/results/uint8_rounding.{md,json}.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from veil_transforms import VeilTransform
from veil_transforms.data import mnist_split
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, seeded

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--n-train", type=int, default=3000)
ap.add_argument("--n-test", type=int, default=2000)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
ap.add_argument("--epochs", type=int, default=15)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = ap.parse_args()
torch.set_flush_denormal(True)
(xtr, ytr), (xte, yte) = mnist_split(args.n_train, args.n_test)
F = fit(seeded(LeNet5, 1234), xtr, ytr, epochs=10, seed=1234, device=args.device)
key = bytes(range(32))
xf = xtr.float() / 255
res = {}
for output in ("float", "uint8"):
    v = VeilTransform(F, key=key, output=output, device=args.device)
    xv = torch.cat([v(xf[s : s + 1024]).cpu() for s in range(0, len(xf), 1024)])
    accs = [accuracy(fit(seeded(LeNet5, s), xv, ytr, epochs=args.epochs, seed=s, device=args.device), xte, yte, device=args.device) for s in args.seeds]
    res[output] = (float(np.mean(accs)), float(np.std(accs)))
    print(output, res[output], flush=True)
cmd = "python benchmarks/uint8_rounding.py " + " ".join(sys.argv[1:])
out = Path(__file__).parent / "results"
(out / "uint8_rounding.json").write_text(json.dumps({"command": cmd, **vars(args), "veiled_acc_on_X": res}, indent=1))
md = [f"# uint8 rounding of the veil (MNIST {args.n_train}/{args.n_test}, LeNet-5, paper mode, lr 0.1, seeds {args.seeds}, {args.device})", "",
      f"Command: `{cmd}`", "", "| output | veiled model on X (mean ± sd) |", "|---|---|"]
md += [f"| {k} | {100*m:.2f} ± {100*s:.2f}% |" for k, (m, s) in res.items()]
(out / "uint8_rounding.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
