"""How much of gradient iteration's progress survives the conversion to an image?

    python benchmarks/clamp_gap.py [--n 512]

The loop optimises x~ without bounds; the delivered veil is x~ clamped to
[-1, 1] and rounded to uint8. This prints Eq. (2)'s loss (fp32) for the
flipped start, the unclamped x~ and the delivered uint8 veil, the fraction of
values outside [-1, 1], and F's argmax agreement with the originals. MNIST
(the first 8,000 images train F, LeNet-5, 15 epochs; the first ``--n`` are
veiled with the paper's settings). Needs ../shared/data/mnist. CPU, about 2 min.
"""

from __future__ import annotations

import argparse

import torch

from veil_transforms import functional as F
from veil_transforms.data import mnist_split
from veil_transforms.nets import LeNet5
from veil_transforms.training import fit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    (xtr, ytr), _ = mnist_split(8000, 2000)
    torch.manual_seed(1234)
    owner = fit(LeNet5(), xtr, ytr, epochs=15, seed=1234)
    x = F.normalize(xtr[: args.n])
    start = F.random_pixel_flip(x, uniform=F.keyed_uniforms(bytes(range(32)), x))
    with torch.no_grad():
        target = owner(x)
    xt = F.gradient_iteration(owner, start, x)
    delivered = F.normalize(F.denormalize(xt))
    with torch.no_grad():
        for name, z in (("flipped start", start), ("x~ unclamped", xt), ("delivered uint8 veil", delivered)):
            loss = F.paper_loss(owner(z), target, z, x, F.PAPER["alpha"], F.PAPER["beta"]).mean()
            agree = (owner(z).argmax(1) == target.argmax(1)).float().mean()
            print(f"{name:22s} Eq.2 loss {loss:7.2f}   F argmax agreement {100 * agree:5.1f}%")
    print(f"values of x~ outside [-1, 1]: {100 * (xt.abs() > 1).float().mean():.1f}%")


if __name__ == "__main__":
    main()
