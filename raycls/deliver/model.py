"""A leaderboard trial's model, rebuilt for inference: its config, its best checkpoint, its data's statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raycls.config.load import config_of_row
from raycls.config.schema import TrialConfig
from raycls.errors import RayclsError
from raycls.phases import Phase
from raycls.train.evaluation import pick_rows, read_checkpoint, stage_model, trial_rows
from raycls.train.loop import Data, RunContext, load_data


@dataclass
class TrialModel:
    experiment: str
    trial_id: str
    config: TrialConfig
    model: nn.Module  # the phase module, in eval mode
    phase: Phase
    data: Data
    stage: int  # the chain stage the checkpoint holds (its last, unless the trial stopped before it)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.splits.train.classes

    @property
    def image_size(self) -> int:
        return self.config.data.image_size or self.data.splits.train.size

    @property
    def channels(self) -> int:
        return self.data.spec.in_chans

    @property
    def tta_views(self) -> tuple[str, ...]:
        """The TTA views its evaluation averages (`test_acc_tta`); `raycls predict --tta` averages the same."""
        from raycls.evaluate.tta import tta_views

        return tta_views(self.config.eval.tta, self.config.stages[self.stage].augment)


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
    return model_of_row(pick_rows(trial_rows(storage, experiment), pick, experiment)[0], device=device)


def model_of_row(
    row: dict, *, device: str = "cpu", checkpoint: str | None = None, data: Data | None = None
) -> TrialModel:
    """A leaderboard row's best checkpoint (or another of its kept `checkpoint`s) in its phase module, ready to
    predict. `data`: the row's data when the caller already read it (snapshots of one trial share it)."""
    experiment = row["experiment"]
    config = config_of_row(row)
    data = load_data(config) if data is None else data
    weights, stage = read_checkpoint(checkpoint or row["checkpoint"])
    index = len(config.stages) - 1 if stage is None else stage
    parts = stage_model(config, weights, data, RunContext(device=torch.device(device)), index)
    parts.model.eval()
    return TrialModel(experiment, row["trial_id"], config, parts.model, parts.phase, data, index)
