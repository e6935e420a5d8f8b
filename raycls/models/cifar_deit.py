"""CIFAR DeiT-tiny (the seed pipelines' ViT for 32 px images), on timm's VisionTransformer.

    image -> conv stem (3x3, then 3x3 stride 2) -> projection (patch conv) -> tokens
          -> [class token (+ distillation token)] -> 12 blocks (3 heads, MLP ratio 2, drop-path) -> heads

The stem makes a hybrid patch embedding (timm's HybridEmbed): a 4 px ViT patch sees only raw pixels, a conv
stem gives it local features first, which is what lets a ViT learn CIFAR from scratch. Class-token dropout:
in training, each image's class token is replaced by the mean of its patch tokens with probability
`cls_token_drop` (0.1), so the head also learns to read the pooled tokens. `cifar_deit_distilled` adds
DeiT's distillation token and head; `model.inference_head` chooses what predicts at inference: the class
head, the distillation head, or their mean (timm's and DeiT's default).

Sizes are model.kwargs (embed_dim 192, depth 12, num_heads 3, mlp_ratio 2, stem_width 64, cls_token_drop 0.1).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn

from raycls.config.schema import ModelConfig
from raycls.errors import ConfigError
from raycls.models.registry import MODELS, InputSpec

DEFAULTS: dict[str, Any] = {
    "embed_dim": 192,
    "depth": 12,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "stem_width": 64,
    "cls_token_drop": 0.1,
}


def conv_stem(in_chans: int, width: int) -> nn.Sequential:
    """Two 3x3 convs, the second with stride 2: the feature map the projection cuts into patches."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width // 2, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width // 2),
        nn.GELU(),
        nn.Conv2d(width // 2, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.GELU(),
    )


def patch_size_for(image_size: int) -> int:
    """Patches on the stem's half-size map: an 8x8 token grid for 32 px (CIFAR), 7x7 for 28 px (MNIST)."""
    return max(1, round(image_size / 16))


def _build(cls: type[nn.Module], config: ModelConfig, spec: InputSpec, **extra: Any) -> nn.Module:
    if config.pretrained:
        raise ConfigError(
            f"model.pretrained=true: {config.name} has no pretrained weights; train it (or distil it) "
            "from scratch, or start from a checkpoint with `init:`"
        )
    unknown = set(config.kwargs) - set(DEFAULTS)
    if unknown:
        raise ConfigError(
            f"model.kwargs: {', '.join(sorted(unknown))} not known to {config.name}; it takes {', '.join(DEFAULTS)}"
        )
    from timm.layers import HybridEmbed

    args = {**DEFAULTS, **config.kwargs}
    stem = conv_stem(spec.in_chans, int(args["stem_width"]))
    return cls(
        img_size=spec.image_size,
        patch_size=patch_size_for(spec.image_size),
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        embed_dim=int(args["embed_dim"]),
        depth=int(args["depth"]),
        num_heads=int(args["num_heads"]),
        mlp_ratio=float(args["mlp_ratio"]),
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
        cls_token_drop=float(args["cls_token_drop"]),
        embed_layer=partial(HybridEmbed, backbone=stem),
        **extra,
    )


@MODELS.register("cifar_deit")
def cifar_deit(config: ModelConfig, spec: InputSpec) -> nn.Module:
    from raycls.models.cifar_deit_timm import CifarDeiT

    return _build(CifarDeiT, config, spec)


@MODELS.register("cifar_deit_distilled")
def cifar_deit_distilled(config: ModelConfig, spec: InputSpec) -> nn.Module:
    from raycls.models.cifar_deit_timm import CifarDeiTDistilled

    return _build(CifarDeiTDistilled, config, spec, inference_head=config.inference_head or "mean")
