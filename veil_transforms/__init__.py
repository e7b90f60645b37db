"""veil_transforms: veil images for third-party training (Veil Privacy), measured against real attacks."""

from .dataset import VeiledDataset, VeiledIterableDataset
from .keys import new_key
from .model import LocalModel
from .transform import VeilTransform

__version__ = "0.1.0"

__all__ = ["VeilTransform", "VeiledDataset", "VeiledIterableDataset", "LocalModel", "new_key", "__version__"]
