"""Models of the experiment runner: an MLP, the small ConvNet (BaseNet), and the three-layer DAN."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from ..nn import DAN as _DAN

__all__ = ["MLP", "BaseNet", "DANClassifier", "make_model", "MODELS"]


class MLP(nn.Sequential):
    """``in_features -> hidden -> hidden -> num_classes`` with ReLU, on flattened images."""

    def __init__(self, num_classes: int = 10, hidden: int = 256, in_features: int = 784) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


class BaseNet(nn.Module):
    """The small ConvNet: two 5x5 convolutions with max-pooling, then 80 -> 20 -> classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 5, kernel_size=5)
        self.conv2 = nn.Conv2d(5, 5, kernel_size=5)
        self.maxpool2 = nn.MaxPool2d(kernel_size=2)
        self.fc1 = nn.Linear(80, 20)
        self.fc2 = nn.Linear(20, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x [B, 1, 28, 28] (or [B, 784])
        x = x.view(-1, 1, 28, 28)
        x = self.relu(self.maxpool2(self.conv1(x)))
        x = self.relu(self.maxpool2(self.conv2(x)))
        x = self.relu(self.fc1(x.view(-1, 80)))
        return self.fc2(x)


class DANClassifier(nn.Sequential):
    """The three-layer DAN (``clfast.nn.DAN``, Tanh) on flattened images; ``sync_batchnorm``: its BatchNorms'
    batch statistics over all ranks under torch.distributed."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, sync_batchnorm: bool = False) -> None:
        super().__init__(nn.Flatten(), _DAN(in_features, num_classes, sync_batchnorm=sync_batchnorm))


MODELS = {"mlp": MLP, "basenet": BaseNet, "dan": DANClassifier}


def make_model(name: str, num_classes: int, input_shape: Sequence[int] = (1, 28, 28),
               sync_batchnorm: bool = False) -> nn.Module:
    """``name`` for inputs of ``input_shape`` (``[C, H, W]``) and ``num_classes`` outputs; ``sync_batchnorm``
    (under torch.distributed) gives a model with BatchNorms the batch statistics of all ranks."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if name == "basenet":
        if tuple(input_shape) != (1, 28, 28):
            raise ValueError(f"--model basenet takes 1x28x28 images, not {'x'.join(map(str, input_shape))}")
        return BaseNet(num_classes=num_classes)
    if name == "dan":
        return DANClassifier(num_classes=num_classes, in_features=math.prod(input_shape),
                             sync_batchnorm=sync_batchnorm)
    return MODELS[name](num_classes=num_classes, in_features=math.prod(input_shape))
