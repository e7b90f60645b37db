"""Real data: the paper's claims on MNIST (../shared/data/mnist; skipped when absent).

The local model F is a LeNet-5 trained on the first 8,000 images. We veil the
first N_VEIL of them, train a fresh LeNet-5 on (X~, Y) and on (X, Y), and test
both on the last 2,000 original images (disjoint from training).
"""

import numpy as np
import pytest
import torch

from veil_transforms import VeilTransform
from veil_transforms.metrics import ssim
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, predict

N_VEIL = 3000
EPOCHS = 15


@pytest.fixture(scope="module")
def veiled_mnist(mnist):
    x, y = mnist
    xtr, ytr, xte, yte = x[:8000], y[:8000], x[8000:], y[8000:]
    local = fit(LeNet5(), xtr, ytr, epochs=10, seed=1234)
    veil = VeilTransform(local, key=b"mnist-test-key-0123456789abcdef!", device="cpu")
    xv = veil(xtr[:N_VEIL])
    return local, (xtr[:N_VEIL], ytr[:N_VEIL]), xv, (xte, yte)


def test_veiled_mnist_hides_pixels_and_keeps_local_features(veiled_mnist):
    local, (x, _), xv, _ = veiled_mnist
    assert xv.dtype == torch.uint8 and xv.shape == x.shape
    s = ssim(x, xv)
    assert s.mean() <= 0.05, s.mean()
    agree = float((predict(local, xv) == predict(local, x)).float().mean())
    assert agree >= 0.95, agree


def test_model_trained_on_veiled_mnist_classifies_originals(veiled_mnist):
    _, (x, y), xv, (xte, yte) = veiled_mnist
    base = accuracy(fit(LeNet5(), x, y, epochs=EPOCHS, seed=0), xte, yte)
    veiled = accuracy(fit(LeNet5(), xv, y, epochs=EPOCHS, seed=0), xte, yte)
    print(f"\nMNIST {N_VEIL} train / {len(xte)} test: baseline {base:.4f}, veiled-model on X {veiled:.4f}, gap {base - veiled:.4f}")
    assert veiled >= 0.80
    assert base - veiled <= 0.15
