"""Train-time augmentations on whole batches, on the device (no per-image Python work).

Each op is registered under the AugmentConfig field of the same name and takes (batch, value, generator);
an op whose value is falsy (0, False) is skipped. The generator is seeded per epoch and rank, so an
augmented epoch is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from raycls.config.schema import AugmentConfig
from raycls.registry import Registry

AugmentOp = Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[AugmentOp] = Registry("augmentation")


def _uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device)


@AUGMENTATIONS.register("random_crop")
def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `padding`, then crop each image back to its size at its own random offset."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy = (_uniform(n, gen, x.device) * (2 * padding + 1)).long()
    dx = (_uniform(n, gen, x.device) * (2 * padding + 1)).long()
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [N, 1, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


@AUGMENTATIONS.register("hflip")
def hflip(x: torch.Tensor, enabled: bool, gen: torch.Generator) -> torch.Tensor:
    flip = _uniform(len(x), gen, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@AUGMENTATIONS.register("cutout")
def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image (DeVries & Taylor 2017); centres may sit near the border."""
    n, _, h, w = x.shape
    cy = (_uniform(n, gen, x.device) * h).long()[:, None, None]
    cx = (_uniform(n, gen, x.device) * w).long()[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x.masked_fill(inside[:, None], 0.0)


def apply_augmentations(x: torch.Tensor, config: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    for name, value in config.model_dump().items():
        if value:
            x = AUGMENTATIONS.get(name)(x, value, gen)
    return x
