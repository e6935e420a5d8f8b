"""The backbone registry: raycls's own models by name, and every timm model by its timm name.

A factory returns a classifier with timm's interface (`forward_features`, `forward_head(x, pre_logits=...)`,
`num_features`), so phases can put their own heads on the embedding of any backbone.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from raycls.config.schema import ModelConfig
from raycls.errors import ConfigError, RegistryError
from raycls.registry import Registry


@dataclass(frozen=True)
class InputSpec:
    num_classes: int
    in_chans: int
    image_size: int


ModelFactory = Callable[[ModelConfig, InputSpec], nn.Module]


class ModelRegistry(Registry[ModelFactory]):
    """Registered names first; any other name that timm knows is built by `timm_factory`."""

    fallback: ModelFactory | None = None

    def get(self, name: str) -> ModelFactory:
        if name in self._entries:
            return self._entries[name]
        import timm

        if self.fallback is not None and timm.is_model(name):
            return self.fallback
        close = difflib.get_close_matches(name, self.names() + timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RegistryError(
            f"unknown model {name!r}: raycls models are {', '.join(self.names())}, "
            f"or any timm model (timm.list_models()){hint}"
        )

    def __contains__(self, name: object) -> bool:
        if name in self._entries:  # raycls's own models: no timm import (seconds of a trial's start-up)
            return True
        import timm

        return isinstance(name, str) and timm.is_model(name)


MODELS = ModelRegistry("model")


def create_model(config: ModelConfig, spec: InputSpec) -> nn.Module:
    model = MODELS.get(config.name)(config, spec)
    if config.inference_head is not None and not hasattr(model, "inference_head"):
        raise ConfigError(
            f"model.inference_head={config.inference_head}: {config.name} has one head; it applies to "
            "models with a distillation token (cifar_deit_distilled)"
        )
    if config.modules:
        from raycls.models.modules import apply_modules

        model = apply_modules(model, config.modules, spec)
    if config.adapter is not None:
        from raycls.models.adapters import apply_adapter

        model = apply_adapter(model, config.adapter)
    return model


def embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's embedding (timm's pre-logits features): what heads and k-NN metrics work on."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


def embed_and_classify(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and the classifier's logits from one pass through the trunk."""
    features = backbone.forward_features(x)
    return backbone.forward_head(features, pre_logits=True), backbone.forward_head(features)


class BackboneModel(nn.Module):
    """A backbone wrapped with phase-specific parts (a margin head, a projection, ...). Every such wrapper
    keeps the backbone under `backbone` (so its weights carry the `backbone.` prefix in checkpoints) and
    exposes the backbone's embedding as `embed`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, x)
