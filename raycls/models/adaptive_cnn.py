"""AdaptiveCNN (the seed pipelines' CNN): residual blocks with squeeze-and-excitation, whose layout is chosen
from the dataset: one-channel or small images (MNIST-like) get a light network with a max-pooled stem, colour
images (CIFAR-like) a deep one. The two layouts are the seed's, to its parameter counts (709K, 17.6M):

    MNIST-like: stem 3x3 conv c->32 + max-pool; stages 32x2 | 64x2 (stride 2) | 128x2 (stride 2); 128->64->n
    CIFAR-like: stem 3x3 conv c->64; stages 64x2 | 128x3 | 256x3 | 512x3 (stride 2 between); 512->256->n
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from raycls.config.schema import ModelConfig
from raycls.models.registry import MODELS, InputSpec

SE_REDUCTION = 16  # squeeze-and-excitation's bottleneck ratio (Hu et al. 2018)


@dataclass(frozen=True)
class Layout:
    stem: int
    max_pool: bool
    stages: tuple[tuple[int, int], ...]  # (width, blocks) per stage; stride 2 entering every stage but the first
    hidden: int  # the classifier MLP's hidden width (the embedding)


MNIST_LIKE = Layout(stem=32, max_pool=True, stages=((32, 2), (64, 2), (128, 2)), hidden=64)
CIFAR_LIKE = Layout(stem=64, max_pool=False, stages=((64, 2), (128, 3), (256, 3), (512, 3)), hidden=256)


def layout_for(spec: InputSpec) -> Layout:
    """One channel or images of at most 28 px: the MNIST layout; anything else: the CIFAR one."""
    return MNIST_LIKE if spec.in_chans == 1 or spec.image_size <= 28 else CIFAR_LIKE


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeezed = max(channels // SE_REDUCTION, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeezed, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(squeezed, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualSE(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            SqueezeExcite(c_out),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class AdaptiveCNN(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, layout: Layout, drop_rate: float = 0.0):
        super().__init__()
        stem = [
            nn.Conv2d(in_chans, layout.stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(layout.stem),
            nn.ReLU(inplace=True),
        ]
        blocks, width = [], layout.stem
        for index, (out, count) in enumerate(layout.stages):
            for b in range(count):
                blocks.append(ResidualSE(width, out, 2 if b == 0 and index > 0 else 1))
                width = out
        self.features = nn.Sequential(*stem, *([nn.MaxPool2d(2)] if layout.max_pool else []), *blocks)
        self.neck = nn.Sequential(nn.Linear(width, layout.hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate))
        self.num_features = layout.hidden
        self.head = nn.Linear(layout.hidden, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.neck(x.mean(dim=(2, 3)))  # the MLP's hidden layer is the embedding
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@MODELS.register("adaptive_cnn")
def adaptive_cnn(config: ModelConfig, spec: InputSpec) -> nn.Module:
    return AdaptiveCNN(spec.num_classes, spec.in_chans, layout_for(spec), drop_rate=config.drop_rate)
