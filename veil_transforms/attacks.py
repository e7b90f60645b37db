"""Attacks on veiled images: pure functions, batched over ``[N, C, H, W]``.

Conventions (read these before mixing functions):

- **[-1, 1] domain** ("normalized"): what the veil works in, ``x = 2*y - 1``
  for a [0, 1] image ``y``. :func:`fold` and :func:`ssim_torch` (with
  ``value_range=(-1, 1)``) take tensors in this domain.
- **[0, 1] domain** ("image"): what people look at and what SSIM is computed
  on. The image-domain attacks (:func:`fold01`, the denoisers, :func:`sobel`,
  :func:`recover_signs`' output, :func:`learned_inverter`,
  :func:`logit_inversion`) return float arrays / tensors in [0, 1].
- Every function treats each sample (and, where flips are per value, each
  channel) independently; none modifies its input in place.

The attacker model for the cheap attacks is "no key, no model, no data": only
the veiled pixels. :func:`learned_inverter` adds public data and the veil's
public settings; :func:`logit_inversion` adds a model trained on veiled data.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Array = np.ndarray


# --------------------------------------------------------------------------- fold
def fold(x):
    """The fold attack in the **[-1, 1] domain**: ``2*|x| - 1`` (a torch tensor or numpy array).

    Random pixel flipping multiplies normalized pixels by ±1, so ``|x~| = |x|``
    right after flipping; ``|x|`` is in [0, 1] and is mapped back to [-1, 1]
    here so that the output lives in the same domain as the input. In the
    [0, 1] image domain the same map is :func:`fold01` (``|2y - 1|``):
    ``fold(2*y - 1) == 2*fold01(y) - 1``. Differentiable for tensors.
    """
    return 2 * abs(x) - 1


def fold01(y):
    """The fold attack in the **[0, 1] image domain**: ``|2*y - 1|`` (tensor or array).

    Mid-grey goes to 0, black and white to 1: a solarized image. Flipping a
    pixel (``y -> 1 - y``) leaves it unchanged, so ``fold01(RPF(y)) == fold01(y)``.
    """
    return abs(2 * y - 1)


# --------------------------------------------------------------------------- SSIM
def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    window: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Differentiable SSIM per sample: ``[B, C, H, W]`` x 2 -> ``[B]``.

    Gaussian ``window`` x ``window`` window (default 7x7, sigma 1.5), valid
    region only (no padding), K1 = 0.01, K2 = 0.03, averaged over channels and
    positions. Inputs in ``value_range`` are first mapped to [0, 1], so
    ``ssim_torch(a, b, value_range=(-1, 1)) == ssim_torch((a+1)/2, (b+1)/2)``:
    the score is always that of the [0, 1] images (SSIM is not shift-invariant,
    so the domain matters). The window shrinks (odd) for images smaller than it.

    Close to, but not identical with, scikit-image's default SSIM (uniform 7x7
    window, sample covariance), which the audit reports; use this one for
    training losses. Example for the fold term of a hardened objective::

        ssim_torch(fold(x_tilde), fold(x), value_range=(-1, 1))
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim_torch: expected two [B, C, H, W] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"ssim_torch: bad value_range {value_range}")
    a = (a - lo) / (hi - lo)
    b = (b - lo) / (hi - lo)
    win = min(window, a.shape[-2], a.shape[-1])
    win -= 1 - win % 2
    c = a.shape[1]
    w = _gaussian_window(win, sigma, a.device, a.dtype).expand(c, 1, win, win)
    conv = lambda t: torch.nn.functional.conv2d(t, w, groups=c)  # noqa: E731
    ma, mb = conv(a), conv(b)
    va = conv(a * a) - ma * ma
    vb = conv(b * b) - mb * mb
    cov = conv(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def ssim_batch(a: Array, b: Array) -> Array:
    """Per-sample SSIM of two ``[N, C, H, W]`` float batches in [0, 1] (numpy), data range 1.

    The same numbers as :func:`veil_transforms.metrics.ssim` (scikit-image's
    ``structural_similarity``: uniform 7x7 window, or the largest odd window
    that fits, sample covariance, border cropped, mean over channels), computed
    for the whole batch at once.
    """
    from scipy.ndimage import uniform_filter

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim_batch: expected two [N, C, H, W] arrays of one shape, got {a.shape}, {b.shape}")
    win = min(7, a.shape[2], a.shape[3])
    win -= 1 - win % 2
    size = (1, 1, win, win)
    f = lambda t: uniform_filter(t, size=size)  # noqa: E731
    np_ = win * win
    cov_norm = np_ / (np_ - 1) if np_ > 1 else 1.0
    ux, uy = f(a), f(b)
    vx = cov_norm * (f(a * a) - ux * ux)
    vy = cov_norm * (f(b * b) - uy * uy)
    vxy = cov_norm * (f(a * b) - ux * uy)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    p = (win - 1) // 2
    s = s[:, :, p : s.shape[2] - p, p : s.shape[3] - p]
    return s.reshape(len(s), s.shape[1], -1).mean(axis=2).mean(axis=1)


def psnr_batch(a: Array, b: Array) -> Array:
    """Per-sample PSNR in dB of two ``[N, ...]`` batches in [0, 1] (inf where equal up to rounding)."""
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(1)
    # below 1e-10 (100 dB) the difference is float rounding, far under one 8-bit level
    return np.where(mse < 1e-10, np.inf, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)))


# --------------------------------------------------------------------------- image-domain filters
# All take and return float64 numpy [N, C, H, W] in [0, 1], per image and channel.
def median3(y: Array) -> Array:
    """3x3 median filter per channel."""
    from scipy.ndimage import median_filter

    return median_filter(y, size=(1, 1, 3, 3), mode="reflect")


def gaussian(y: Array, sigma: float = 1.0) -> Array:
    """Gaussian blur per channel (sigma in pixels)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(y, sigma=(0, 0, sigma, sigma), mode="reflect")


def tv_denoise(y: Array, weight: float = 0.1) -> Array:
    """Total-variation denoising (scikit-image's Chambolle), per image, channels separately."""
    from skimage.restoration import denoise_tv_chambolle

    return np.stack([np.stack([denoise_tv_chambolle(ch, weight=weight) for ch in im]) for im in y])


def wavelet_available() -> bool:
    try:
        import pywt  # noqa: F401
    except ImportError:
        return False
    return True


def wavelet_denoise(y: Array) -> Array:
    """Wavelet (BayesShrink, soft) denoising per image and channel; needs PyWavelets."""
    from skimage.restoration import denoise_wavelet

    return np.stack(
        [np.stack([np.clip(denoise_wavelet(ch, rescale_sigma=True), 0, 1) for ch in im]) for im in y]
    )


def contrast_stretch(y: Array, lo: float = 2.0, hi: float = 98.0) -> Array:
    """Rescale each image and channel so its ``lo``..``hi`` percentiles span [0, 1] (clipped)."""
    p = np.percentile(y, [lo, hi], axis=(2, 3), keepdims=True)
    span = np.maximum(p[1] - p[0], 1e-6)
    return np.clip((y - p[0]) / span, 0, 1)


def sobel(y: Array) -> Array:
    """Sobel gradient magnitude per channel, scaled so each image's maximum is 1 (0 if flat)."""
    p = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    H, W = y.shape[2], y.shape[3]
    s = lambda dr, dc: p[:, :, 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = np.hypot(gx, gy)
    mx = mag.reshape(len(mag), -1).max(1).reshape(-1, 1, 1, 1)
    return np.where(mx > 0, mag / np.maximum(mx, 1e-12), 0.0)


# --------------------------------------------------------------------------- sign recovery
def _curvature_energy(v: Array) -> Array:
    """Sum of squared second differences along rows and columns, per 2D image ``[..., H, W]``."""
    e = np.zeros(v.shape[:-2])
    if v.shape[-1] >= 3:
        e = e + ((v[..., :, :-2] - 2 * v[..., :, 1:-1] + v[..., :, 2:]) ** 2).sum((-2, -1))
    if v.shape[-2] >= 3:
        e = e + ((v[..., :-2, :] - 2 * v[..., 1:-1, :] + v[..., 2:, :]) ** 2).sum((-2, -1))
    return e


def _flip_gain(v: Array) -> Array:
    """For each pixel p, ``G_p = sum_t c_t L_t`` over the second-difference triples t that contain it,
    where ``c_t`` is p's coefficient in t (-2 in the middle, 1 at an end) and ``L_t`` the rest of t.
    Then ``E(v_p = +m) - E(v_p = -m) = 4 m G_p``, the curvature energy's change when p's sign flips."""
    g = np.zeros_like(v)
    if v.shape[-1] >= 3:
        g[..., :, 1:-1] -= 2 * (v[..., :, :-2] + v[..., :, 2:])
        g[..., :, :-2] += v[..., :, 2:] - 2 * v[..., :, 1:-1]
        g[..., :, 2:] += v[..., :, :-2] - 2 * v[..., :, 1:-1]
    if v.shape[-2] >= 3:
        g[..., 1:-1, :] -= 2 * (v[..., :-2, :] + v[..., 2:, :])
        g[..., :-2, :] += v[..., 2:, :] - 2 * v[..., 1:-1, :]
        g[..., 2:, :] += v[..., :-2, :] - 2 * v[..., 1:-1, :]
    return g


def _icm_pixels(s: Array, m: Array, sweeps: int) -> Array:
    """Single-pixel ICM on the curvature energy, vectorized over a 3x3 colouring.

    Pixels whose row and column agree mod 3 share no second-difference triple,
    so each of the 9 classes is updated at once, exactly: a pixel takes the
    sign of lower energy, from the energy change :func:`_flip_gain` gives (one
    pass per class; two full energy maps before, the same signs at half the time).
    """
    H, W = m.shape[-2:]
    rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    classes = [(rr % 3 == a) & (cc % 3 == b) for a in range(3) for b in range(3)]
    for _ in range(sweeps):
        changed = False
        for cls in classes:
            d = 4 * m * _flip_gain(s * m)  # E(+) - E(-) at each pixel
            new = np.where(cls, np.where(d > 1e-12, -1.0, np.where(d < -1e-12, 1.0, s)), s)
            changed |= bool((new != s).any())
            s = new
        if not changed:
            break
    return s


def _regions(m2d: Array, threshold: float, min_size: int) -> tuple[Array, int]:
    """Regions of one 2D magnitude image, labelled by size rank (1 = largest), covering every pixel.

    Seeds are the connected components (4-neighbours) of ``m > threshold`` with
    at least ``min_size`` pixels; a watershed on ``-m`` grows them until they
    meet at the bottoms of the valleys of ``m``, where a smooth image's zero
    crossings lie. Returns the label image and the number of regions.
    """
    from scipy.ndimage import label
    from skimage.segmentation import watershed

    lab, n = label(m2d > threshold)
    if n == 0:
        return np.zeros(m2d.shape, dtype=np.int64), 0
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_size)
    if len(keep) == 0:
        return np.zeros(m2d.shape, dtype=np.int64), 0
    remap = np.zeros(n + 1, dtype=np.int64)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    lab = watershed(-m2d, markers=remap[lab], connectivity=1)
    sizes = np.bincount(lab.ravel(), minlength=len(keep) + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    rank = np.zeros(len(keep) + 1, dtype=np.int64)
    rank[order + 1] = np.arange(1, len(keep) + 1)
    return rank[lab], len(keep)


def recover_signs(
    magnitudes: Array,
    *,
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.3),
    min_region: int = 3,
    rounds: int = 2,
    sweeps: int = 4,
    max_regions: int = 64,
) -> Array:
    """Sign recovery by smoothness: choose signs ``s`` so that ``s * m`` is smooth.

    ``magnitudes`` ``m`` is ``[N, C, H, W]`` in [0, 1]: the magnitudes of the
    normalized pixels (``|x~|`` for x~ in [-1, 1], i.e. ``fold01`` of the [0, 1]
    veiled image). Returns ``v = s * m`` in the **[-1, 1] domain**; ``-v`` is the
    other global sign (the attacker cannot tell them apart without a look).
    Each channel is solved on its own (flips are per value).

    Objective: the curvature energy ``sum (v[i-1] - 2 v[i] + v[i+1])^2`` along
    rows and columns. A first-order smoothness (total variation) would not do:
    ``||a| - |b|| <= |a - b|``, so the all-positive fold is always a global
    minimizer of TV. Curvature instead penalizes the V-shaped kink that folding
    puts at every smooth zero crossing. Solver: signs start at +1. Regions
    are seeded where ``m > t`` (connected, at least ``min_region`` pixels) and
    grown by a watershed to the bottoms of the valleys of ``m``; each region
    (largest first, at most ``max_regions``) is flipped whole when that lowers
    the energy, then single pixels are flipped by ICM (``sweeps``). This is
    repeated ``rounds`` times, for each threshold ``t``, keeping per image the
    lowest-energy result. Colour channels are then given the relative signs
    that make them correlate positively with the first channel.
    """
    m = np.asarray(magnitudes, dtype=np.float64)
    if m.ndim != 4:
        raise ValueError(f"recover_signs: expected [N, C, H, W], got shape {m.shape}")
    N, C, H, W = m.shape
    flat = m.reshape(N * C, H, W)
    best_v = flat.copy()
    best_e = _curvature_energy(best_v)
    for t in thresholds:
        labels = np.zeros(flat.shape, dtype=np.int64)
        counts = np.zeros(len(flat), dtype=np.int64)
        for i in range(len(flat)):
            labels[i], counts[i] = _regions(flat[i], t, min_region)
        K = int(min(counts.max(initial=0), max_regions))
        s = np.ones_like(flat)
        for _ in range(rounds):
            for k in range(1, K + 1):
                region = labels == k
                has = region.any(axis=(1, 2))
                if not has.any():
                    continue
                e0 = _curvature_energy(s * flat)
                s_try = np.where(region, -s, s)
                e1 = _curvature_energy(s_try * flat)
                flip = has & (e1 < e0 - 1e-12)
                s = np.where(flip[:, None, None], s_try, s)
            s = _icm_pixels(s, flat, sweeps)
        v = s * flat
        e = _curvature_energy(v)
        better = e < best_e
        best_v[better], best_e[better] = v[better], e[better]
    # Fix the relative sign of colour channels (natural images' channels correlate positively);
    # the global sign stays ambiguous.
    out = best_v.reshape(N, C, H, W)
    for c in range(1, C):
        corr = (out[:, c] * out[:, 0]).reshape(N, -1).sum(1)
        out[:, c] *= np.where(corr < 0, -1.0, 1.0)[:, None, None]
    return out


# --------------------------------------------------------------------------- learned inverter
class UNet(nn.Module):
    """A small 2-level U-Net: ``[B, in_ch, H, W]`` -> ``[B, out_ch, H, W]``, images in [0, 1].

    Any H, W (skip connections are resized to match, so odd sizes work). The
    head is linear (plus 0.5) while training, clamped to [0, 1] in eval mode: a
    sigmoid saturates on mostly-black targets such as MNIST and the net dies
    into a constant black output.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int = 16):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(o, o, 3, padding=1), nn.ReLU(inplace=True))

        w = width
        self.enc1, self.enc2, self.mid = block(in_ch, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.Conv2d(4 * w, 2 * w, 1), block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.Conv2d(2 * w, w, 1), block(2 * w, w)
        self.head = nn.Conv2d(w, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = lambda t, like: nn.functional.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(nn.functional.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([self.up2(up(m, e2)), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(up(d2, e1)), e1], 1))
        out = self.head(d1) + 0.5
        return out if self.training else out.clamp(0, 1)


def _as_float01(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float()


def _inverter_input(veiled01: torch.Tensor) -> torch.Tensor:
    """The U-Net sees the normalized veiled image and its magnitude (the fold) as channels."""
    xn = 2 * veiled01 - 1
    return torch.cat([xn, xn.abs()], 1)


def train_inverter(
    inputs,
    targets,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 16,
    ssim_weight: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> UNet:
    """Train a :class:`UNet` from ``inputs`` (veiled) to ``targets`` (originals).

    Both are ``[N, C, H, W]`` uint8 or [0, 1] float. Loss: L1 + ``ssim_weight``
    * (1 - SSIM) (:func:`ssim_torch`), Adam with cosine decay, random flips of
    both as augmentation. Returns the model in eval mode.
    """
    xin, tgt = _as_float01(inputs), _as_float01(targets)
    if xin.shape != tgt.shape or xin.ndim != 4:
        raise ValueError(f"train_inverter: inputs {tuple(xin.shape)} and targets {tuple(tgt.shape)} must be one [N, C, H, W] shape")
    from .training import seeded

    g = torch.Generator().manual_seed(seed)
    net = seeded(lambda: UNet(2 * xin.shape[1], xin.shape[1], width), seed).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(xin) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xin), generator=g)
        for s in range(0, len(xin), batch_size):
            idx = perm[s : s + batch_size]
            xb, yb = xin[idx].to(device), tgt[idx].to(device)
            if torch.rand((), generator=g) < 0.5:  # horizontal flip: the veil is equivariant to it
                xb, yb = xb.flip(-1), yb.flip(-1)
            out = net(_inverter_input(xb))
            loss = (out - yb).abs().mean()
            if ssim_weight:
                loss = loss + ssim_weight * (1 - ssim_torch(out, yb)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def apply_inverter(net: nn.Module, veiled, *, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Run a trained inverter on ``[N, C, H, W]`` veiled images; returns float [0, 1] on the CPU."""
    v = _as_float01(veiled)
    net = net.to(device).eval()
    return torch.cat([net(_inverter_input(v[s : s + batch_size].to(device))).cpu() for s in range(0, len(v), batch_size)])


def learned_inverter(
    public_images,
    public_labels,
    victim_veiled,
    *,
    veil_kwargs: dict | None = None,
    make_model: Callable[[], nn.Module],
    epochs: int = 10,
    unet_epochs: int = 30,
    key: bytes | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    return_info: bool = False,
):
    """The adaptive attacker: knows the algorithm and its settings, not the key, model or images.

    1. train a surrogate local model (``make_model()``) on the public data
       (:func:`veil_transforms.training.fit`, ``epochs``);
    2. veil the public images with this library under the attacker's own
       random key (``VeilTransform(surrogate, key=key, **veil_kwargs)``);
    3. train a :class:`UNet` from veiled public images to the originals;
    4. apply it to the victim's veiled images.

    ``public_images`` / ``victim_veiled``: ``[N, C, H, W]`` uint8 (or [0, 1]
    float); the public data must be disjoint from the victim's. Returns the
    reconstructions (float [0, 1] tensor), and with ``return_info`` also a dict
    (the inverter, the veiled public images, timings).
    """
    import time

    from .training import fit, seeded
    from .transform import VeilTransform

    pub = torch.as_tensor(np.asarray(public_images)) if not isinstance(public_images, torch.Tensor) else public_images
    lab = torch.as_tensor(np.asarray(public_labels)) if not isinstance(public_labels, torch.Tensor) else public_labels
    t0 = time.perf_counter()
    surrogate = fit(seeded(make_model, seed), pub, lab.long(), epochs=epochs, seed=seed, device=device)
    t1 = time.perf_counter()
    veil = VeilTransform(surrogate, key=key, device=device, **(veil_kwargs or {}))
    pub_veiled = torch.cat([veil.veil_batch(pub[s : s + 1024]).cpu() for s in range(0, len(pub), 1024)])
    t2 = time.perf_counter()
    net = train_inverter(pub_veiled, pub, epochs=unet_epochs, seed=seed, device=device)
    t3 = time.perf_counter()
    out = apply_inverter(net, victim_veiled, device=device)
    if return_info:
        info = dict(
            inverter=net, public_veiled=pub_veiled, surrogate=surrogate,
            seconds=dict(surrogate=t1 - t0, veil_public=t2 - t1, unet=t3 - t2, apply=time.perf_counter() - t3),
        )
        return out, info
    return out


# --------------------------------------------------------------------------- logit-matching inversion
def _tv(z: torch.Tensor) -> torch.Tensor:
    return (z[..., 1:, :] - z[..., :-1, :]).abs().flatten(1).mean(1) + (z[..., :, 1:] - z[..., :, :-1]).abs().flatten(1).mean(1)


def logit_inversion(
    model: Callable[[torch.Tensor], torch.Tensor],
    veiled,
    *,
    steps: int = 150,
    lr: float = 0.05,
    tv_weight: float = 0.05,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Model inversion: find images whose outputs under ``model`` match those of the veiled images.

    ``model`` takes normalized [-1, 1] input (as models trained with
    :func:`veil_transforms.training.fit` do). Starting from mid-grey plus a
    little fixed noise (sd 0.1: from exactly mid-grey, a model whose first
    ReLUs are all off at 0 gives z no gradient, and the attack never moved on
    such models), Adam minimizes ``mean (M(z) - M(x~))^2 + tv_weight * TV(z)``
    for ``steps`` steps, with z clamped to [-1, 1]. Returns float [0, 1]
    images on the CPU.
    """
    from .model import frozen

    v = _as_float01(veiled)
    outs = []
    with torch.enable_grad(), frozen(model):
        for s in range(0, len(v), batch_size):
            xt = (2 * v[s : s + batch_size] - 1).to(device)
            with torch.no_grad():
                target = model(xt)
            g = torch.Generator().manual_seed(s)  # the same start for a sample whatever the device
            z = (0.1 * torch.randn(xt.shape, generator=g)).clamp_(-1, 1).to(device).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                loss = ((model(z) - target) ** 2).flatten(1).mean(1) + tv_weight * _tv(z)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                with torch.no_grad():
                    z.clamp_(-1, 1)
            outs.append(((z.detach() + 1) / 2).cpu())
    return torch.cat(outs)
