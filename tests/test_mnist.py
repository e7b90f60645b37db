"""Real data: the paper's claims on MNIST (../shared/data/mnist; skipped when absent).

The local model F is a LeNet-5 trained on the first 8,000 images. We veil the
first N_VEIL of them, train a fresh LeNet-5 on (X~, Y) and on (X, Y), and test
both on the last 2,000 original images (disjoint from training).
"""

import warnings

import pytest
import torch

from veil_transforms import VeilTransform
from veil_transforms.metrics import ssim
from veil_transforms.nets import LeNet5
from veil_transforms.training import accuracy, fit, predict

N_VEIL = 3000
EPOCHS = 15


def lenet(seed: int) -> LeNet5:
    """A LeNet-5 with initial weights fixed by ``seed``: fit() seeds only the batch order, so an unseeded
    model came from whatever state the tests run before had left torch's global generator in (F's
    agreement on veiled images was 0.93 in the full suite, >= 0.95 alone)."""
    torch.manual_seed(seed)
    return LeNet5()


@pytest.fixture(scope="module")
def veiled_mnist(mnist):
    x, y = mnist
    xtr, ytr, xte, yte = x[:8000], y[:8000], x[8000:], y[8000:]
    local = fit(lenet(1234), xtr, ytr, epochs=10, seed=1234)
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


@pytest.fixture(scope="module")
def veiled_model_accuracy(veiled_mnist):
    """Accuracy on the original test images of a LeNet-5 trained on the fp32 veil (seed 0)."""
    _, (_, y), xv, (xte, yte) = veiled_mnist
    return accuracy(fit(lenet(0), xv, y, epochs=EPOCHS, seed=0), xte, yte)


def test_model_trained_on_veiled_mnist_classifies_originals(veiled_mnist, veiled_model_accuracy):
    _, (x, y), xv, (xte, yte) = veiled_mnist
    base = accuracy(fit(lenet(0), x, y, epochs=EPOCHS, seed=0), xte, yte)
    veiled = veiled_model_accuracy
    print(f"\nMNIST {N_VEIL} train / {len(xte)} test: baseline {base:.4f}, veiled-model on X {veiled:.4f}, gap {base - veiled:.4f}")
    assert veiled >= 0.80
    assert base - veiled <= 0.15


def test_fast_path_keeps_the_veil_and_its_utility(veiled_mnist, veiled_model_accuracy):
    """The result-preserving speed levers (torch.compile here; CUDA graphs are CUDA-only) on real data:
    the same veil up to rounding, the same local features, and the utility bar the fp32 veil meets.
    bf16 is not among them: it changes the veil (5 grey levels on average); its utility is measured over
    40 keys on a GPU instead (benchmarks/results/precision_utility_cuda_h100_keys40.md)."""
    local, (x, y), xv, (xte, yte) = veiled_mnist
    n = 500  # compiled veil on the CPU: ~70 s per 1,000 images here
    fast = VeilTransform(local, key=b"mnist-test-key-0123456789abcdef!", device="cpu", compile=True, fold_bn=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xf = fast(x[:n])
    if any("torch.compile failed" in str(w.message) for w in caught):
        pytest.skip("torch.compile cannot build here (inductor needs a C++ compiler on the CPU)")
    # Over 300 steps the loop amplifies the compiled kernels' different float rounding: measured here
    # 0.046-0.054 grey levels on average, 0.8-0.9% of pixels off by more than one level (H100, graph +
    # compile: 0.003 and 0.06%). The veil's own movement is ~60 levels, so 0.1 / 2% still means "the same veil".
    grey = (xf.float() - xv[:n].float()).abs()
    assert float(grey.mean()) <= 0.1 and float((grey > 1).float().mean()) <= 0.02, float(grey.mean())
    # what the veil must keep, measured without training's chaos: F sees the same classes
    agree = float((predict(local, xf) == predict(local, xv[:n])).float().mean())
    assert agree >= 0.99, agree
    # Utility. Training is chaotic: the same seed and initial weights on the fp32 veil and on this one
    # (rounding apart) land points apart (benchmarks/fastpath_training_noise.py,
    # results/fastpath_training_noise_*.md: paired differences SD 1.3 points with 1,000 training images,
    # SD 2.0 and -2.5 to +2.9 with 3,000; 10 and 4.3 when that benchmark's pairs started from different
    # weights). So a same-seed pair cannot show "within 0.5 points" (the GPU benchmark does, over 40 keys x
    # 3 seeds); the closeness and agreement above carry "the same veil". This asserts the bar the fp32
    # veil's own test asserts (>= 0.80 on the originals; measured 0.866-0.96 here) for a training set with
    # the fast veil in it, and a paired difference under 8 points (~4 SD): a utility loss, not rounding.
    mixed = torch.cat([xf, xv[n:]])
    ref = veiled_model_accuracy
    got = accuracy(fit(lenet(0), mixed, y, epochs=EPOCHS, seed=0), xte, yte)
    print(f"\nMNIST {len(xv)} veiled ({n} by the fast path), same seed: fp32 veil {ref:.4f}, with the fast path {got:.4f}")
    assert got >= 0.80 and abs(got - ref) <= 0.08, (got, ref)


def test_mnist_split_takes_the_last_images_for_testing():  # D1 D2
    from veil_transforms import data

    if data.mnist_path() is None:
        pytest.skip("no MNIST")
    x, y = data.load_mnist()
    (xtr, _), (xte, yte) = data.mnist_split(100, 50)
    assert torch.equal(xtr, x[:100]) and torch.equal(xte, x[-50:]) and torch.equal(yte, y[-50:])
    with pytest.raises(ValueError):
        data.mnist_split(len(x) - 5, 6)
