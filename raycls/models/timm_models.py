"""Any timm model by name, with small inputs (CIFAR's 32 px, MNIST's 28 px) handled properly.

ImageNet stems downsample 4x before the first block (7x7/2 conv + max-pool), which leaves 8x8 px of a CIFAR
image and costs several points of accuracy; the CIFAR stem (3x3/1 conv, no max-pool) is the standard fix.
ViTs get `img_size` and a 4 px patch instead of 224 px and 16 px patches. Adapters are chosen by the timm
module that defines the model (resnet, densenet, ...), so every variant of a family is covered at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from raycls.config.schema import ModelConfig
from raycls.errors import RayclsError
from raycls.models.registry import MODELS, InputSpec
from raycls.registry import Registry

SMALL_INPUT_MAX = 64  # px; at or below this, "auto" switches to the small-input stem


@dataclass(frozen=True)
class SmallInputAdapter:
    # Extra timm.create_model kwargs for small inputs (ViTs: patch size).
    create_kwargs: Callable[[InputSpec], dict[str, Any]] = field(default=lambda spec: {})
    # Changes to the built model (CNNs: swap the stem).
    patch: Callable[[nn.Module, InputSpec], None] = field(default=lambda model, spec: None)


SMALL_INPUT_ADAPTERS: Registry[SmallInputAdapter] = Registry("small-input adapter")


def _cifar_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


def _patch_resnet(model: nn.Module, spec: InputSpec) -> None:
    if isinstance(model.conv1, nn.Conv2d):  # deep-stem variants (resnet18d) keep their 3x3 stack
        model.conv1 = _cifar_conv(model.conv1)
    else:
        model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()


def _patch_densenet(model: nn.Module, spec: InputSpec) -> None:
    model.features.conv0 = _cifar_conv(model.features.conv0)
    model.features.pool0 = nn.Identity()


def _patch_stride2_stem(model: nn.Module, spec: InputSpec) -> None:
    model.conv_stem.stride = (1, 1)


def _vit_kwargs(spec: InputSpec) -> dict[str, Any]:
    return {"img_size": spec.image_size, "patch_size": 4 if spec.image_size <= 32 else 8}


SMALL_INPUT_ADAPTERS.register("resnet")(SmallInputAdapter(patch=_patch_resnet))
SMALL_INPUT_ADAPTERS.register("densenet")(SmallInputAdapter(patch=_patch_densenet))
SMALL_INPUT_ADAPTERS.register("efficientnet")(SmallInputAdapter(patch=_patch_stride2_stem))
SMALL_INPUT_ADAPTERS.register("mobilenetv3")(SmallInputAdapter(patch=_patch_stride2_stem))
SMALL_INPUT_ADAPTERS.register("vision_transformer")(SmallInputAdapter(create_kwargs=_vit_kwargs))
SMALL_INPUT_ADAPTERS.register("deit")(SmallInputAdapter(create_kwargs=_vit_kwargs))


def small_input_adapter(config: ModelConfig, spec: InputSpec) -> SmallInputAdapter | None:
    import timm

    # "auto" leaves a pretrained model's stem alone: replacing it would throw away the pretrained conv1 (or
    # patch embedding); small inputs are upsampled instead (data.image_size), as fine-tuning recipes do.
    wanted = config.small_input == "on" or (
        config.small_input == "auto" and not config.pretrained and spec.image_size <= SMALL_INPUT_MAX
    )
    if not wanted:
        return None
    family = timm.models.model_entrypoint(config.name).__module__.rsplit(".", 1)[-1]
    if family in SMALL_INPUT_ADAPTERS:
        return SMALL_INPUT_ADAPTERS.get(family)
    if config.small_input == "on":
        raise RayclsError(
            f"model.small_input=on: no small-input adapter for timm family {family!r} ({config.name}); "
            f"families with one: {', '.join(SMALL_INPUT_ADAPTERS.names())}"
        )
    return None  # "auto" on an unknown family: timm's own stem, unchanged


def timm_factory(config: ModelConfig, spec: InputSpec, *, load_weights: bool = True) -> nn.Module:
    """`load_weights=False` builds the architecture a pretrained config gets (its stem, its size) without
    fetching weights: what the preflight's shape check needs."""
    import timm

    adapter = small_input_adapter(config, spec)
    kwargs: dict[str, Any] = {
        "num_classes": spec.num_classes,
        "in_chans": spec.in_chans,
        "drop_rate": config.drop_rate,
        **({"drop_path_rate": config.drop_path_rate} if config.drop_path_rate else {}),
        **(adapter.create_kwargs(spec) if adapter else {}),
        **config.kwargs,
    }
    try:
        model = timm.create_model(config.name, pretrained=config.pretrained and load_weights, **kwargs)
    except Exception as err:
        if config.pretrained and load_weights:
            # timm fetches weights from the Hugging Face hub; offline that fails deep inside huggingface_hub.
            # No dotted key here: this factory builds students and teachers alike (raycls.prepare names it).
            raise RayclsError(
                f"pretrained=true: could not load timm weights for {config.name!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, put them in the "
                f"Hugging Face cache (HF_HOME) first, or set pretrained=false on this model."
            ) from None
        raise RayclsError(f"timm could not build {config.name!r} with {kwargs}: {err}") from None
    if adapter:
        adapter.patch(model, spec)
    return model


MODELS.fallback = timm_factory
