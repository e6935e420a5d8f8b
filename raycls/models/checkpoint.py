"""Reading and writing model weights. Lives with the models so a phase that loads a teacher, or a chain that
starts from a previous phase, never reaches into train/. Files are plain state_dicts: loadable with
`torch.load(path, weights_only=True)` (no pickled code runs when a checkpoint is opened).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from raycls.errors import CheckpointError
from raycls.files import atomic_path

WEIGHTS_FILE = "model.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers: its state_dict keys carry no prefixes."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_weights(model: nn.Module, path: str | Path) -> None:
    atomic_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)


def load_weights(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from None


# Wrappers keep the backbone under these names (models.BackboneModel: `backbone`, phases' DistillModel: the
# student), so a checkpoint of any phase yields the backbone's weights by its prefix.
BACKBONE_PREFIXES = ("backbone.", "student.")


def backbone_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's weights inside a saved model of any phase (a bare classifier's are all of them)."""
    for prefix in BACKBONE_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            return inner
    return state


def load_backbone(backbone: nn.Module, weights: dict[str, torch.Tensor], *, what: str) -> None:
    """Load `weights` into `backbone`; a mismatch (another architecture) is a CheckpointError naming `what`."""
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{what}: the weights do not fit model {type(backbone).__name__} "
            f"(another architecture?): {str(err).splitlines()[0]}"
        ) from None
