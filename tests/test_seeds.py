"""The seed pipelines' parts: CIFAR DeiT-tiny (hybrid embedding, class-token dropout, inference head), a chain
whose stages have their own models (a CNN teacher, then a ViT student), CST token distillation, and the model
zoo at CIFAR size. Real models and training on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from raycls import names
from raycls.cli import main
from raycls.config import ModelConfig, TrialConfig
from raycls.config.schema import TokenDistillConfig
from raycls.errors import ConfigError
from raycls.losses.tokens import match_grid, token_relation_loss, token_representation_loss
from raycls.models import InputSpec, create_model, load_weights, save_weights
from raycls.phases import create_phase
from raycls.train.chain import fit
from raycls.train.loop import RunContext
from tests.conftest import Recorder, write_yaml

CIFAR = InputSpec(num_classes=10, in_chans=3, image_size=32)
DIGITS = InputSpec(num_classes=10, in_chans=1, image_size=8)
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_width": 16}


# ------------------------------------------------------------------------------------ CIFAR DeiT-tiny
def test_cifar_deit_is_the_seeds_deit_tiny() -> None:
    from timm.layers import HybridEmbed

    model = create_model(ModelConfig(name="cifar_deit", drop_path_rate=0.1), CIFAR)
    assert isinstance(model.patch_embed, HybridEmbed) and isinstance(model.patch_embed.backbone[0], torch.nn.Conv2d)
    assert model.patch_embed.grid_size == (8, 8)  # 32 px -> conv stem (stride 2) -> 2 px patches: 64 tokens
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 3 and model.embed_dim == 192
    assert model.blocks[0].mlp.fc1.out_features == 2 * 192  # MLP ratio 2
    assert sum(p.numel() for p in model.parameters()) == 3_648_106
    distilled = create_model(ModelConfig(name="cifar_deit_distilled"), CIFAR)
    assert distilled.num_prefix_tokens == 2 and distilled.pos_embed.shape == (1, 66, 192)
    mnist = create_model(ModelConfig(name="cifar_deit"), InputSpec(num_classes=10, in_chans=1, image_size=28))
    assert mnist.patch_embed.grid_size == (7, 7)


@pytest.mark.parametrize("name", ["cifar_deit", "cifar_deit_distilled"])
def test_class_token_dropout_reads_the_patch_token_mean(name: str) -> None:
    x = torch.randn(4, 1, 8, 8)
    for p, expected in ((1.0, lambda f: f[:, f.shape[1] - 16 :].mean(dim=1)), (0.0, lambda f: f[:, 0])):
        torch.manual_seed(0)
        model = create_model(
            ModelConfig(
                name=name, kwargs={**TINY_VIT, "cls_token_drop": p}, inference_head="class" if "dist" in name else None
            ),
            DIGITS,
        )
        model.train()
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), expected(features))
    model.eval()  # never in evaluation, whatever p
    model.cls_token_drop = 1.0
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, 0])


def test_inference_head_chooses_class_distillation_or_mean() -> None:
    x = torch.randn(3, 1, 8, 8)
    outputs = {}
    for head in ("class", "distill", "mean"):
        torch.manual_seed(0)
        model = create_model(
            ModelConfig(name="cifar_deit_distilled", kwargs=TINY_VIT, inference_head=head), DIGITS
        ).eval()
        outputs[head] = model(x)
    features = model.forward_features(x)
    cls, dist = model.head(features[:, 0]), model.head_dist(features[:, 1])
    torch.testing.assert_close(outputs["class"], cls)
    torch.testing.assert_close(outputs["distill"], dist)
    torch.testing.assert_close(outputs["mean"], (cls + dist) / 2)
    model.train()
    model.set_distilled_training(True)
    both = model(x)
    assert isinstance(both, tuple) and len(both) == 2  # the distill phase's loss sees both heads
    with pytest.raises(ConfigError, match="model.inference_head=class: small_cnn has one head"):
        create_model(ModelConfig(name="small_cnn", inference_head="class"), DIGITS)
    with pytest.raises(ConfigError, match="model.kwargs: depthh not known to cifar_deit"):
        create_model(ModelConfig(name="cifar_deit", kwargs={"depthh": 2}), DIGITS)


# ------------------------------------------------------------------------------- per-stage models
BASE = {
    "data": {"name": "digits", "val_fraction": 0.2},
    "model": {"name": "adaptive_cnn"},
    "train": {"batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0, "epochs": 2},
}
DEIT = {"name": "cifar_deit_distilled", "kwargs": TINY_VIT}


@pytest.mark.slow
def test_a_cnn_teacher_stage_then_a_deit_student_is_one_trial(tmp_path: Path) -> None:
    """Seed 003's two-step job as one trial: AdaptiveCNN supervised, then a DeiT (its own `model`) distilled
    from that stage's best model through its distillation token."""
    config = TrialConfig.model_validate(
        {
            **BASE,
            "phases": [
                {"name": "cnn", "phase": {"name": "supervised"}},
                {
                    "name": "deit",
                    "model": DEIT,
                    "train": {"epochs": 3, "lr": 1e-2},
                    "phase": {"name": "distill", "teacher": "previous", "distill_token": True, "alpha": 0.5},
                },
            ],
        }
    )
    assert [s.model.name for s in config.stages] == ["adaptive_cnn", "cifar_deit_distilled"]
    assert config.final_model.name == "cifar_deit_distilled"
    record = Recorder(tmp_path / "ckpt")
    fit(config, record, RunContext())
    assert [m[names.STAGE] for m in record.metrics] == ["cnn", "cnn", "deit", "deit", "deit"]
    best = max(range(2), key=lambda i: record.metrics[i][names.VAL_ACC])
    taught = load_weights(record.checkpoints[-1])
    cnn = load_weights(record.checkpoints[best])
    for key, value in cnn.items():  # the frozen teacher is the CNN stage's best model, exactly
        assert torch.equal(taught[f"teacher.{key}"], value), key
    assert any(k.startswith("student.blocks.") for k in taught)  # the student is the DeiT, not the CNN
    assert record.metrics[-1][names.VAL_ACC] > 0.3  # chance: 0.1


def test_stages_whose_models_cannot_hand_weights_on_are_refused(tmp_path: Path, capsys) -> None:
    phases = [
        {"name": "cnn", "phase": {"name": "supervised"}},
        {"name": "vit", "model": DEIT, "phase": {"name": "supervised"}},
    ]
    with pytest.raises(
        ValidationError, match=r"phases.1 \(vit\): its model \(cifar_deit_distilled\) differs from stage cnn's"
    ):
        TrialConfig.model_validate({**BASE, "phases": phases})
    space = write_yaml(
        tmp_path / "bad.yaml",
        """
base:
  data: {name: digits}
  model: {name: adaptive_cnn}
  phases:
    - {name: cnn, phase: {name: supervised}}
    - {name: cst, model: {name: cifar_deit}, phase: {name: token_distill, teacher: previous}}
""",
    )
    with pytest.raises(SystemExit) as exit_:
        main(["space", "validate", str(space)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    err = " ".join((captured.out + captured.err).split())  # the console wraps long lines
    assert str(space) in err and "phases.1 (cst)" in err and "the teacher's model (adaptive_cnn) is not a ViT" in err


# ------------------------------------------------------------------------------ token distillation
def test_token_losses_match_hand_computed_values() -> None:
    # L_tok: teacher token [1, 3] standardises to [-1, 1]; a zero projection is 1 away in each coordinate.
    teacher = torch.tensor([[[1.0, 3.0]]])
    assert token_representation_loss(torch.zeros(1, 1, 2), teacher).item() == pytest.approx(1.0, abs=1e-4)
    assert token_representation_loss(torch.tensor([[[-1.0, 1.0]]]), teacher).item() == pytest.approx(0.0, abs=1e-4)
    # L_rel: orthogonal student tokens (similarities [[1, 0], [0, 1]]) against identical teacher tokens
    # (all ones: uniform rows). At tau 1 each row is KL(u || softmax([1, 0])) = ln(e + 1) - 1/2 - ln 2.
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    expected = torch.log(torch.tensor(torch.e + 1.0)).item() - 0.5 - torch.log(torch.tensor(2.0)).item()
    assert token_relation_loss(student, same, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    assert token_relation_loss(student, 5.0 * student, temperature=0.1).item() == pytest.approx(
        0.0, abs=1e-6
    )  # scale-free
    # A 4x4 teacher grid onto 2x2 student tokens: each 2x2 block averaged.
    grid = torch.arange(16.0).view(1, 16, 1)
    assert match_grid(grid, 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert match_grid(torch.ones(1, 4, 3), 16).shape == (1, 16, 3)  # a coarser grid: bilinear upsampling


def token_phase(tmp_path: Path, teacher: ModelConfig, **phase):
    """A token_distill phase over a cifar_deit student, its teacher a checkpoint of `teacher` (random weights)."""
    torch.manual_seed(1)
    saved = tmp_path / "teacher"
    save_weights(create_model(teacher, DIGITS), saved)
    config = TokenDistillConfig(teacher=str(saved), teacher_model=teacher, **phase)
    distill = create_phase(config, DIGITS)
    return distill, distill.build(create_model(ModelConfig(name="cifar_deit", kwargs=TINY_VIT), DIGITS))


def test_token_distill_loss_is_ce_then_the_staged_token_terms(tmp_path: Path) -> None:
    teacher = ModelConfig(name="cifar_deit", kwargs={**TINY_VIT, "embed_dim": 48, "depth": 3})
    phase, model = token_phase(
        tmp_path,
        teacher,
        student_layers=[0, -1],
        teacher_layers=[1, 2],
        rel_start_epoch=1,
        tok_weight=1.0,
        rel_weight=0.1,
    )
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    model.eval()  # no class-token dropout: the manual pass must see the same tokens

    def manual(epoch: int) -> torch.Tensor:
        final, blocks = model.student.forward_intermediates(x, indices=[0, 1], output_fmt="NLC")
        taught = model.teacher.forward_intermediates(x, indices=[1, 2], output_fmt="NLC", intermediates_only=True)
        loss = F.cross_entropy(model.student.forward_head(final), y)
        loss = (
            loss
            + torch.stack(
                [token_representation_loss(p(s), t) for p, s, t in zip(model.projections, blocks, taught)]
            ).mean()
        )
        if epoch >= 1:
            loss = loss + 0.1 * torch.stack([token_relation_loss(s, t, 0.1) for s, t in zip(blocks, taught)]).mean()
        return loss

    for epoch in (0, 1):
        phase.begin_epoch(epoch)
        loss, extras = phase.loss(model, (x, y))
        torch.testing.assert_close(loss, manual(epoch))
        assert ("l_rel" in extras) == (epoch >= 1)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projections.parameters())
    assert model.projections[0].in_features == 32 and model.projections[0].out_features == 48


def test_a_dinov2_teacher_at_its_own_resolution(tmp_path: Path) -> None:
    """DINOv2's ViT-S/14 architecture (timm's; random weights offline) sees the images resized to 56 px: a 4x4
    token grid, upsampled onto the student's."""
    teacher = ModelConfig(name="vit_small_patch14_dinov2", kwargs={"img_size": 56}, small_input="off")
    phase, model = token_phase(tmp_path, teacher, teacher_image_size=56)
    assert model.teacher_layers == [5, 11] and model.student_layers == [0, 1]  # the middle block and the last
    loss, extras = phase.loss(model.train(), (torch.randn(4, 1, 8, 8), torch.arange(4)))
    assert torch.isfinite(loss) and extras["l_tok"] > 0 and extras["l_rel"] >= 0


def test_token_distill_needs_vits_and_a_teacher() -> None:
    with pytest.raises(ValidationError, match="token_distill needs a teacher"):
        TokenDistillConfig()
    with pytest.raises(ValidationError, match="give both, of the same length"):
        TokenDistillConfig(teacher="previous", student_layers=[1, 2], teacher_layers=[3])
    cnn = create_phase(TokenDistillConfig(teacher_model=ModelConfig(name="cifar_deit", pretrained=True)), DIGITS)
    with pytest.raises(ConfigError, match=r"the student \(AdaptiveCNN\) is not a ViT"):
        cnn.build(create_model(ModelConfig(name="adaptive_cnn"), DIGITS))


@pytest.mark.slow
def test_cst_from_a_vit_stage_learns_digits(tmp_path: Path) -> None:
    """A ViT teacher stage, then a distilled DeiT learning its tokens (L_rel from the second epoch)."""
    config = TrialConfig.model_validate(
        {
            **BASE,
            "model": {"name": "cifar_deit", "kwargs": {**TINY_VIT, "embed_dim": 48}},
            "phases": [
                {"name": "vit", "phase": {"name": "supervised"}},
                {
                    "name": "cst",
                    "model": DEIT,
                    "train": {"epochs": 3, "lr": 1e-2},
                    "phase": {"name": "token_distill", "teacher": "previous", "rel_start_epoch": 1},
                },
            ],
        }
    )
    record = Recorder(tmp_path / "ckpt")
    fit(config, record, RunContext())
    assert [m[names.STAGE] for m in record.metrics] == ["vit", "vit", "cst", "cst", "cst"]
    taught = load_weights(record.checkpoints[-1])
    assert taught["projections.0.weight"].shape == (48, 32)  # student width 32 -> teacher width 48
    assert record.metrics[-1][names.VAL_ACC] > 0.3  # chance: 0.1


# ------------------------------------------------------------------------------------- model zoo
ZOO = [
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "vit_tiny_patch16_224",
    "vit_base_patch16_224",
    "deit_tiny_patch16_224",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_the_seed_zoo_trains_at_cifar_size(name: str) -> None:
    """Each of the seed's eight models from scratch at 32 px: one forward and backward, logits per class."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name), CIFAR).train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ review fixes
def test_a_stage_model_field_in_the_space_inherits_the_trials_model() -> None:
    """`phases.distill.model.drop_rate` on a stage without a model of its own changes that stage's copy of the
    trial's model (not a default small_cnn), and dropout does not stop the weights being handed over."""
    from raycls.config import load_experiment, resolve_trial
    from raycls.phases.base import Previous
    from tests.conftest import REPO

    experiment = load_experiment(
        REPO / "search_spaces" / "pipeline-digits.yaml", {"phases.distill.model.drop_rate": 0.2}
    )
    config = resolve_trial(experiment)
    arcface, distill = config.stages[1].model, config.stages[2].model
    assert (distill.name, distill.width, distill.drop_rate) == (arcface.name, arcface.width, 0.2)
    assert Previous.of(config.stages, 2, None).model is None  # same architecture: the hand-over happens


def test_a_distilled_stage_teaches_the_next_with_its_student(tmp_path: Path) -> None:
    """cnn > deit (distilled from the cnn) > cst (token-distilled from the deit): the third stage's teacher
    is the second stage's student, rebuilt without that stage's own teacher."""
    from raycls.phases.base import Previous
    from raycls.train.loop import build, load_data

    config = TrialConfig.model_validate(
        {
            **BASE,
            "phases": [
                {"name": "cnn", "phase": {"name": "supervised"}},
                {
                    "name": "deit",
                    "model": DEIT,
                    "phase": {"name": "distill", "teacher": "previous", "distill_token": True},
                },
                {"name": "cst", "model": DEIT, "phase": {"name": "token_distill", "teacher": "previous"}},
            ],
        }
    )
    data, stages = load_data(config), config.stages
    cnn = build(config, stages[0], data, RunContext()).model.state_dict()
    deit = build(config, stages[1], data, RunContext(), index=1, previous=Previous.of(stages, 1, cnn)).model
    cst = build(
        config, stages[2], data, RunContext(), index=2, previous=Previous.of(stages, 2, deit.state_dict())
    ).model
    for key, value in deit.student.state_dict().items():
        assert torch.equal(cst.teacher.state_dict()[key], value), key


def test_token_pairs_follow_the_configs_order() -> None:
    """timm returns the blocks asked for in block order; `student_layers: [1, 0]` pairs block 1 first."""
    from raycls.phases.token_distill import in_config_order

    blocks = [torch.zeros(1), torch.ones(1)]  # blocks 0 and 1, as timm returns them
    assert [int(t) for t in in_config_order(blocks, [1, 0, 1])] == [1, 0, 1]


def test_rebuilding_a_trials_model_downloads_nothing() -> None:
    from raycls.train.evaluation import without_downloads

    config = TrialConfig.model_validate(
        {
            "model": {"name": "resnet50", "pretrained": True},
            "phase": {
                "name": "token_distill",
                "teacher_model": {"name": "vit_small_patch14_dinov2.lvd142m", "pretrained": True},
            },
        }
    )
    stage = without_downloads(config.stages[0])
    assert not stage.model.pretrained and not stage.phase.teacher_model.pretrained
    assert stage.model.name == "resnet50" and stage.phase.teacher_model.name == "vit_small_patch14_dinov2.lvd142m"


@pytest.mark.slow
def test_resuming_the_deit_stage_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """A CNN > DeiT chain whose CNN starts from `init:` weights, resumed mid-way through the DeiT stage: the
    checkpoint holds the stage whole (its teacher too), and the resumed epoch equals the uninterrupted one."""
    from raycls.models import save_weights as save

    torch.manual_seed(3)
    save(create_model(ModelConfig(name="adaptive_cnn"), DIGITS), tmp_path / "init")
    # No class-token dropout: its draws come from the global RNG, which a resumed run does not restore.
    deit = {**DEIT, "kwargs": {**TINY_VIT, "cls_token_drop": 0.0}}
    config = TrialConfig.model_validate(
        {
            **BASE,
            "init": str(tmp_path / "init"),
            "phases": [
                {"name": "cnn", "phase": {"name": "supervised"}},
                {
                    "name": "deit",
                    "model": deit,
                    "phase": {"name": "distill", "teacher": "previous", "distill_token": True},
                },
            ],
        }
    )
    whole = Recorder(tmp_path / "whole")
    fit(config, whole, RunContext())
    resumed = Recorder(tmp_path / "resumed")
    fit(config, resumed, RunContext(resume_from=whole.checkpoints[2]))  # after the DeiT's first epoch
    assert [m[names.EPOCH] for m in resumed.metrics] == [4]
    for key in (names.TRAIN_LOSS, names.VAL_ACC, "cnn.val_acc"):
        assert resumed.metrics[0][key] == pytest.approx(whole.metrics[3][key], rel=1e-6, abs=1e-9), key
