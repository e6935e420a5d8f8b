"""Checks of a model config that need the model itself, run before any trial starts (raycls.prepare):
does the architecture take the input size, and are its pretrained weights on this machine.

Both answer with the problem's text (None: fine); the caller names the config key. Neither touches the
network: a shape check builds on PyTorch's "meta" device (shapes, no memory, no weights), and a weights check
looks in the local caches timm reads from.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from raycls.config.schema import ModelConfig
from raycls.models.registry import MODELS, InputSpec
from raycls.models.timm_models import timm_factory

# Any count works for a shape check; 3 channels is what every timm model accepts.
CHECK_CLASSES, CHECK_CHANNELS = 10, 3
# Up to this many parameters (20 MB of float32) and this image size the shape check builds and runs the model
# on the CPU (a few ms to ~0.1 s); larger ones run on the meta device.
REAL_FORWARD_PARAMS, REAL_FORWARD_SIZE = 5_000_000, 256


def input_size_problem(config: ModelConfig, image_size: int) -> str | None:
    """Why `config` cannot take `image_size` px images (with the fix), or None. Cached per distinct model and
    size, so a search over one model checks it once."""
    shaping = config.model_copy(update={"adapter": None, "inference_head": None})  # neither changes shapes
    return _input_size_problem(shaping.model_dump_json(), image_size)


@functools.lru_cache(maxsize=256)
def _input_size_problem(config_json: str, image_size: int) -> str | None:
    config = ModelConfig.model_validate_json(config_json)
    error = _forward_error(config, image_size)
    if error is None:
        return None
    fixes = []
    native = _native_size(config.name)
    if native and native != image_size:
        fixes.append(f"data.image_size: {native} (resize on the device to the size it was built for)")
    # Models that take timm's `img_size` argument build for this size (those that do not fail on it: no fix).
    if (
        config.name not in MODELS.names()
        and _forward_error(_with_kwargs(config, img_size=image_size), image_size) is None
    ):
        fixes.append(f"model.kwargs: {{img_size: {image_size}}} (build it for {image_size} px)")
    fix = f"; set {' or '.join(fixes)}" if fixes else ""
    return f"{config.name} cannot take {image_size} px images ({error}){fix}"


def _forward_error(config: ModelConfig, image_size: int) -> str | None:
    """One forward pass of two images: the error text, or None when it runs. Built on the meta device; a
    small model then runs for real (on the CPU, in milliseconds): PyTorch's meta kernels import its compiler
    stack (dynamo, sympy: ~1.5 s) on first use, which a search of raycls's own models never needs otherwise."""
    spec = InputSpec(num_classes=CHECK_CLASSES, in_chans=CHECK_CHANNELS, image_size=image_size)
    try:
        with torch.device("meta"):
            model = _build(config, spec)
        device = "cpu" if _small(model, image_size) else "meta"
        with torch.device(device), torch.no_grad():
            model = _build(config, spec).eval() if device == "cpu" else model.eval()  # eval: BatchNorm on 1x1
            model(torch.zeros(2, CHECK_CHANNELS, image_size, image_size))
    except Exception as err:  # noqa: BLE001 - any failure to build or run at this size is the answer
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return None


def _small(model: torch.nn.Module, image_size: int) -> bool:
    """Cheap to run for real: few parameters, small images, none left uninitialised (lazy modules)."""
    if image_size > REAL_FORWARD_SIZE:
        return False
    try:
        return sum(p.numel() for p in model.parameters()) <= REAL_FORWARD_PARAMS
    except ValueError:  # an uninitialised (lazy) parameter has no size yet
        return False


def _build(config: ModelConfig, spec: InputSpec) -> torch.nn.Module:
    if config.name in MODELS.names():  # raycls's own models carry no downloaded weights
        return MODELS.get(config.name)(config, spec)
    return timm_factory(config, spec, load_weights=False)


def _with_kwargs(config: ModelConfig, **kwargs: object) -> ModelConfig:
    return config.model_copy(update={"kwargs": {**config.kwargs, **kwargs}})


def _native_size(name: str) -> int | None:
    """The side length timm's pretrained config says the model was built for (224 for eva02_tiny_patch14_224)."""
    cfg = _pretrained_cfg(name)
    size = cfg.input_size if cfg is not None else None
    return int(size[-1]) if size else None


def _pretrained_cfg(name: str):  # -> timm PretrainedCfg | None
    if name in MODELS.names():
        return None
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


# ------------------------------------------------------------------------------------------------ modules
def modules_problem(config: ModelConfig, image_size: int) -> str | None:
    """Why `config.modules` cannot be added to its model at this size (a CNN module on a ViT, a stage index
    out of range, more learned tokens than patches), or None. Built on the meta device, like the shape check."""
    if not config.modules:
        return None
    from raycls.errors import ConfigError
    from raycls.models.modules import apply_modules

    spec = InputSpec(num_classes=CHECK_CLASSES, in_chans=CHECK_CHANNELS, image_size=image_size)
    try:
        with torch.device("meta"):
            apply_modules(_build(config, spec), config.modules, spec)
    except ConfigError as err:
        return "; ".join(err.problems)
    return None


# ------------------------------------------------------------------------------------------------ weights
def weights_problem(config: ModelConfig) -> str | None:
    """Why `config.pretrained` cannot be met from this machine's caches (with how to fix it), or None.
    Looked up without the network, so an offline machine answers at once instead of after timm's retries."""
    if not config.pretrained:
        return None
    if config.name in MODELS.names():  # raycls's own models: their factories say what pretrained means
        return None
    cfg = _pretrained_cfg(config.name)
    if cfg is None:
        return f"timm has no pretrained weights for {config.name!r}; set pretrained: false"
    if _cached_weights(cfg) is not None:
        return None
    from huggingface_hub import constants

    tried = cfg.hf_hub_id or cfg.url or cfg.file
    return (
        f"the weights of {config.name} ({tried}) are not in this machine's caches "
        f"(Hugging Face: {constants.HF_HUB_CACHE}, torch hub: {torch.hub.get_dir()}); "
        f"download them once online (python -c \"import timm; timm.create_model('{config.name}', pretrained=True)\"), "
        f"point HF_HOME at a cache holding them, or set pretrained: false"
    )


def _cached_weights(cfg) -> Path | None:
    """The local file timm would load the weights from, or None: the Hugging Face cache (hf_hub_id), else
    torch hub's checkpoint folder (url), else the configured file."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (
            [cfg.hf_hub_filename]
            if cfg.hf_hub_filename
            else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        )
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return path
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    return None
