"""Image similarity measures (scikit-image's SSIM, PSNR) over batches of uint8 images."""

from __future__ import annotations

import numpy as np
import torch


def _hwc(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.ndim == 3:  # C, H, W -> H, W, C
        a = a.transpose(1, 2, 0)
    return a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)


def ssim(a, b) -> np.ndarray:
    """Per-image SSIM between two batches ``[N, C, H, W]`` (uint8 or [0, 1] float); data range 1.

    Uses scikit-image's ``structural_similarity`` (7x7 window, or smaller for tiny images).
    """
    from skimage.metrics import structural_similarity

    if len(a) != len(b):
        raise ValueError(f"ssim: batches differ in length ({len(a)} vs {len(b)})")
    out = []
    for x, y in zip(a, b):
        x, y = _hwc(x), _hwc(y)
        win = min(7, x.shape[0], x.shape[1])
        win -= 1 - win % 2  # odd
        out.append(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=win))
    return np.asarray(out)


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR (dB) between two batches, data range 1."""
    if len(a) != len(b):
        raise ValueError(f"psnr: batches differ in length ({len(a)} vs {len(b)})")
    out = []
    for x, y in zip(a, b):
        mse = float(np.mean((_hwc(x) - _hwc(y)) ** 2))
        out.append(float("inf") if mse == 0 else 10 * np.log10(1.0 / mse))
    return np.asarray(out)
