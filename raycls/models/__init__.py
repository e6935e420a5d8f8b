"""Backbones (raycls's own and every timm model), small-input adapters, and weight I/O. No Ray here."""

from raycls.models import adaptive_cnn, cifar_deit, small_cnn, timm_models  # noqa: F401  (registers the built-in models)
from raycls.models.checkpoint import load_weights, save_weights, unwrap
from raycls.models.registry import MODELS, BackboneModel, InputSpec, create_model, embed

__all__ = ["MODELS", "BackboneModel", "InputSpec", "create_model", "embed", "load_weights", "save_weights", "unwrap"]
