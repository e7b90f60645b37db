"""How far apart two models trained with the same seed land when their training veils differ only by
float rounding: the fp32 veil against the compiled fast path (``compile=True, fold_bn=True``), on MNIST,
on the CPU. It sizes what a same-seed utility test can assert (tests/test_mnist.py).

    python benchmarks/fastpath_training_noise.py --train 1000 --fast 1000 --seeds 8
    python benchmarks/fastpath_training_noise.py --train 3000 --fast 1000 --seeds 6

F: LeNet-5 trained on MNIST test-set images 0-7,999 (seed 1234, 10 epochs), as in the tests. The
first ``--train`` images are veiled in fp32; the first ``--fast`` of them also by the fast path and
swapped in. For each seed, a LeNet-5 is trained (15 epochs) on each set and tested on images
8,000-9,999 (originals). Prints the veils' difference and the paired accuracies; writes
benchmarks/results/fastpath_training_noise_<train>.md. Needs ../shared/data/mnist.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from veil_transforms import VeilTransform  # noqa: E402
from veil_transforms.data import load_mnist, mnist_path  # noqa: E402
from veil_transforms.nets import LeNet5  # noqa: E402
from veil_transforms.training import accuracy, fit, seeded  # noqa: E402

KEY = b"mnist-test-key-0123456789abcdef!"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--fast", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    if mnist_path() is None:
        sys.exit("needs ../shared/data/mnist")
    if not 0 < args.fast <= args.train <= 8000:
        sys.exit("need 0 < --fast <= --train <= 8000")
    torch.set_flush_denormal(True)
    x, y = load_mnist()
    xtr, ytr, xte, yte = x[:8000], y[:8000], x[8000:], y[8000:]
    t = time.perf_counter()
    local = fit(seeded(LeNet5, 1234), xtr, ytr, epochs=10, seed=1234)
    xv = VeilTransform(local, key=KEY, device="cpu")(xtr[: args.train])
    xf = VeilTransform(local, key=KEY, device="cpu", compile=True, fold_bn=True)(xtr[: args.fast])
    grey = (xf.float() - xv[: args.fast].float()).abs()
    lines = [f"veils in {time.perf_counter() - t:.0f} s; fast vs fp32: {float(grey.mean()):.3f} grey levels on average, "
             f"{100 * float((grey > 1).float().mean()):.2f}% of pixels off by more than 1"]
    print(lines[-1], flush=True)
    mixed = torch.cat([xf, xv[args.fast :]])
    diffs = []
    for s in range(args.seeds):
        a = accuracy(fit(seeded(LeNet5, s), xv, ytr[: args.train], epochs=args.epochs, seed=s), xte, yte)
        b = accuracy(fit(seeded(LeNet5, s), mixed, ytr[: args.train], epochs=args.epochs, seed=s), xte, yte)
        diffs.append(b - a)
        lines.append(f"seed {s}: fp32 veil {a:.4f}, with the fast path {b:.4f}, paired difference {100 * (b - a):+.2f} points")
        print(lines[-1], flush=True)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    lines.append(f"paired differences: mean {100 * statistics.mean(diffs):+.2f}, SD {100 * sd:.2f}, "
                 f"range {100 * min(diffs):+.2f} to {100 * max(diffs):+.2f} points")
    print(lines[-1])
    cmd = "python benchmarks/fastpath_training_noise.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(__file__).resolve().parent / "results" / f"fastpath_training_noise_{args.train}.md"
    out.write_text(f"# Same seed, veils that differ by rounding: paired accuracy (CPU, torch {torch.__version__})\n\n"
                   f"Command: `{cmd}`\n\n{args.train} MNIST images veiled in fp32, the first {args.fast} of them "
                   f"by the compiled fast path instead; LeNet-5, {args.epochs} epochs, tested on 2,000 originals.\n\n"
                   + "\n".join(f"- {l}" for l in lines) + "\n")


if __name__ == "__main__":
    main()
