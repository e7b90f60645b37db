"""Loaders for the real data used by tests, benchmarks and the demo (nothing is downloaded)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

# tests and benchmarks look here (the repo's sibling shared/ folder) unless VEIL_DATA is set
DATA_DIR = Path(os.environ.get("VEIL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def mnist_path() -> Path | None:
    d = DATA_DIR / "mnist"
    ok = (d / "t10k-images-idx3-ubyte.gz").is_file() and (d / "t10k-labels-idx1-ubyte.gz").is_file()
    return d if ok else None


def load_mnist(directory: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set in idx format: uint8 images ``[N, 1, 28, 28]`` and int64 labels."""
    d = Path(directory) if directory is not None else mnist_path()
    if d is None:
        raise FileNotFoundError(
            f"MNIST not found: {DATA_DIR / 'mnist'} must hold t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (the repository's ../shared/data/mnist; set VEIL_DATA to the folder "
            "that contains mnist/)")
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def mnist_split(n_train: int = 8000, n_test: int = 2000):
    """First ``n_train`` for training, last ``n_test`` for testing (no overlap)."""
    x, y = load_mnist()
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test must be <= {len(x)}")
    return (x[:n_train], y[:n_train]), (x[len(x) - n_test :], y[len(y) - n_test :])


def load_lfw_faces(size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's LFW subset: 200 grey 25x25 crops, label 1 = face (first 100), 0 = not a face.

    Returns uint8 ``[200, 1, 25, 25]`` (or resized to ``size``) and int64 labels.
    """
    from skimage.data import lfw_subset

    a = lfw_subset()  # float [0, 1], (200, 25, 25)
    x = torch.from_numpy((a * 255).round().astype(np.uint8))[:, None]
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    y = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(len(a) - 100, dtype=torch.long)])
    return x, y
