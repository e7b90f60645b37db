import pytest
import torch

from veil_transforms.data import load_lfw_faces, mnist_path
from veil_transforms.nets import LeNet5
from veil_transforms.training import fit

torch.set_flush_denormal(True)
THREADS = torch.get_num_threads()  # torch's default here, read before any test module is imported


@pytest.fixture(scope="module", autouse=True)
def _default_threads():
    """Each test module starts on torch's default thread count. A thread count set at a module's import
    (collection imports every module first) or by a module-scoped fixture outlives that module:
    test_audit's import and test_export's shards (veil-shard --threads 1 in-process, which did not
    restore it then) once left every later test, the MNIST veil among them, on one of two cores."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): on
    shared cores two OpenMP threads ran the small models there 3-60x slower than one."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def faces():
    """scikit-image's real LFW crops (ships with the dependency): uint8 [200, 1, 25, 25], labels."""
    return load_lfw_faces()


@pytest.fixture(scope="session")
def face_model(faces):
    """A LeNet-5 briefly trained on the faces, so logits are confident and the veil has work to do."""
    x, y = faces
    torch.manual_seed(0)
    return fit(LeNet5(1, 2), x, y, epochs=20, seed=0)


@pytest.fixture(scope="session")
def mnist():
    if mnist_path() is None:
        pytest.skip("../shared/data/mnist is absent")
    from veil_transforms.data import load_mnist

    return load_mnist()


def smooth_64px(n: int):
    """``n`` smooth 64x64 uint8 images (sines of a slow period): a flat image alone scores over SSIM 0.3
    against them (SSIM's 7x7 windows are matched by brightness), as do attacks on noise."""
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    return np.stack([(110 + 25 * np.sin(xx / 30 + i) + 25 * np.cos(yy / 33 - i)).clip(0, 255).astype(np.uint8)
                     for i in range(n)])
