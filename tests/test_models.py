"""The model registry: our own models, timm models with small-input stems, pretrained offline, weight I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raycls.config import ModelConfig
from raycls.errors import RayclsError
from raycls.models import MODELS, InputSpec, create_model, load_weights, save_weights

CIFAR = InputSpec(num_classes=10, in_chans=3, image_size=32)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_has_timm_interface(name: str) -> None:
    model = create_model(ModelConfig(name=name), InputSpec(num_classes=7, in_chans=1, image_size=8))
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("resnet18", "conv1"),
        ("densenet121", "features.conv0"),
        ("efficientnet_b0", "conv_stem"),
        ("mobilenetv3_small_050", "conv_stem"),
    ],
)
def test_cnn_small_input_stem_keeps_resolution(name: str, stem: str) -> None:
    model = create_model(ModelConfig(name=name), CIFAR)
    conv = model.get_submodule(stem)
    assert conv.stride == (1, 1)
    if name in ("resnet18", "densenet121"):
        assert conv.kernel_size == (3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    big = create_model(ModelConfig(name=name), InputSpec(10, 3, 224))
    assert big.get_submodule(stem).stride == (2, 2)  # ImageNet-size inputs keep timm's stem


def test_resnet_cifar_stem_feature_map_is_4x4() -> None:
    model = create_model(ModelConfig(name="resnet18"), CIFAR)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4  # ImageNet stem would give 1


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_small_input_uses_small_patches(name: str) -> None:
    model = create_model(ModelConfig(name=name), CIFAR)
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.num_patches == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_one_channel_input_for_timm() -> None:
    assert create_model(ModelConfig(name="resnet18"), InputSpec(10, 1, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pretrained_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the weights are not there
    with pytest.raises(RayclsError, match="could not load timm weights for 'resnet18'.*pretrained=false"):
        create_model(ModelConfig(name="resnet18", pretrained=True), CIFAR)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(RayclsError, match="did you mean .*resnet18"):
        MODELS.get("resnet19x")


def test_weights_round_trip_weights_only(tmp_path: Path) -> None:
    model = create_model(ModelConfig(name="small_cnn", width=8), InputSpec(10, 1, 8))
    save_weights(model, tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    other = create_model(ModelConfig(name="small_cnn", width=8), InputSpec(10, 1, 8))
    other.load_state_dict(load_weights(tmp_path))
    assert all(torch.equal(state[k], other.state_dict()[k]) for k in state)
    with pytest.raises(RayclsError, match="no checkpoint"):
        load_weights(tmp_path / "missing")


def test_a_pretrained_model_keeps_its_stem_on_small_inputs() -> None:
    """small_input: auto adapts the stem of a model trained from scratch, never a pretrained one (its conv1
    is what pretraining learned): small inputs are upsampled with data.image_size instead."""
    from raycls.models.timm_models import small_input_adapter

    small = InputSpec(num_classes=10, in_chans=3, image_size=32)
    assert small_input_adapter(ModelConfig(name="resnet18"), small) is not None
    assert small_input_adapter(ModelConfig(name="resnet18", pretrained=True), small) is None
    assert small_input_adapter(ModelConfig(name="resnet18", pretrained=True, small_input="on"), small) is not None


def test_drop_path_is_random_in_training_and_off_in_eval() -> None:
    spec = InputSpec(num_classes=10, in_chans=3, image_size=32)
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="vit_tiny_patch16_224", drop_path_rate=0.5), spec)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))  # stochastic depth drops other blocks each call
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    plain = create_model(ModelConfig(name="vit_tiny_patch16_224"), spec).train()
    torch.testing.assert_close(plain(x), plain(x))  # no drop path, no dropout: deterministic


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [{"type": "lora", "rank": 4}, {"type": "ia3"}])
def test_an_adapter_trains_only_itself_and_the_classifier(tmp_path: Path, adapter: dict) -> None:
    """model.adapter (peft) on a timm ViT: after a run, every weight of the backbone is bit-identical to the
    one it started from, the adapter's and the classifier's changed, and trainable_params counts just them."""
    from raycls.config import TrialConfig
    from raycls.train import run_local
    from raycls.train.loop import load_data
    from raycls.train.steps import seed_everything

    config = TrialConfig.model_validate(
        {
            "data": {"name": "digits", "val_fraction": 0.2, "train_subset": 256},
            "model": {"name": "vit_tiny_patch16_224", "adapter": adapter},
            "train": {"epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 1e-2},
            "eval": {"on": "none"},
        }
    )
    seed_everything(config.seed)
    start = create_model(config.model, load_data(config).spec)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    summary = run_local(config, tmp_path, device=torch.device("cpu"))
    after = torch.load(tmp_path / "checkpoints" / "best" / "model.pt", weights_only=True)
    assert after.keys() == initial.keys()  # the same adapted structure: eval and export load it as it is
    marker = "lora_" if adapter["type"] == "lora" else "ia3_"
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    assert changed and all(marker in k or k.startswith("head.") for k in changed), sorted(changed)[:5]
    assert any(marker in k for k in changed) and {"head.weight", "head.bias"} <= changed
    trainable = sum(p.numel() for n, p in start.named_parameters() if marker in n or n.startswith("head."))
    assert summary.final["trainable_params"] == trainable < sum(p.numel() for p in start.parameters()) / 10


def test_adapter_errors_name_the_key() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown adapter 'dora'; known: ia3, lora"):
        ModelConfig(name="vit_tiny_patch16_224", adapter={"type": "dora"})
    with pytest.raises(RayclsError, match="model.adapter.targets: .*linear layers are named: .*qkv"):
        create_model(
            ModelConfig(name="vit_tiny_patch16_224", adapter={"targets": ["query"]}),
            InputSpec(num_classes=10, in_chans=3, image_size=32),
        )


@pytest.mark.parametrize(
    ("in_chans", "size", "params"), [(1, 28, 709_510), (3, 32, 17_632_506)], ids=["mnist", "cifar10"]
)
def test_adaptive_cnn_has_the_seeds_layout_for_each_dataset(in_chans: int, size: int, params: int) -> None:
    """AdaptiveCNN picks its layout from the data: the seed's 709K-parameter MNIST network and its 17.6M
    CIFAR-10 one (residual blocks with squeeze-and-excitation, a two-layer classifier)."""
    model = create_model(
        ModelConfig(name="adaptive_cnn", drop_rate=0.3), InputSpec(num_classes=10, in_chans=in_chans, image_size=size)
    )
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(2, in_chans, size, size)
    assert model(x).shape == (2, 10) and model.forward_head(model.forward_features(x), pre_logits=True).shape == (
        2,
        model.num_features,
    )
    assert model.neck[-1].p == 0.3
