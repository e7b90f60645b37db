"""veil_transforms: veil images for third-party training (Veil Privacy), measured against real attacks."""

import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562), so a process that needs only part of the library (veil-shard's
# I/O processes: decoding, key hashing, PNG encoding) starts without torch and torchvision.
_EXPORTS = {
    "VeilTransform": "transform", "VeiledDataset": "dataset", "VeiledIterableDataset": "dataset",
    "LocalModel": "model", "new_key": "keys",
}

__all__ = ["VeilTransform", "VeiledDataset", "VeiledIterableDataset", "LocalModel", "new_key", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule (veil_transforms.functional after `import veil_transforms`)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
