"""The ``"hardened"`` veil mode: a keyed one-time pad instead of sign flips.

Why: the paper's start ``x * m`` (``m = +-1``) keeps ``|x|``, so
``fold(x~) = |2 x~ - 1|`` shows the image (../shared/FINDINGS.md, the project brief's measurements). Penalising the fold's
SSIM inside the gradient iteration hides it from that one attack but leaves
``x~`` a function of ``x`` that the next attack may undo.

What: the hardened mode starts from a *one-time pad*,

    x0 = ((x + 1 + 2 u) mod 2) - 1,        u ~ U[0, 1)^(C x H x W),

with ``u`` a SHAKE-256 stream derived from the sample's secret flip mask
(itself derived from the key and the image, :mod:`veil_transforms.keys`). For
any ``x``, ``x0`` is uniform on ``[-1, 1)`` and independent of ``x``. The
gradient iteration then runs the paper's SGD on ``alpha * ||F(x~) - F(x)||_1``
alone, unclamped, with the paper's per-sample early stop. The paper's
``- beta * ||x~ - x||_2`` term is dropped: its gradient ``(x~ - x) / ||x~ - x||``
is the only place where the pixels of ``x`` would enter the update.

So ``x~`` depends on ``x`` only through ``F(x)`` (the target logits) and the
pad: without the key, no attack (fold, denoising, sign recovery, a learned
inverter) can recover more of ``x`` than ``F(x)`` itself reveals, whatever
attack is tried later. What ``F(x)`` reveals is mostly the class, which the
third party holds anyway as the label.

Per-sample independence: the pad is a function of the sample's own mask bits,
every loss term is per sample and the early stop is per sample, so veiling a
batch equals veiling each sample alone (up to float rounding in
batch-size-dependent kernels) and the same key + image gives the same veil.

Recipe: several veils per image, each with fewer steps, beat one long veil at
the same number of steps: 4 veils of 75 steps (keys from :func:`copy_keys`) take
the 300 steps of one paper veil per original image (measured time per image,
``frontier.md``: 0.98x the paper veil's on LFW; on MNIST 1.47x there and 0.86x in
``frontier_mnist_inversion_fix.md``, CPU times that move +-30% between settings). The third party should train
with Gaussian input noise (:func:`noise_augment`, sigma 0.6 on the [-1, 1]
scale) and twice the usual epochs. Measured in ``benchmarks/frontier.py``
(reduced CPU run, LeNet-5, accuracy on original test images): MNIST 2000/1000
94.3 +- 0.5% against a 96.6 +- 0.5% baseline (paper mode, lr 0.1: 90.8 +- 0.5%);
LFW 140/60 86.7 +- 4.3% against 95.0 +- 1.1% (paper: 69.3 +- 8.6%). The goal of
"within 1 point" is not reached (an earlier run, before later code and key
changes: MNIST 93.3, LFW 92.3).

Design notes (MNIST 2000/1000, LeNet-5, third party trained 15 epochs without
augmentation, accuracy on original test images; paper mode 85-88% there, baseline 96%):
Adam + clamp + an SSIM(|x~|, |x|) penalty (the objective ../shared/FINDINGS.md describes)
hides the fold but gave 71%; Adam from the pad 79%; matching fc1/fc2 features
as well 71 +- 11%; expectation over shifts or input noise 60% / 74%; a 3x
logit target 70%; a half-amplitude pad 75%; clamping x~ to [-1, 1] every step
82% against 86% unclamped. Plain SGD from the pad, unclamped, is what remains.
The third party's recipe mattered more than any of these: input noise
(sigma 0.6) and 2x epochs add 5-16 points on veiled data of either mode.

Importing this module registers ``MODES["hardened"]``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch

from .keys import pad_uniforms_np


# Recommended third-party recipe for hardened veils (measured in benchmarks/frontier.py).
NOISE_SIGMA = 0.6
EPOCH_FACTOR = 2


# The pad is derived from the flip bits alone (so that veil-shard's I/O workers can derive it ahead
# from the key's uniforms): its secret is those bits' min-entropy, n * log2(1 / max(p, 1 - p)) for n
# pixels not 0. At p far from 0.5 the bits are nearly all 0 (or 1) and a third party can guess the
# pad and undo it: a red-team run recovered LFW faces at p = 1e-6 (SSIM 0.65, 86% re-identified) and
# at p = 0.002 by trying all patterns of <= 2 flips; veil-export's gate passed both. Refused below:
MIN_PAD_BITS = 80


def pad_secret_bits(p: float, pixels: int) -> float:
    """Min-entropy (bits) of one sample's flip bits: what an attacker must guess to know its pad."""
    return pixels * -math.log2(max(p, 1.0 - p))


class WeakPadError(ValueError):
    """A hardened veil refused because sample ``sample`` of its batch carries too few flip bits."""

    def __init__(self, message: str, sample: int):
        super().__init__(message)
        self.sample = sample


def check_pad_secret(p: float, x: torch.Tensor) -> None:
    """Refuse a hardened veil whose pad a third party could guess: fewer than :data:`MIN_PAD_BITS`
    bits of secret in some sample's flip bits (``x`` normalized, pixels at 0 carry no bit)."""
    if not len(x):
        return
    counts = (x != 0).flatten(1).sum(1)
    i = int(counts.argmin())
    pixels = int(counts[i])
    bits = pad_secret_bits(p, pixels)
    if bits < MIN_PAD_BITS:
        raise WeakPadError(
            f"mode='hardened': with p={p:g} the flip bits of sample {i} ({pixels} of its "
            f"{x[i].numel()} values not exactly mid-grey) carry {bits:.1f} bits of secret, fewer than "
            f"{MIN_PAD_BITS}, and its one-time pad is derived from them: a third party could guess the pad and "
            "undo it; use p near 0.5 (the default), and images of more than 80 values that are not blank mid-grey", i)


def flip_mask(x_start: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The secret flip mask (``True`` = flipped) behind ``x_start = x * m``.

    Where ``x == 0`` the flip is invisible and the bit reads ``False``.
    """
    return (x_start * x) < 0


def pad_uniforms(x_start: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample uniforms in [0, 1] (1.0 about once in 2^25, the same as 0 here), same shape as
    ``x``, from each sample's own mask bits.

    ``u_i = SHAKE-256(tag || shape || packbits(mask_i))`` read as little-endian
    uint32 / 2^32. The mask bits are a keyed pseudo-random stream, so ``u`` is
    secret without the key; and ``u_i`` depends on sample ``i`` only.
    """
    bits = flip_mask(x_start, x).to("cpu").numpy()
    return torch.from_numpy(pad_uniforms_np(bits)).to(device=x.device, dtype=x.dtype)


def one_time_pad(x_start: torch.Tensor, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The hardened start ``((x + 1 + 2u) mod 2) - 1``: uniform on [-1, 1), independent of ``x``.

    ``pad``: :func:`pad_uniforms` of these samples if derived ahead (``veil-shard`` does it in its
    I/O workers from the key's uniforms: ``keys.pad_uniforms_np((u < p) & (x != 0))``)."""
    if pad is None:
        u = pad_uniforms(x_start, x)
    else:
        if not isinstance(pad, torch.Tensor):
            raise TypeError(f"pad: expected a tensor, got {type(pad).__name__}")
        if pad.shape != x.shape:
            raise ValueError(f"pad has shape {tuple(pad.shape)}, x has {tuple(x.shape)}")
        u = pad.to(device=x.device, dtype=x.dtype)
    return torch.remainder(x + 1 + 2 * u, 2.0) - 1


def hardened_iteration(
    model: Callable[[torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    x: torch.Tensor,
    *,
    alpha: float = 0.999,
    beta: float = 0.001,
    lr: float = 0.1,
    steps: int = 300,
    threshold: float = 0.3,
    return_stats: bool = False,
    precision: str = "fp32",
    cuda_graph: bool = False,
    compile: bool = False,
    pad: torch.Tensor | None = None,
):
    """Gradient iteration of the hardened mode (same signature as ``functional.gradient_iteration``).

    ``x_start`` is the key-flipped image ``x * m`` and ``x`` the original, both
    normalized ``[B, C, H, W]``. Starts from :func:`one_time_pad`, then runs the
    library's gradient iteration on ``alpha * ||F(x~) - F(x)||_1`` alone
    (``beta`` is accepted for signature compatibility and replaced by 0, see
    the module docstring): same per-sample early stop, compaction and speed
    options (``precision``, ``cuda_graph``, ``compile``) as the paper mode. ``pad``: the pad's
    uniforms if derived ahead (see :func:`one_time_pad`).
    """
    if x_start.shape != x.shape:
        raise ValueError(f"x_start {tuple(x_start.shape)} and x {tuple(x.shape)} differ in shape")
    from .functional import gradient_iteration

    del beta
    return gradient_iteration(
        model, one_time_pad(x_start, x, pad), x, alpha=alpha, beta=0.0, lr=lr, steps=steps,
        threshold=threshold, return_stats=return_stats, precision=precision, cuda_graph=cuda_graph,
        compile=compile,
    )


def copy_keys(key: bytes, k: int) -> list[bytes]:
    """``k`` independent 32-byte keys derived from ``key``, one per veiled copy of the data set.

    Copy ``i`` is ``HMAC-SHA256(key, "veil-hardened-copy" || i)``; veil the data once per key
    (e.g. one ``VeilTransform(F, key=kk, mode="hardened", steps=75)`` per ``kk``; ``veil-shard
    --copies k`` does this into one set of shards).
    """
    import hmac

    from .functional import is_int
    from .keys import as_key

    key = as_key(key)
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return [hmac.new(key, b"veil-hardened-copy" + i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(k)]


def noise_augment(sigma: float = NOISE_SIGMA) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Third-party training augmentation for hardened veils: ``x + sigma * N(0, 1)`` on [-1, 1] inputs.

    Returns an ``augment(x, generator)`` callable for :func:`veil_transforms.training.fit`.
    """
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")

    def augment(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return xb + sigma * torch.randn(xb.shape, generator=g).to(xb)

    return augment


def _register() -> None:
    from . import functional

    functional.MODES.setdefault("hardened", hardened_iteration)


_register()
