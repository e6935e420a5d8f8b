"""Augmentation policies (RandAugment, TrivialAugmentWide, AutoAugment) and per-image affine jitter and
random erasing, on whole batches on the device.

torchvision.transforms.v2 runs the policies' ops on uint8 tensors on any device, but one call draws one op
for the whole batch. Here the draws are made per image (op, magnitude, sign, sub-policy) and the images are
grouped by draw: each group is one torchvision call on its slice of the batch, so the number of calls is
bounded by the number of distinct draws (at most a few dozen), never the batch size. The op tables and their
magnitudes are torchvision's own (`_AUGMENTATION_SPACE`, `_policies`), so the policies match the papers'
as torchvision implements them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from raycls.data.augment import AUGMENTATIONS, _pixel_space, _uniform

# Erased rectangles' aspect range (Zhong et al. 2020; timm's and torchvision's default).
ERASING_ASPECT = (0.3, 3.3)
TRIVIAL_BINS = 31  # TrivialAugmentWide's magnitude bins (torchvision's default)
RANDAUGMENT_BINS = 31
Draw = tuple[torch.Tensor, str, float]  # (which images, op name, signed magnitude): one torchvision call


@cache
def _policy(name: str) -> Any:
    """torchvision's policy object: its op table, its sub-policies, and the method applying one op."""
    factories: dict[str, Callable[[], Any]] = {
        "randaugment": lambda: v2.RandAugment(num_magnitude_bins=RANDAUGMENT_BINS),
        "trivialaugment": lambda: v2.TrivialAugmentWide(num_magnitude_bins=TRIVIAL_BINS),
        "cifar10": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
        "imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
        "svhn": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.SVHN),
    }
    return factories[name]()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _magnitude(policy: Any, op: str, bins: int, index: int, height: int, width: int) -> tuple[float, bool]:
    values, signed = policy._AUGMENTATION_SPACE[op]
    table = values(bins, height, width)
    return (float(table[index]) if table is not None and table.ndim > 0 else 0.0), signed  # None: no magnitude


def _apply_groups(x: torch.Tensor, policy: Any, draws: list[Draw]) -> torch.Tensor:
    """Apply each (mask, op, signed magnitude) draw to the images the mask selects, on uint8 images."""
    images = _to_uint8(x)
    for mask, op, magnitude in draws:
        index = mask.nonzero().flatten()
        if len(index):
            out = policy._apply_image_or_video_transform(
                images[index], op, magnitude, interpolation=v2.InterpolationMode.NEAREST, fill={torch.Tensor: None}
            )
            images[index] = out
    return images.to(x.dtype) / 255.0


def _signs(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return _uniform(n, gen, device) < 0.5


def _signed(chosen: torch.Tensor, negative: torch.Tensor, op: str, magnitude: float, signed: bool) -> list[Draw]:
    """The chosen images' draws of `op`: one group at +magnitude and, for a signed op, one at -magnitude."""
    if not signed:
        return [(chosen, op, magnitude)]
    return [(chosen & ~negative, op, magnitude), (chosen & negative, op, -magnitude)]


@_pixel_space("randaugment")
def randaugment(x: torch.Tensor, config: dict, gen: torch.Generator) -> torch.Tensor:
    policy = _policy("randaugment")
    ops = list(policy._AUGMENTATION_SPACE)
    n, _, h, w = x.shape
    for _ in range(config["num_ops"]):
        choice = (_uniform(n, gen, x.device) * len(ops)).long().clamp(max=len(ops) - 1)
        negative = _signs(n, gen, x.device)
        draws = [
            draw
            for k, op in enumerate(ops)
            for draw in _signed(
                choice == k, negative, op, *_magnitude(policy, op, RANDAUGMENT_BINS, config["magnitude"], h, w)
            )
        ]
        x = _apply_groups(x, policy, draws)
    return x


@_pixel_space("trivialaugment")
def trivialaugment(x: torch.Tensor, enabled: bool, gen: torch.Generator) -> torch.Tensor:
    """One op per image at a magnitude bin drawn per image: images are grouped by (op, bin, sign)."""
    policy = _policy("trivialaugment")
    ops = list(policy._AUGMENTATION_SPACE)
    n, _, h, w = x.shape
    choice = (_uniform(n, gen, x.device) * len(ops)).long().clamp(max=len(ops) - 1)
    bins = (_uniform(n, gen, x.device) * TRIVIAL_BINS).long().clamp(max=TRIVIAL_BINS - 1)
    negative = _signs(n, gen, x.device)
    key = (choice * TRIVIAL_BINS + bins) * 2 + negative.long()
    draws = []
    for value in key.unique().tolist():  # only the draws that occur: at most the batch size, usually fewer
        k, rest = divmod(value, TRIVIAL_BINS * 2)
        b, sign = divmod(rest, 2)
        magnitude, signed = _magnitude(policy, ops[k], TRIVIAL_BINS, b, h, w)
        draws.append((key == value, ops[k], -magnitude if signed and sign else magnitude))
    return _apply_groups(x, policy, draws)


@_pixel_space("autoaugment")
def autoaugment(x: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """One learned sub-policy per image; each of its two ops applies with its own probability."""
    policy = _policy(name)
    n, _, h, w = x.shape
    sub = (_uniform(n, gen, x.device) * len(policy._policies)).long().clamp(max=len(policy._policies) - 1)
    for stage in range(2):
        applied = _uniform(n, gen, x.device)
        negative = _signs(n, gen, x.device)
        draws: list[Draw] = []
        for s, (op, probability, index) in enumerate(sub_policy[stage] for sub_policy in policy._policies):
            magnitude = _magnitude(policy, op, 10, index, h, w) if index is not None else (0.0, False)
            draws += _signed((sub == s) & (applied <= probability), negative, op, *magnitude)
        x = _apply_groups(x, policy, draws)
    return x


@_pixel_space("affine")
def affine(x: torch.Tensor, config: dict, gen: torch.Generator) -> torch.Tensor:
    """Rotation, shift and zoom drawn per image, as one `grid_sample` for the batch; black outside."""
    n = len(x)

    def between(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * _uniform(n, gen, x.device)

    angle = torch.deg2rad(between(-config["degrees"], config["degrees"]))
    scale = between(config["scale_min"], config["scale_max"])
    # Grid coordinates span [-1, 1]: a shift of `translate` of the side is 2 * translate there.
    tx, ty = between(-1, 1) * 2 * config["translate"], between(-1, 1) * 2 * config["translate"]
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@AUGMENTATIONS.register("random_erasing")
def random_erasing(x: torch.Tensor, config: dict, gen: torch.Generator) -> torch.Tensor:
    """One rectangle per chosen image, set to 0 (the mean colour of the normalised batch), vectorised."""
    n, _, h, w = x.shape
    area = (config["area_min"] + (config["area_max"] - config["area_min"]) * _uniform(n, gen, x.device)) * h * w
    log_lo, log_hi = math.log(ERASING_ASPECT[0]), math.log(ERASING_ASPECT[1])
    aspect = (log_lo + (log_hi - log_lo) * _uniform(n, gen, x.device)).exp()
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = (_uniform(n, gen, x.device) * (h - eh + 1)).floor()
    left = (_uniform(n, gen, x.device) * (w - ew + 1)).floor()
    chosen = _uniform(n, gen, x.device) < config["p"]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (ys >= top[:, None, None])
        & (ys < (top + eh)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + ew)[:, None, None])
    )
    return x.masked_fill((inside & chosen[:, None, None])[:, None], 0.0)
