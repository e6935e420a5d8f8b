"""Issue 31's recipe options for pipeline 000: backbone modules (CBAM, ToMe, TokenLearner, MixStyle), ViT and
hidden-feature mixing (TokenMix, MixToken, manifold mixup), the torch lr schedules (step, multistep,
cosine_restarts, onecycle, plateau), the CIFAR-100 reader and progressive unfreezing. Tiny models, small
images: each test is a real forward / backward pass or a real torch scheduler, nothing mocked."""

from __future__ import annotations

import pytest
import torch

from raycls.config import TrainConfig
from raycls.optim import LR_SCHEDULES, create_lr_schedule, end_epoch

SPE = 3  # batches per epoch in the schedule tests


def _one_param_optimizer(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lr_at_epoch_starts(config: TrainConfig, epochs: int, metric_values: list[float] | None = None) -> list[float]:
    """Our schedule driven as the training loop drives it: step() after each batch, end_epoch after each epoch."""
    opt = _one_param_optimizer(config.lr)
    schedule = create_lr_schedule(config, opt, steps_per_epoch=SPE, metric="val_acc")
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(SPE):
            opt.step()
            schedule.step()
        if metric_values is not None:
            end_epoch(schedule, {"val_acc": metric_values[epoch]})
    return lrs


def _torch_per_epoch(make, epochs: int, lr: float = 1.0, metric_values: list[float] | None = None) -> list[float]:
    """torch's scheduler stepped once per epoch, as its documentation drives it."""
    opt = _one_param_optimizer(lr)
    scheduler = make(opt)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step(metric_values[epoch]) if metric_values is not None else scheduler.step()
    return lrs


def test_new_schedules_are_registered() -> None:
    assert {"step", "multistep", "cosine_restarts", "onecycle", "plateau"} <= set(LR_SCHEDULES.names())


def test_step_schedule_matches_torch_steplr_per_epoch() -> None:
    config = TrainConfig(scheduler="step", epochs=10, lr=0.5, lr_schedule={"step_epochs": 3, "gamma": 0.5})
    ours = _lr_at_epoch_starts(config, 10)
    theirs = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 10, lr=0.5)
    assert ours == pytest.approx(theirs)
    assert ours[:4] == pytest.approx([0.5, 0.5, 0.5, 0.25])


def test_multistep_schedule_matches_torch_and_defaults_to_half_and_three_quarters() -> None:
    config = TrainConfig(scheduler="multistep", epochs=8, lr=1.0, lr_schedule={"milestones": [2, 5], "gamma": 0.1})
    theirs = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1), 8)
    assert _lr_at_epoch_starts(config, 8) == pytest.approx(theirs)
    default = _lr_at_epoch_starts(TrainConfig(scheduler="multistep", epochs=8, lr=1.0), 8)
    assert default == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])  # drops at epochs 4 and 6


def test_cosine_restarts_matches_torch_at_epoch_starts_and_restarts() -> None:
    config = TrainConfig(
        scheduler="cosine_restarts",
        epochs=9,
        lr=1.0,
        min_lr_ratio=0.1,
        lr_schedule={"restart_epochs": 2, "restart_mult": 2},
    )
    make = lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=0.1)  # noqa: E731
    ours, theirs = _lr_at_epoch_starts(config, 9), _torch_per_epoch(make, 9)
    assert ours == pytest.approx(theirs)
    assert ours[0] == ours[2] == ours[6] == pytest.approx(1.0)  # restarts after 2, then 2 + 4 epochs


def test_cosine_restarts_moves_within_an_epoch_as_fractional_epoch_stepping() -> None:
    """torch documents `scheduler.step(epoch + i / iters)` for per-batch use: our per-batch lr is that one."""
    config = TrainConfig(scheduler="cosine_restarts", epochs=4, lr=1.0, lr_schedule={"restart_epochs": 2})
    opt = _one_param_optimizer()
    ours = create_lr_schedule(config, opt, steps_per_epoch=SPE)
    ref_opt = _one_param_optimizer()
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=2)
    for i in range(4 * SPE):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        opt.step(), ref_opt.step()
        ours.step()
        ref.step((i + 1) / SPE)


def test_onecycle_follows_torch_onecycle_and_its_rise_is_the_warmup() -> None:
    config = TrainConfig(scheduler="onecycle", epochs=5, lr=0.4, warmup_epochs=1)
    opt = _one_param_optimizer(0.4)
    ours = create_lr_schedule(config, opt, steps_per_epoch=SPE)
    ref_opt = _one_param_optimizer(0.4)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.4, total_steps=5 * SPE, pct_start=0.2)
    lrs = []
    for _ in range(5 * SPE):
        lrs.append(opt.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(ref_opt.param_groups[0]["lr"])
        opt.step(), ref_opt.step()
        ours.step(), ref.step()
    assert lrs[0] == pytest.approx(0.4 / 25) and max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == SPE - 1
    assert lrs[-1] < lrs[0]


def test_plateau_reduces_after_patience_epochs_without_improvement_in_the_metrics_mode() -> None:
    accuracies = [0.5, 0.6, 0.6, 0.59, 0.6, 0.58, 0.7, 0.7, 0.7, 0.7]
    config = TrainConfig(scheduler="plateau", epochs=10, lr=1.0, lr_schedule={"patience": 2, "factor": 0.5})
    make = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(  # noqa: E731
        o, mode="max", factor=0.5, patience=2, threshold=0.0, threshold_mode="abs"
    )
    ours = _lr_at_epoch_starts(config, 10, accuracies)
    assert ours == pytest.approx(_torch_per_epoch(make, 10, metric_values=accuracies))
    assert ours == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5])  # val_acc is maximised (ranking.py)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.8]  # val_loss is minimised: the same code, the other mode
    opt = _one_param_optimizer()
    schedule = create_lr_schedule(config, opt, steps_per_epoch=1, metric="val_loss")
    seen = []
    for value in losses:
        seen.append(opt.param_groups[0]["lr"])
        schedule.step()
        end_epoch(schedule, {"val_loss": value})
    assert seen == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5])


def test_warmup_before_a_torch_schedule_ramps_linearly_then_hands_over() -> None:
    config = TrainConfig(
        scheduler="step", epochs=6, lr=1.0, warmup_epochs=1, lr_schedule={"step_epochs": 2, "gamma": 0.5}
    )
    opt = _one_param_optimizer()
    schedule = create_lr_schedule(config, opt, steps_per_epoch=SPE)
    lrs = []
    for _ in range(6 * SPE):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:SPE] == pytest.approx([1 / 3, 2 / 3, 1.0])  # (step + 1) / warm-up steps, like the cosine's
    assert lrs[SPE : 3 * SPE] == pytest.approx([1.0] * 2 * SPE) and lrs[3 * SPE] == pytest.approx(0.5)


def test_schedule_state_round_trips_for_resume() -> None:
    config = TrainConfig(scheduler="plateau", epochs=6, lr=1.0, lr_schedule={"patience": 0})
    opt = _one_param_optimizer()
    schedule = create_lr_schedule(config, opt, steps_per_epoch=1, metric="val_acc")
    for value in (0.5, 0.4):
        schedule.step()
        end_epoch(schedule, {"val_acc": value})
    state, lr = schedule.state_dict(), opt.param_groups[0]["lr"]
    opt2 = _one_param_optimizer()
    opt2.load_state_dict(opt.state_dict())
    again = create_lr_schedule(config, opt2, steps_per_epoch=1, metric="val_acc")
    again.load_state_dict(state)
    end_epoch(again, {"val_acc": 0.3})
    end_epoch(schedule, {"val_acc": 0.3})
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(lr * 0.1)


def test_unknown_schedule_names_the_key_and_the_known_ones() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        TrainConfig(scheduler="cosine_warm")
    text = str(info.value)
    assert "scheduler" in text and "cosine_restarts" in text and "onecycle" in text and "plateau" in text


# ------------------------------------------------------------------------------------------------ CIFAR-100
def _write_cifar100(folder, *, n_train: int = 30, n_test: int = 10, protocol: int = 2) -> dict:
    """A tiny CIFAR-100 in the published python format: pickled dicts with 'data' (uint8 [N, 3072], channel
    planes one after another), 'fine_labels', 'coarse_labels'; 'meta' with 'fine_label_names'."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": [(i * 37) % 100 for i in range(n)],  # every class equally often, not in order
            "coarse_labels": [int(i % 20) for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=protocol))
        written[split] = entry
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar100_reader_on_a_file_in_its_format(tmp_path, protocol: int) -> None:
    from raycls.config import DataConfig
    from raycls.data.datasets import read_cifar100

    written = _write_cifar100(tmp_path / "cifar100" / "cifar-100-python", protocol=protocol)
    raw = read_cifar100(DataConfig(name="cifar100", download=False), tmp_path)
    assert raw.train is not None and raw.test is not None
    assert raw.train.images.shape == (30, 3, 32, 32) and raw.test.images.shape == (10, 3, 32, 32)
    # Row 5's first 1024 bytes are its red plane, row-major: pixel (2, 3) is byte 2 * 32 + 3.
    data = written["train"]["data"]
    assert int(raw.train.images[5, 0, 2, 3]) == int(data[5, 2 * 32 + 3])
    assert int(raw.train.images[5, 2, 31, 31]) == int(data[5, 2048 + 1023])
    assert raw.train.labels.tolist() == written["train"]["fine_labels"]  # fine labels, not coarse
    assert raw.test.labels.tolist() == written["test"]["fine_labels"]
    assert len(raw.train.classes) == 100 and raw.train.classes[7] == "class_07"


def test_cifar100_through_load_splits_and_missing_files_error(tmp_path) -> None:
    from raycls.config import DataConfig
    from raycls.data import load_splits
    from raycls.errors import DataError

    _write_cifar100(tmp_path / "cifar100" / "cifar-100-python", n_train=300)
    splits = load_splits(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.1, download=False), seed=0)
    assert splits.num_classes == 100 and len(splits.train) + len(splits.val) == 300
    assert splits.test is not None and len(splits.test) == 10
    with pytest.raises(DataError, match=r"train, test, meta not found under .*cifar-100-python.*download is false"):
        load_splits(DataConfig(name="cifar100", root=str(tmp_path / "empty"), download=False), seed=0)


def test_cifar100_reader_refuses_a_pickle_that_would_run_code(tmp_path) -> None:
    import os
    import pickle

    from raycls.config import DataConfig
    from raycls.data.datasets import read_cifar100
    from raycls.errors import DataError

    folder = tmp_path / "cifar100"
    _write_cifar100(folder)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": os.getcwd}))  # a global outside the allowed
    with pytest.raises(DataError, match="posix.getcwd is not allowed|getcwd is not allowed"):
        read_cifar100(DataConfig(name="cifar100", download=False), tmp_path)


# ------------------------------------------------------------------------------------ progressive unfreezing
def _grad_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_progressive_unfreezing_thaws_a_resnet_block_by_block_from_the_top() -> None:
    from raycls.config.schema import ModelConfig, UnfreezeConfig
    from raycls.models import InputSpec, create_model
    from raycls.train.freeze import ProgressiveUnfreezing

    model = create_model(ModelConfig(name="resnet18"), InputSpec(num_classes=10, in_chans=3, image_size=32))
    policy = ProgressiveUnfreezing(model, UnfreezeConfig())
    assert len(policy.blocks) == 9  # the stem and resnet18's eight basic blocks; the fc is the head
    policy.at_epoch(0)
    assert _grad_names(model) == {"fc.weight", "fc.bias"}
    policy.at_epoch(1)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in _grad_names(model) - {"fc.weight", "fc.bias"}} == {
        "layer4.1"
    }
    frozen = policy.at_epoch(2)
    thawed = {".".join(n.split(".")[:2]) for n in _grad_names(model) - {"fc.weight", "fc.bias"}}
    assert thawed == {"layer4.0", "layer4.1"}
    assert model.layer4[0].bn1 not in frozen and model.layer3[1].bn1 in frozen  # frozen BNs are kept in eval
    policy.at_epoch(100)
    assert _grad_names(model) == {n for n, _ in model.named_parameters()}


def test_progressive_unfreezing_paces_by_every_and_blocks_on_a_vit() -> None:
    from raycls.config.schema import ModelConfig, UnfreezeConfig
    from raycls.models import InputSpec, create_model
    from raycls.train.freeze import ProgressiveUnfreezing

    config = ModelConfig(name="vit_tiny_patch16_224", kwargs={"depth": 3})
    model = create_model(config, InputSpec(num_classes=5, in_chans=3, image_size=32))
    policy = ProgressiveUnfreezing(model, UnfreezeConfig(every=2, blocks=2))
    blocks = lambda names: sorted({n.split(".")[1] for n in names if n.startswith("blocks.")})  # noqa: E731
    policy.at_epoch(0)
    assert _grad_names(model) == {"head.weight", "head.bias"}
    policy.at_epoch(1)
    assert _grad_names(model) == {"head.weight", "head.bias"}  # every: 2 epochs per step
    policy.at_epoch(2)
    assert blocks(_grad_names(model)) == ["1", "2"] and "norm.weight" in _grad_names(model)
    policy.at_epoch(4)
    names = _grad_names(model)
    assert blocks(names) == ["0", "1", "2"] and "cls_token" in names and "patch_embed.proj.weight" in names


@pytest.mark.slow
def test_progressive_unfreezing_in_a_training_run(tmp_path) -> None:
    """Through the training loop: trainable_params grows each epoch, and the stem only moves once thawed."""
    from raycls.config import TrialConfig
    from raycls.train import run_local

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 400},
            "model": {"name": "small_cnn", "width": 8},
            "train": {
                "epochs": 3,
                "batch_size": 64,
                "optimizer": "adamw",
                "lr": 3e-3,
                "freeze": "progressive",
                "unfreeze": {"blocks": 2},
            },
        }
    )
    history = []
    run_local(config, tmp_path, device=torch.device("cpu"), on_epoch=history.append)
    counts = [h["trainable_params"] for h in history]
    assert counts[0] < counts[1] < counts[2] and all(h["train_loss"] == h["train_loss"] for h in history)


# ------------------------------------------------------------------------------------------ model modules
SPEC = None


def _spec(num_classes: int = 10):
    from raycls.models import InputSpec

    return InputSpec(num_classes=num_classes, in_chans=3, image_size=32)


def _build(name: str, modules: dict, **kwargs):
    from raycls.config.schema import ModelConfig
    from raycls.models import create_model

    torch.manual_seed(0)
    return create_model(ModelConfig(name=name, kwargs=kwargs, modules=modules), _spec())


TINY_VIT = {"depth": 3, "embed_dim": 48, "num_heads": 2}


def _train_step(model: torch.nn.Module, *, batch: int = 6) -> tuple[float, dict[str, torch.Tensor | None]]:
    """One real SGD step on random images; returns the loss and each parameter's gradient."""
    model.train()
    x, y = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    optimizer.step()
    return float(loss.detach()), grads


def test_model_modules_are_registered_and_validated_by_name() -> None:
    from pydantic import ValidationError

    from raycls.config.schema import ModelConfig
    from raycls.models.modules import MODEL_MODULES

    assert {"cbam", "mixstyle", "tome", "token_learner"} <= set(MODEL_MODULES.names())
    with pytest.raises(ValidationError) as info:
        ModelConfig(name="resnet18", modules={"cbma": {}})
    text = str(info.value)
    assert "modules" in text and "cbma" in text and "cbam, mixstyle, token_learner, tome" in text
    with pytest.raises(ValidationError, match=r"modules\.mixstyle\.q: Extra inputs"):
        ModelConfig(name="resnet18", modules={"mixstyle": {"q": 1}})
    with pytest.raises(ValidationError, match="tome and token_learner both change the token count"):
        ModelConfig(name="vit_tiny_patch16_224", modules={"tome": {}, "token_learner": {}})
    ModelConfig(name="vit_tiny_patch16_224", modules={"tome": {}, "token_learner": {"enabled": False}})


def test_a_bad_module_name_in_a_space_names_the_key(tmp_path) -> None:
    from raycls.config.load import load_experiment
    from raycls.errors import ConfigError

    space = tmp_path / "space.yaml"
    space.write_text("base:\n  model: {name: resnet18, modules: {cbam: {}, tokenmerge: {}}}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(space)
    assert "base.model.modules" in str(info.value) and "tokenmerge" in str(info.value) and "tome" in str(info.value)


def test_cbam_on_each_resnet_stage_keeps_shapes_and_trains() -> None:
    model = _build("resnet18", {"cbam": {"reduction": 8}})
    attached = dict(model.model_modules.named_children())
    assert sorted(attached) == ["cbam_layer1", "cbam_layer2", "cbam_layer3", "cbam_layer4"]
    plain = _build("resnet18", {})
    assert set(plain.state_dict()) < set(model.state_dict())  # the backbone's keys are untouched
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == plain.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    loss, grads = _train_step(model)
    assert loss == loss and loss < 1e3
    for name in (
        "model_modules.cbam_layer1.cbam.channel.fc1.weight",
        "model_modules.cbam_layer4.cbam.spatial.conv.conv.weight",
        "conv1.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_cbam_changes_what_a_stage_outputs() -> None:
    model = _build("resnet18", {"cbam": {"stages": [0]}}).eval()
    plain = _build("resnet18", {}).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("model_modules")})
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model(x), plain(x))
    with pytest.raises(Exception, match=r"model.modules.cbam.stages: \[7\] out of range"):
        _build("resnet18", {"cbam": {"stages": [7]}})
    with pytest.raises(Exception, match="model.modules.cbam: needs a CNN"):
        _build("vit_tiny_patch16_224", {"cbam": {}}, **TINY_VIT)


def test_mixstyle_mixes_statistics_in_training_and_is_off_at_eval() -> None:
    from raycls.models.modules import MixStyle, MixStyleOptions

    mix = MixStyle(MixStyleOptions(p=1.0, alpha=0.3))
    x = torch.randn(8, 4, 5, 5) * torch.arange(1, 9.0).view(8, 1, 1, 1) + torch.arange(8.0).view(8, 1, 1, 1)
    mix.train()
    torch.manual_seed(1)
    out = mix(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    # Each image keeps its own normalised content: its standardised map is unchanged.
    standard = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(standard(out), standard(x), atol=1e-3)
    # Its new mean lies between its own and another image's: within the batch's range.
    means = out.mean((2, 3))
    assert (means >= x.mean((2, 3)).min() - 1e-4).all() and (means <= x.mean((2, 3)).max() + 1e-4).all()
    mix.eval()
    assert torch.equal(mix(x), x)


def test_mixstyle_on_a_resnet_is_identity_at_eval_and_trains() -> None:
    model = _build("resnet18", {"mixstyle": {"p": 1.0}})
    plain = _build("resnet18", {})
    plain.load_state_dict(model.state_dict())  # mixstyle has no weights
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    model.train(), plain.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), plain(x))  # in training the statistics are mixed
    loss, grads = _train_step(model)
    assert loss == loss and grads["conv1.weight"].abs().sum() > 0


def test_tome_merges_r_tokens_per_block_and_trains() -> None:
    model = _build("vit_tiny_patch16_224", {"tome": {"r": 8}}, **TINY_VIT)
    assert model.patch_embed.num_patches == 64  # 32 px, the small-input 4 px patch
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 64 - 3 * 8, 48)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = _build("vit_tiny_patch16_224", {}, **TINY_VIT)
    assert list(plain.state_dict()) == list(model.state_dict())  # the blocks keep their keys
    loss, grads = _train_step(model)
    assert loss == loss and grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["blocks.2.mlp.fc1.weight"].abs().sum() > 0


def test_tome_with_r_0_would_be_the_plain_vit_and_merging_keeps_sizes() -> None:
    """The ToMe forward with nothing to merge is timm's Block forward (proportional attention with sizes 1
    adds log 1 = 0); merging conserves the patches each token stands for and averages by size."""
    from raycls.models.modules import bipartite_merge

    model = _build("vit_tiny_patch16_224", {"tome": {"r": 1}}, **TINY_VIT).eval()
    plain = _build("vit_tiny_patch16_224", {}, **TINY_VIT).eval()
    model.blocks.r = 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    tokens = torch.randn(3, 10, 6)
    size = torch.rand(3, 10, 1) + 0.5
    merge = bipartite_merge(tokens, 3)
    assert merge(size).shape == (3, 7, 1) and torch.allclose(merge(size).sum(1), size.sum(1))
    same = torch.ones(3, 10, 6) * 2.0
    assert torch.allclose(merge(same * size) / merge(size), torch.full((3, 7, 6), 2.0))


def test_token_learner_replaces_patch_tokens_and_trains() -> None:
    model = _build("vit_tiny_patch16_224", {"token_learner": {"tokens": 5, "after": 0.34}}, **TINY_VIT)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 1 + 5, 48)
    assert model(x).shape == (2, 10)
    loss, grads = _train_step(model)
    assert loss == loss
    assert grads["model_modules.token_learner.maps.2.weight"].abs().sum() > 0  # the learner learns
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0  # and the blocks before it still do
    with pytest.raises(Exception, match="token_learner.tokens: 64 must be fewer than the 64 patch tokens"):
        _build("vit_tiny_patch16_224", {"token_learner": {"tokens": 64}}, **TINY_VIT)


def test_modules_survive_deepcopy_for_weight_averages() -> None:
    """EMA / SWA deep-copy the model: the copy's hooks must run the copy's modules, not the original's."""
    import copy

    model = _build("resnet18", {"cbam": {"stages": [3]}}).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    before = twin(x)
    with torch.no_grad():
        model.model_modules.cbam_layer4.cbam.channel.fc1.weight.mul_(5.0)
    assert torch.allclose(twin(x), before) and not torch.allclose(model(x), before)


# ------------------------------------------------------------------------------------------------- mixing
def _mixer(name: str, num_classes: int = 10, smoothing: float = 0.0, **options):
    from raycls.config.schema import MixConfig
    from raycls.phases.mixing import MIXERS

    return MIXERS.get(name)(MixConfig(name=name, **options), num_classes, smoothing)


def _check_targets(mixed, y: torch.Tensor, num_classes: int = 10) -> None:
    """Soft targets: lam on each image's label, 1 - lam on its partner's (the batch reversed), summing to 1."""
    assert torch.allclose(mixed.soft.sum(-1), torch.ones(len(y)))
    assert torch.equal(mixed.partners, y.flip(0))
    expected = mixed.lam * torch.nn.functional.one_hot(y, num_classes) + (1 - mixed.lam) * torch.nn.functional.one_hot(
        y.flip(0), num_classes
    )
    assert torch.allclose(mixed.soft, expected.float(), atol=1e-6)


def test_mixers_are_registered_and_the_mix_key_is_validated() -> None:
    from pydantic import ValidationError

    from raycls.config.schema import DistillConfig, MetricConfig, SupervisedConfig
    from raycls.phases.mixing import MIXERS

    assert {"mixup", "cutmix", "tokenmix", "mixtoken", "manifold_mixup"} <= set(MIXERS.names())
    with pytest.raises(ValidationError) as info:
        SupervisedConfig(mix={"name": "token_mix"})
    assert "mix.name" in str(info.value) and "tokenmix" in str(info.value) and "manifold_mixup" in str(info.value)
    with pytest.raises(ValidationError, match="mix: tokenmix and mixup_alpha / cutmix_alpha are both set"):
        MetricConfig(loss="arcface", mixup_alpha=0.2, mix={"name": "tokenmix"})
    with pytest.raises(ValidationError, match="manifold_mixup mixes the student's hidden features"):
        DistillConfig(teacher=None, mix={"name": "manifold_mixup"})
    DistillConfig(teacher=None, mix={"name": "tokenmix"})


def test_tokenmix_swaps_whole_token_cells_and_weights_labels_by_their_share() -> None:
    torch.manual_seed(0)
    import numpy as np

    np.random.seed(0)
    vit = _build("vit_tiny_patch16_224", {}, **TINY_VIT)  # 8x8 patches of 4 px
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    mixed = _mixer("tokenmix", alpha=1.0)(x, y, vit)
    _check_targets(mixed, y)
    from_partner = (mixed.images == x.flip(0)).all(dim=1) & (mixed.images != x).any(dim=1)  # [B, H, W]
    cells = from_partner.view(6, 8, 4, 8, 4)
    assert (cells.all(dim=(2, 4)) == cells.any(dim=(2, 4))).all()  # whole 4 px cells, never a part of one
    assert float(from_partner[0].float().mean()) == pytest.approx(1 - mixed.lam)
    assert 0.0 < mixed.lam < 1.0


def test_mixtoken_mixes_the_patch_embeddings_inside_the_forward_pass() -> None:
    import numpy as np

    np.random.seed(3)
    torch.manual_seed(0)
    vit = _build("vit_tiny_patch16_224", {}, **TINY_VIT).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    mixed = _mixer("mixtoken")(x, y, vit)
    _check_targets(mixed, y)
    assert torch.equal(mixed.images, x) and 0.0 < mixed.lam < 1.0  # pixels untouched: tokens are mixed
    clean = vit.patch_embed(x)
    seen = []
    with mixed.inside:
        handle = vit.patch_embed.register_forward_hook(lambda m, i, out: seen.append(out))  # runs after the mix
        mixed_logits = vit(x)
        handle.remove()
    tokens = seen[0]
    from_partner = (tokens - clean.flip(0)).abs().amax(-1) < 1e-6
    assert float(from_partner[0].float().mean()) == pytest.approx(1 - mixed.lam)
    assert not torch.allclose(mixed_logits, vit(x))
    assert torch.equal(vit.patch_embed(x), clean)  # the hook is gone after the mixed pass
    with pytest.raises(Exception, match="mixtoken needs a ViT"):
        _mixer("mixtoken")(x, y, _build("resnet18", {}))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_manifold_mixup_mixes_one_hidden_layers_output(name: str) -> None:
    import numpy as np

    model = _build(name, {}, **({} if name == "resnet18" else TINY_VIT)).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    mixer = _mixer("manifold_mixup", alpha=2.0)
    from raycls.phases.mixing import mixing_points

    points = mixing_points(model)
    assert len(points) == (4 if name == "resnet18" else 3)
    for seed in range(20):  # until a hidden layer is drawn (0 is the input)
        np.random.seed(seed)
        mixed = mixer(x, y, model)
        if torch.equal(mixed.images, x) and mixed.lam < 1.0:
            break
    _check_targets(mixed, y)
    outputs: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, p in enumerate(points)]
    model(x)
    clean = dict(outputs)
    with mixed.inside:
        later = [p.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, p in enumerate(points)]
        model(x)
    for h in handles + later:
        h.remove()
    hit = [k for k in clean if not torch.allclose(outputs[k], clean[k])]
    first = hit[0]  # the mixed layer: its output is lam * h + (1 - lam) * h reversed; the later ones follow from it
    lam = mixed.lam
    assert torch.allclose(outputs[first], lam * clean[first] + (1 - lam) * clean[first].flip(0), atol=1e-5)


@pytest.mark.parametrize(
    ("mix", "model"),
    [("tokenmix", "vit"), ("mixtoken", "vit"), ("manifold_mixup", "vit"), ("manifold_mixup", "cnn")],
)
def test_a_training_step_with_each_mixer(mix: str, model: str) -> None:
    """Through the supervised phase's loss (the soft cross-entropy of the mixed batch): finite, and the
    gradients reach the first layer."""
    from raycls.config.schema import SupervisedConfig
    from raycls.phases import create_phase

    torch.manual_seed(0)
    phase = create_phase(SupervisedConfig(mix={"name": mix, "alpha": 1.0}, label_smoothing=0.1), _spec())
    backbone = _build("vit_tiny_patch16_224", {}, **TINY_VIT) if model == "vit" else _build("resnet18", {})
    net = phase.build(backbone)
    net.train()
    loss, _ = phase.loss(net, (torch.rand(6, 3, 32, 32), torch.arange(6)))
    loss.backward()
    first = backbone.patch_embed.proj.weight if model == "vit" else backbone.conv1.weight
    assert torch.isfinite(loss) and first.grad is not None and first.grad.abs().sum() > 0


def test_metric_phase_takes_a_hidden_mix_with_both_labels() -> None:
    from raycls.config.schema import MetricConfig
    from raycls.phases import create_phase

    torch.manual_seed(0)
    phase = create_phase(MetricConfig(loss="arcface", mix={"name": "manifold_mixup"}), _spec())
    net = phase.build(_build("resnet18", {}))
    loss, _ = phase.loss(net, (torch.rand(6, 3, 32, 32), torch.arange(6)))
    loss.backward()
    assert torch.isfinite(loss) and net.backbone.conv1.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- searchable keys
SPACE = """
base:
  data: {name: digits}
  model: {name: vit_tiny_patch16_224, kwargs: {depth: 2}, modules: {tome: {r: 2}}}
  phase: {name: supervised, mix: {name: tokenmix}}
  train: {epochs: 6, scheduler: cosine}
space:
  model.modules.tome.r: {type: int, low: 1, high: 4}
  model.modules.tome.enabled: {type: choice, values: [true, false]}
  phase.mix.name: {type: choice, values: [tokenmix, mixtoken, manifold_mixup]}
  phase.mix.alpha: {type: uniform, low: 0.2, high: 2.0}
  train.scheduler: {type: choice, values: [onecycle, step, multistep, cosine_restarts, plateau]}
  train.lr_schedule.gamma: {type: uniform, low: 0.1, high: 0.5, when: {train.scheduler: [step, multistep]}}
  train.lr_schedule.patience: {type: int, low: 1, high: 3, when: {train.scheduler: plateau}}
  train.freeze: {type: choice, values: [none, progressive]}
  train.unfreeze.every: {type: int, low: 1, high: 2}
"""


def test_the_new_options_are_searchable_through_a_space(tmp_path) -> None:
    import optuna

    from raycls.config.load import load_experiment, resolve_trial
    from raycls.config.space import suggest

    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    experiment = load_experiment(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        config = resolve_trial(experiment, suggest(trial, experiment.space))
        seen.add(config.train.scheduler)
        assert 1 <= config.model.modules["tome"]["r"] <= 4
        assert config.phase.mix.name in {"tokenmix", "mixtoken", "manifold_mixup"}
        if config.train.scheduler == "plateau":
            assert 1 <= config.train.lr_schedule.patience <= 3
    assert len(seen) >= 3
    path.write_text(SPACE.replace("values: [tokenmix, mixtoken, manifold_mixup]", "values: [tokenmix, manifold_mix]"))
    from raycls.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert "manifold_mix" in str(info.value) and "manifold_mixup" in str(info.value)


@pytest.mark.slow
def test_a_digits_run_with_tome_mixtoken_and_plateau(tmp_path) -> None:
    """The training loop end to end: a ViT with token merging, MixToken batches, and the plateau schedule
    reading each epoch's val_acc (threshold 1.0: no epoch improves by that, so lr halves after each)."""
    from raycls.config import TrialConfig
    from raycls.train import run_local

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 300},
            "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "modules": {"tome": {"r": 1}}},
            "phase": {"name": "supervised", "mix": {"name": "mixtoken"}},
            "train": {
                "epochs": 3,
                "batch_size": 64,
                "optimizer": "adamw",
                "lr": 1e-3,
                "scheduler": "plateau",
                "lr_schedule": {"patience": 0, "factor": 0.5, "threshold": 1.0},
            },
        }
    )
    history = []
    run_local(config, tmp_path, device=torch.device("cpu"), on_epoch=history.append)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert all(h["train_loss"] == h["train_loss"] and h["val_acc"] >= 0.0 for h in history)


def test_progressive_freeze_with_several_workers_is_refused_before_trials(tmp_path) -> None:
    from raycls.errors import ConfigError
    from raycls.prepare import prepare_experiment

    space = tmp_path / "space.yaml"
    space.write_text(
        "experiment: {resources: {workers: 2}}\n"
        "base: {data: {name: digits}, model: {name: small_cnn}, train: {epochs: 2, freeze: progressive}}\n"
    )
    with pytest.raises(ConfigError, match="train.freeze: progressive trains on one worker per trial; .*workers is 2"):
        prepare_experiment(space, environment=False)


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ("{cbam: {}}", r"model.modules.cbam: needs a CNN with feature stages"),
        ("{token_learner: {tokens: 80}}", r"model.modules.token_learner.tokens: 80 must be fewer than the 64 patch"),
    ],
)
def test_modules_that_do_not_fit_the_model_are_refused_before_trials(tmp_path, modules: str, message: str) -> None:
    from raycls.errors import ConfigError
    from raycls.prepare import prepare_experiment

    space = tmp_path / "space.yaml"
    space.write_text(
        "base:\n  data: {name: cifar10}\n"
        f"  model: {{name: vit_tiny_patch16_224, kwargs: {{depth: 2}}, modules: {modules}}}\n"
        "  train: {epochs: 2}\n"
    )
    with pytest.raises(ConfigError, match=message):
        prepare_experiment(space, environment=False)
    space.write_text(
        "base:\n  data: {name: cifar10}\n  model: {name: resnet18, modules: {cbam: {stages: [9]}}}\n"
        "  train: {epochs: 2}\n"
    )
    with pytest.raises(
        ConfigError, match=r"model.modules.cbam.stages: \[9\] out of range; this model's stages are 0: layer1"
    ):
        prepare_experiment(space, environment=False)
