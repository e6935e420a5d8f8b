"""Train-time augmentations on whole batches, on the device (no per-image Python work).

Each op is registered under the AugmentConfig field of the same name and takes (batch, value, generator);
an op whose value is falsy (0, False) is skipped. The generator is seeded per epoch and rank, so an
augmented epoch is reproducible.

The loader normalises before it augments, so ops see normalised batches. Geometric ops (crops, flips) and
cutout's zero fill (the dataset's mean colour) are right in that space; colour ops are not (brightness,
grey and saturation are defined on pixel values, and normalisation shifts and scales each channel
differently). Colour ops are therefore registered as pixel-space ops: `apply_augmentations` hands them
[0, 1] images, un-normalised with the `mean`/`std` the loader used, and normalises their output again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from raycls.config.schema import AugmentConfig, DataConfig
from raycls.registry import Registry

AugmentOp = Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[AugmentOp] = Registry("augmentation")
# Ops that expect pixel values in [0, 1] rather than normalised images.
PIXEL_SPACE: set[str] = set()

# ITU-R BT.601 luma, what PIL's and torchvision's rgb-to-grey use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# SimCLR's colour-jitter probability (Chen et al. 2020, appendix A).
JITTER_PROBABILITY = 0.8
# Random-resized crop's aspect range (Szegedy et al. 2015; torchvision's default).
ASPECT_RANGE = (3 / 4, 4 / 3)
# The smallest area of timm's (and torchvision's) RandomResizedCrop: scale=(0.08, 1.0).
TIMM_MIN_AREA = 0.08


def _uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device)


def _pixel_space(name: str) -> Callable[[AugmentOp], AugmentOp]:
    """Register an op that works on [0, 1] pixel values (see the module docstring)."""

    def add(op: AugmentOp) -> AugmentOp:
        PIXEL_SPACE.add(name)
        return AUGMENTATIONS.register(name)(op)

    return add


@AUGMENTATIONS.register("resized_crop")
def resized_crop(x: torch.Tensor, min_area: float, gen: torch.Generator) -> torch.Tensor:
    """Random-resized crop (SimCLR's main augmentation): each image's crop covers a fraction of the area
    drawn from [min_area, 1] with a log-uniform aspect in [3/4, 4/3], lies inside the image, and is resized
    back to the full size (bilinear) - one `grid_sample` for the whole batch."""
    n = len(x)
    area = min_area + (1.0 - min_area) * _uniform(n, gen, x.device)
    # Only aspects that keep both sides inside the image (w = sqrt(area * r) <= 1, h = sqrt(area / r) <= 1),
    # so the area is exactly the drawn one: torchvision rejects and redraws instead, which cannot vectorise.
    log_area = area.log()
    lo = log_area.clamp(min=math.log(ASPECT_RANGE[0]))
    hi = (-log_area).clamp(max=math.log(ASPECT_RANGE[1]))
    aspect = (lo + (hi - lo) * _uniform(n, gen, x.device)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    # Centres in grid coordinates ([-1, 1] spans the image): at most 1 - side from the middle.
    cx = (1.0 - width) * (2.0 * _uniform(n, gen, x.device) - 1.0)
    cy = (1.0 - height) * (2.0 * _uniform(n, gen, x.device) - 1.0)
    zero = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width, zero, cx], -1), torch.stack([zero, height, cy], -1)], 1)
    # align_corners=False: the unit square is the pixels' outer edges, so width=1, centre 0 is the identity.
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@AUGMENTATIONS.register("hflip")
def hflip(x: torch.Tensor, enabled: bool, gen: torch.Generator) -> torch.Tensor:
    flip = _uniform(len(x), gen, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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


def luma(x: torch.Tensor) -> torch.Tensor:
    """Grey value [N, 1, H, W] of [0, 1] images: BT.601 luma for RGB, the image itself for one channel."""
    channels = x.shape[1]
    if channels == 1:
        return x
    if channels != len(LUMA_WEIGHTS):
        raise ValueError(f"grey needs 1 or 3 channels, got {channels=}")
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision's blend: factor 1 keeps x, 0 gives `other`, > 1 extrapolates away from it; clipped to pixels.
    return (factor[:, None, None, None] * (x - other) + other).clamp(0.0, 1.0)


@_pixel_space("color_jitter")
def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """SimCLR-style colour jitter: brightness, contrast and saturation each scaled by a factor drawn from
    [1 - strength, 1 + strength], on each image with probability 0.8. No hue: a hue rotation has no cheap
    batched form and SupCon on CIFAR gains little from it. The order is fixed (brightness, contrast,
    saturation), where torchvision shuffles it per image: a per-image order would need every permutation."""
    n = len(x)

    def factors() -> torch.Tensor:
        return (1.0 + strength * (2.0 * _uniform(n, gen, x.device) - 1.0)).clamp(min=0.0).to(x.dtype)

    brightness, contrast, saturation = factors(), factors(), factors()
    apply = _uniform(n, gen, x.device) < JITTER_PROBABILITY
    out = _blend(x, torch.zeros_like(x), brightness)
    out = _blend(out, luma(out).mean(dim=(1, 2, 3), keepdim=True), contrast)
    out = _blend(out, luma(out), saturation)  # one channel: grey is the image, a no-op as in torchvision
    return torch.where(apply[:, None, None, None], out, x)


@_pixel_space("grayscale")
def grayscale(x: torch.Tensor, probability: float, gen: torch.Generator) -> torch.Tensor:
    """Each image turned grey (BT.601 luma in every channel) with `probability`; one-channel images are
    grey already."""
    apply = _uniform(len(x), gen, x.device) < probability
    if x.shape[1] == 1:
        return x
    return torch.where(apply[:, None, None, None], luma(x).expand_as(x), x)


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


def training_augment(augment: AugmentConfig, data: DataConfig) -> AugmentConfig:
    """The augmentation training batches get. `data.resize: crop` on a dataset of image files is timm's
    convention: centre crops to evaluate, random-resized crops to train, of area TIMM_MIN_AREA..1 unless
    `augment.resized_crop` sets another. They are drawn from the decoded centre square, not the whole file
    as timm's are: files are decoded once per node (raycls.data.decode), and augmentation runs on the device."""
    from raycls.data.datasets import DATASETS

    if data.resize != "crop" or augment.resized_crop or not DATASETS.get(data.name).from_files:
        return augment
    return augment.model_copy(update={"resized_crop": TIMM_MIN_AREA})


Stats = torch.Tensor | Sequence[float]


def apply_augmentations(
    x: torch.Tensor,
    config: AugmentConfig,
    gen: torch.Generator,
    *,
    mean: Stats | None = None,
    std: Stats | None = None,
) -> torch.Tensor:
    """Apply every enabled op in AugmentConfig's field order to a normalised batch.

    `mean` and `std` are the per-channel statistics (in [0, 1] pixel units) `x` was normalised with; the
    pixel-space (colour) ops need them and refuse to run without them.
    """
    for name, value in config.model_dump().items():
        if not value:
            continue
        op = AUGMENTATIONS.get(name)
        x = (
            _in_pixel_space(op, x, value, gen, name=name, mean=mean, std=std)
            if name in PIXEL_SPACE
            else op(x, value, gen)
        )
    return x


def _in_pixel_space(
    op: AugmentOp,
    x: torch.Tensor,
    value: Any,
    gen: torch.Generator,
    *,
    name: str,
    mean: Stats | None,
    std: Stats | None,
) -> torch.Tensor:
    if mean is None or std is None:
        # Guessing (treating normalised values as pixels) would clip away half of every image silently.
        raise ValueError(
            f"augmentation {name!r} works on pixel values: pass the batch's normalisation "
            "mean and std to apply_augmentations"
        )
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (op(x * s + m, value, gen) - m) / s
