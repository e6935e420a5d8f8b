"""CST-style token distillation (phase.name: token_distill): a ViT student learns the labels and a ViT
teacher's patch tokens. Losses in raycls.losses.tokens; the config's docstring gives the recipe.

    images -> student ViT -> tokens at student_layers -> projections -> L_tok  <- teacher tokens (resampled)
                         \\-> tokens at student_layers ----------------> L_rel  <- at teacher_layers
                          \\-> class head -> CE(labels)

The teacher is frozen, in eval mode, and may see the images at its own resolution (`teacher_image_size`). Both
models must be timm VisionTransformers (vit_*, deit_*, DINOv2, raycls's cifar_deit): their
`forward_intermediates` gives each block's tokens without the prefix (class / distillation) tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raycls import names
from raycls.config.schema import PREVIOUS, ModelConfig, Stage, TokenDistillConfig
from raycls.errors import ConfigError
from raycls.losses.tokens import match_grid, token_relation_loss, token_representation_loss
from raycls.models.registry import InputSpec, create_model
from raycls.phases.base import PHASES, Batch, Phase, training_hits
from raycls.phases.distill import teacher_module, teacher_trunk


def vision_transformer(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def block_indices(layers: list[int] | None, depth: int, what: str) -> list[int]:
    """Layer indices made non-negative and checked; None: the middle block and the last."""
    chosen = layers if layers is not None else [depth // 2 - 1, depth - 1]
    resolved = [i + depth if i < 0 else i for i in chosen]
    bad = [i for i, r in zip(chosen, resolved) if not 0 <= r < depth]
    if bad:
        raise ConfigError(
            f"phase.{what}: {bad} out of range for a {depth}-block ViT (0..{depth - 1}, or negative from the end)"
        )
    return sorted(set(resolved)) if layers is None else resolved


def sketch(model: ModelConfig) -> nn.Module:
    """The model's architecture on the meta device: its classes and shapes, no memory, no download."""
    with torch.device("meta"):
        return create_model(model.model_copy(update={"pretrained": False, "adapter": None}), SKETCH_SPEC)


SKETCH_SPEC = InputSpec(num_classes=10, in_chans=3, image_size=32)


def in_config_order(blocks: list[torch.Tensor], layers: list[int]) -> list[torch.Tensor]:
    """timm returns the blocks asked for in block order, each once; the pairs follow the config's order."""
    by_index = dict(zip(sorted(set(layers)), blocks))
    return [by_index[i] for i in layers]


class TokenDistillModel(nn.Module):
    """Student + projections (trained) + frozen teacher. `backbone` is the student: what is evaluated and
    what a chain hands on; the projections exist for the loss only."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: list[int], teacher_layers: list[int]):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.projections = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in student_layers)

    def train(self, mode: bool = True) -> TokenDistillModel:
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def forward(
        self, x: torch.Tensor, *, tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The student's logits; with `tokens` (the loss), also its tokens at the chosen blocks and those
        tokens projected to the teacher's width. Through forward, so DDP synchronises every gradient."""
        if not tokens:
            return self.student(x)
        final, blocks = self.student.forward_intermediates(x, indices=self.student_layers, output_fmt="NLC")
        blocks = in_config_order(blocks, self.student_layers)
        return self.student.forward_head(final), blocks, [p(t) for p, t in zip(self.projections, blocks)]

    @torch.no_grad()
    def teacher_tokens(self, x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The teacher's patch tokens at its chosen blocks, on the student's `count`-token grid."""
        blocks = self.teacher.forward_intermediates(
            x, indices=self.teacher_layers, output_fmt="NLC", intermediates_only=True
        )
        return [match_grid(t, count) for t in in_config_order(blocks, self.teacher_layers)]


@PHASES.register("token_distill")
class TokenDistill(Phase[TokenDistillConfig]):
    metric = names.VAL_ACC

    def build(self, backbone: nn.Module) -> nn.Module:
        if not vision_transformer(backbone):
            raise ConfigError(
                f"phase.name=token_distill: the student ({type(backbone).__name__}) is not a ViT; "
                "token distillation needs a timm VisionTransformer student (vit_*, deit_*, cifar_deit)"
            )
        self.epoch = 0
        trunk = teacher_trunk(self.config, self.spec, self.previous, backbone)
        if not vision_transformer(trunk):
            raise ConfigError(
                f"phase.teacher={self.config.teacher}: the teacher ({type(trunk).__name__}) is not a ViT; token "
                "distillation needs ViT tokens (vit_*, deit_*, DINOv2, cifar_deit): distil a CNN teacher with "
                "phase.name=distill instead"
            )
        teacher = trunk if self.config.teacher is None else self._teacher_backbone(trunk)
        student_layers = block_indices(self.config.student_layers, len(backbone.blocks), "student_layers")
        teacher_layers = block_indices(self.config.teacher_layers, len(teacher.blocks), "teacher_layers")
        return TokenDistillModel(backbone, teacher, student_layers, teacher_layers)

    @classmethod
    def check_stage(cls, stages: list[Stage], index: int) -> None:
        # Both architectures are known from the config: built on the meta device (no memory, no weights) to
        # refuse a CNN before any trial starts.
        stage = stages[index]
        config: TokenDistillConfig = stage.phase  # type: ignore[assignment]
        if not vision_transformer(sketch(stage.model)):
            raise ConfigError(
                f"model.name={stage.model.name} is not a ViT; token distillation needs a timm "
                "VisionTransformer student (vit_*, deit_*, cifar_deit)"
            )
        teacher = config.teacher_model or (stages[index - 1].model if config.teacher == PREVIOUS and index else None)
        if teacher is not None and not vision_transformer(sketch(teacher)):
            raise ConfigError(
                f"phase.teacher: the teacher's model ({teacher.name}) is not a ViT; token distillation "
                "needs ViT tokens (vit_*, deit_*, DINOv2, cifar_deit): distil a CNN teacher with "
                "phase.name=distill instead"
            )

    def _teacher_backbone(self, trunk: nn.Module) -> nn.Module:
        # The teacher's tokens come from its backbone (the ViT inside whichever phase trained it).
        phase, module = teacher_module(self.config, self.spec, self.previous, trunk)
        return phase.backbone(module)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits, student, projected = model(x, tokens=True)
        inner = getattr(model, "module", model)
        seen = (
            x
            if self.config.teacher_image_size is None
            else F.interpolate(x, size=self.config.teacher_image_size, mode="bilinear", align_corners=False)
        )
        teacher = inner.teacher_tokens(seen, student[0].shape[1])
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        l_tok = torch.stack([token_representation_loss(p, t) for p, t in zip(projected, teacher)]).mean()
        loss = ce + self.config.tok_weight * l_tok
        extras = {"l_tok": l_tok.detach(), **training_hits(logits, y)}
        if self.epoch >= self.config.rel_start_epoch:  # the staged start: L_tok alone before this epoch
            l_rel = torch.stack(
                [token_relation_loss(s, t, self.config.rel_temperature) for s, t in zip(student, teacher)]
            ).mean()
            loss = loss + self.config.rel_weight * l_rel
            extras["l_rel"] = l_rel.detach()
        return loss, extras

    def classifier(self, model: nn.Module) -> nn.Module:
        return model.student
