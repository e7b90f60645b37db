"""Reference architectures used by the demo, tests and benchmarks (no downloaded weights)."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 for any input size: conv1 -> conv2 -> fc1 -> fc2 -> fc3.

    Node names match the paper's layer ablation (Conv, Fc1, Fc2, Fc3 = logits).
    An adaptive pool before fc1 makes it accept any H, W >= 10 (28x28 MNIST,
    25x25 LFW crops, 112x92 ORL faces).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.AdaptiveMaxPool2d(5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build(arch: str, state_dict: dict | None = None) -> nn.Module:
    """``lenet5`` or a torchvision model name; sizes are inferred from ``state_dict``."""
    sd = state_dict or {}
    two_d = [v for v in sd.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
    num_classes = int(two_d[-1].shape[0]) if two_d else 10
    if arch.lower() in ("lenet5", "lenet-5", "lenet"):
        w = sd.get("conv1.weight")
        return LeNet5(int(w.shape[1]) if w is not None else 1, num_classes)
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ValueError(f"unknown architecture {arch!r}: use 'lenet5' or a torchvision model name") from e
