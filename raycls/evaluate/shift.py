"""Distribution shift: corrupted copies of the test split, generated at run time (CIFAR-10-C's protocol).

Hendrycks & Dietterich (2019) corrupt each test image with 15 functions at 5 severities. These are their
CIFAR parameters for the corruptions that need no external assets, over uint8 [N, C, H, W] images of any
dataset and channel count. Written here rather than taken from `imagecorruptions`: that package imports
`pkg_resources`, which setuptools removed (81+), so it fails to import on a current Python environment, and
it pulls OpenCV and scikit-image in for the frost/snow/glass corruptions this subset leaves out.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raycls.registry import Registry

CorruptFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # float [N, H, W, C] in [0, 1]


@dataclass(frozen=True)
class Corruption:
    apply: CorruptFn
    family: str  # CIFAR-10-C's grouping: noise, blur, weather, digital


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corruption(name: str, family: str) -> Callable[[CorruptFn], CorruptFn]:
    def add(fn: CorruptFn) -> CorruptFn:
        CORRUPTIONS.register(name)(Corruption(fn, family))
        return fn

    return add


@corruption("gaussian_noise", "noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return x + rng.normal(scale=c, size=x.shape)


@corruption("shot_noise", "noise")
def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [500, 250, 100, 75, 50][severity - 1]
    return rng.poisson(x * c) / c


@corruption("impulse_noise", "noise")
def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    hit = rng.random(x.shape) < c
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(x.dtype), x)  # salt and pepper


@corruption("gaussian_blur", "blur")
def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    c = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return gaussian_filter(x, sigma=(0, c, c, 0))


@corruption("brightness", "weather")
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    return x + c  # the HSV value channel raised by c, for colour and grey images alike


@corruption("contrast", "digital")
def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - means) * c + means


@corruption("pixelate", "digital")
def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    h, w = t.shape[-2:]
    small = torch.nn.functional.interpolate(t, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return torch.nn.functional.interpolate(small, size=(h, w), mode="nearest").permute(0, 2, 3, 1).numpy()


@corruption("jpeg_compression", "digital")
def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = [80, 65, 58, 50, 40][severity - 1]
    out = np.empty_like(x)
    for i, image in enumerate((x * 255).round().astype(np.uint8)):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer)).astype(np.float64) / 255
        out[i] = decoded[..., None] if decoded.ndim == 2 else decoded
    return out


def corrupt(images: torch.Tensor, name: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """uint8 [N, C, H, W] images with corruption `name` at `severity` (1-5), seeded."""
    spec = CORRUPTIONS.get(name)  # an unknown name lists the known ones
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1-5, got {severity}")
    x = images.permute(0, 2, 3, 1).numpy().astype(np.float64) / 255
    out = np.clip(spec.apply(x, severity, np.random.default_rng(seed)), 0, 1)
    return torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
