"""Parameter-efficient fine-tuning adapters (`model.adapter`), through peft, injected into the backbone.

`peft.inject_adapter_in_model` adds the adapter layers in place (the module stays a timm model, whatever its
family) and leaves only them trainable; the classifier is a head and trains too. Every consumer of a
trial's weights builds its model from the config, adapter included, so the state-dict keys agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from raycls.config.schema import AdapterConfig
from raycls.errors import ConfigError
from raycls.models.classifier import classifier_of
from raycls.registry import Registry

ADAPTERS: Registry[Callable[[AdapterConfig], Any]] = Registry("adapter")


@ADAPTERS.register("lora")
def lora(config: AdapterConfig) -> Any:
    """LoRA (Hu et al. 2022): a rank-`rank` update B @ A beside each target linear layer, B starting at 0."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or 2 * config.rank,
        lora_dropout=config.dropout,
        target_modules=list(config.targets or ["qkv"]),
    )


@ADAPTERS.register("ia3")
def ia3(config: AdapterConfig) -> Any:
    """(IA)^3 (Liu et al. 2022): learned scalings of the attention projections' and the MLP's activations."""
    from peft import IA3Config

    targets = list(config.targets or ["qkv", "fc2"])
    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t.startswith("fc")])


def apply_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    from peft import inject_adapter_in_model

    peft_config = ADAPTERS.create(config.type, config)
    try:
        model = inject_adapter_in_model(peft_config, model)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.adapter.targets: {err}; this model's linear layers are named: {', '.join(linear)}"
        ) from None
    head = classifier_of(model)
    if head is not None:
        head.requires_grad_(True)  # the classifier is new to the task: it trains in full
    return model
