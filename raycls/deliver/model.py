"""A leaderboard trial's model, rebuilt for inference: its config, its best checkpoint, its data's statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raycls.config.schema import TrialConfig
from raycls.errors import RayclsError
from raycls.models import load_weights
from raycls.phases import Phase
from raycls.phases.base import Previous
from raycls.train.evaluation import local_checkpoint, pick_rows
from raycls.train.loop import Data, RunContext, build, load_data
from raycls.train.state import STATE_FILE, read_position


@dataclass
class TrialModel:
    experiment: str
    trial_id: str
    config: TrialConfig
    model: nn.Module  # the phase module, in eval mode
    phase: Phase
    data: Data

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.splits.train.classes

    @property
    def image_size(self) -> int:
        return self.config.data.image_size or self.data.splits.train.size

    @property
    def channels(self) -> int:
        return self.data.spec.in_chans


class Classifier(nn.Module):
    """Images as float [N, C, H, W] in [0, 1] -> the logits the phase predicts with; normalisation inside, so
    an exported model needs nothing but the pixels."""

    def __init__(self, trial: TrialModel):
        super().__init__()
        self.model, self.phase = trial.model, trial.phase
        self.register_buffer("mean", torch.tensor(trial.data.splits.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(trial.data.splits.std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.phase.outputs(self.model, (images - self.mean) / self.std).logits
        if logits is None:
            raise RayclsError("this model has no classifier (a supcon stage): nothing to predict classes with")
        return logits


def load_trial_model(storage: str, experiment: str, pick: str = "best", *, device: str = "cpu") -> TrialModel:
    """The picked trial's (best | top:1 | a trial id) best checkpoint in its phase module, ready to predict."""
    from raycls.results import read_leaderboard

    rows = read_leaderboard(storage, experiment).table.to_pylist()
    if not rows:
        raise RayclsError(f"experiment {experiment!r}: no leaderboard rows under {storage.rstrip('/')}/{experiment} "
                          "(run `raycls tune` first, or pass --storage)")  # fmt: skip
    row = pick_rows(rows, pick, experiment)[0]
    config = TrialConfig.from_json(row["config_json"])
    data = load_data(config)
    with local_checkpoint(row["checkpoint"]) as folder:
        weights = load_weights(folder)
        stage = read_position(folder).stage if (Path(folder) / STATE_FILE).is_file() else len(config.stages) - 1
    previous = Previous(config.stages[stage - 1].phase, None) if stage else None  # a teacher's weights are in `weights`
    parts = build(config, config.stages[stage], data, RunContext(device=torch.device(device)), index=stage, previous=previous)
    parts.model.load_state_dict(weights)
    parts.model.eval()
    return TrialModel(experiment, row["trial_id"], config, parts.model, parts.phase, data)
