import pytest
import torch

from veil_transforms.data import load_lfw_faces, mnist_path
from veil_transforms.nets import LeNet5
from veil_transforms.training import fit

torch.set_flush_denormal(True)


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
