"""KernelBench level 1 problem 33 (BatchNorm) in its problem interface: ``Model`` is the reference,
``ModelNew`` the candidate on this project's CUDA backend."""
import torch
from torch import nn

from .module import BatchNorm2d

batch_size = 64
features = 64
dim1 = 512
dim2 = 512


class Model(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features=num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class ModelNew(nn.Module):
    def __init__(self, num_features: int, backend: str = "cuda"):
        super().__init__()
        self.bn = BatchNorm2d(num_features=num_features, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def get_inputs():
    return [torch.rand(batch_size, features, dim1, dim2)]


def get_init_inputs():
    return [features]
