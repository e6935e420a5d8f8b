"""Every augmentation op: shape, dtype and device kept, reproducible from the generator, and doing its job."""

from __future__ import annotations

import pytest
import torch

from raycls.config import AugmentConfig
from raycls.data.augment import (
    AUGMENTATIONS,
    PIXEL_SPACE,
    apply_augmentations,
    color_jitter,
    grayscale,
    luma,
    resized_crop,
)

# A value that enables each op visibly on 8x8 images.
ENABLED = {
    "resized_crop": 0.3,
    "hflip": True,
    "random_crop": 2,
    "color_jitter": 0.8,
    "grayscale": 1.0,
    "cutout": 3,
    "affine": {"degrees": 20.0, "translate": 0.1, "scale_min": 0.9, "scale_max": 1.1},
    "randaugment": {"num_ops": 2, "magnitude": 9},
    "trivialaugment": True,
    "autoaugment": "cifar10",
    "random_erasing": {"p": 0.5, "area_min": 0.05, "area_max": 0.3},
}


def test_every_config_field_has_an_op_and_a_test_value() -> None:
    assert sorted(AugmentConfig.model_fields) == AUGMENTATIONS.names() == sorted(ENABLED)


def images(channels: int, n: int = 16, size: int = 8, seed: int = 0) -> torch.Tensor:
    """[0, 1] images with structure (a gradient plus noise), so flips and crops change them."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, size)[None, None, None, :] * torch.rand(n, channels, 1, 1, generator=gen)
    return (ramp + 0.1 * torch.rand(n, channels, size, size, generator=gen)).clamp(0, 1)


def run(name: str, x: torch.Tensor, value: object, seed: int = 0) -> torch.Tensor:
    return AUGMENTATIONS.get(name)(x, value, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_op_keeps_the_batch_and_is_reproducible(name: str, channels: int) -> None:
    x = images(channels)
    out = run(name, x, ENABLED[name])
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out, run(name, x, ENABLED[name]))  # same seed, same batch
    changes = not torch.allclose(out, x, atol=1e-4)
    # Grey on grey images, and saturation on them, change nothing by design.
    assert changes or (name == "grayscale" and channels == 1)
    if name != "grayscale":
        assert not torch.equal(out, run(name, x, ENABLED[name], seed=1))  # another seed, other draws


@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_of_the_whole_area_is_the_identity(channels: int) -> None:
    x = images(channels)
    torch.testing.assert_close(resized_crop(x, 1.0, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


def test_resized_crop_zooms_in() -> None:
    # A crop resized up is smoother: neighbouring pixels differ less than in the original checkerboard.
    x = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float().expand(8, 3, 16, 16)
    out = resized_crop(x, 0.1, torch.Generator().manual_seed(0))
    assert (out.diff(dim=-1).abs().mean(dim=(1, 2, 3)) < 0.9).all()
    assert out.min() >= 0 and out.max() <= 1  # interpolation only, no padding values from outside


def test_grayscale_makes_rgb_channels_equal_with_bt601_weights() -> None:
    x = images(3)
    out = grayscale(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
    half = grayscale(x, 0.5, torch.Generator().manual_seed(0))
    grey = (half[:, 0] == half[:, 1]).flatten(1).all(dim=1)
    assert 0 < grey.sum() < len(x)  # some images, not all


def test_color_jitter_of_zero_strength_does_nothing() -> None:
    x = images(3)
    torch.testing.assert_close(color_jitter(x, 0.0, torch.Generator().manual_seed(0)), x)
    assert torch.equal(
        apply_augmentations(x, AugmentConfig(color_jitter=0.0), torch.Generator(), mean=(0.5,) * 3, std=(0.25,) * 3), x
    )


def test_color_jitter_leaves_about_a_fifth_untouched_and_stays_in_pixel_range() -> None:
    x = images(3, n=400)
    out = color_jitter(x, 0.8, torch.Generator().manual_seed(0))
    untouched = (out == x).flatten(1).all(dim=1).float().mean()
    assert 0.1 < untouched < 0.3 and out.min() >= 0 and out.max() <= 1


def test_pixel_space_ops_run_on_pixels_of_a_normalised_batch() -> None:
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = images(3)
    out = apply_augmentations(
        (x - m) / s, AugmentConfig(grayscale=0.99), torch.Generator().manual_seed(3), mean=mean, std=std
    )
    pixels = out * s + m
    torch.testing.assert_close(pixels[:, :1].expand_as(pixels), pixels)  # grey in pixel space, not normalised
    torch.testing.assert_close(pixels[:, :1], luma(x))
    with pytest.raises(ValueError, match="pass the batch's normalisation mean and std"):
        apply_augmentations(x, AugmentConfig(color_jitter=0.4), torch.Generator())
    assert PIXEL_SPACE == {"color_jitter", "grayscale", "affine", "randaugment", "trivialaugment", "autoaugment"}


def test_an_epoch_of_every_op_is_reproducible() -> None:
    config = AugmentConfig(resized_crop=0.2, hflip=True, random_crop=1, color_jitter=0.5, grayscale=0.2, cutout=2)
    x = images(3)

    def epoch(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [apply_augmentations(x, config, gen, mean=(0.5,) * 3, std=(0.25,) * 3) for _ in range(3)]

    first, again = epoch(0), epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # batches of one epoch draw on


# ------------------------------------------------------------------------------ policies (per image)
@pytest.mark.parametrize(
    "config",
    [
        {"randaugment": {"num_ops": 2, "magnitude": 9}},
        {"trivialaugment": True},
        {"autoaugment": "cifar10"},
        {"autoaugment": "imagenet"},
        {"autoaugment": "svhn"},
    ],
)
def test_policies_draw_per_image_and_stay_in_pixel_range(config: dict) -> None:
    """One image repeated 64 times: torchvision's own transform would give 64 equal images (one draw per
    call); raycls draws per image, so many differ. Values stay pixels; the same seed gives the same batch."""
    x = images(3, n=1, size=16).repeat(64, 1, 1, 1)
    name, value = next(iter(config.items()))
    out = run(name, x, value)
    distinct = len({tuple(image.flatten().tolist()) for image in (out * 255).round().to(torch.uint8)})
    assert distinct >= 8, f"{distinct} distinct images of 64"
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == x.dtype
    assert torch.equal(out, run(name, x, value))


def test_randaugment_at_magnitude_zero_changes_only_by_magnitude_free_ops() -> None:
    """Magnitude 0: shears, shifts, rotations and colour factors are identities; what changes an image is
    only an op without a magnitude (posterize at 8 bits, autocontrast, equalize, solarize at 1.0)."""
    x = images(3, n=64, size=16)
    out = run("randaugment", x, {"num_ops": 1, "magnitude": 0})
    same = ((out * 255).round() == (x * 255).round()).flatten(1).all(dim=1).float().mean()
    assert same > 0.5


def test_random_erasing_erases_one_rectangle_of_the_asked_area_in_the_asked_share() -> None:
    x = torch.ones(400, 3, 32, 32)
    out = run("random_erasing", x, {"p": 0.5, "area_min": 0.1, "area_max": 0.2})
    erased = (out == 0).all(dim=1).flatten(1).float().mean(dim=1)  # share of each image's pixels
    hit = erased > 0
    assert 0.4 < hit.float().mean() < 0.6
    assert erased[hit].min() >= 0.08 and erased[hit].max() <= 0.23  # rounding to whole pixels


def test_affine_without_motion_is_the_identity_and_black_fills_the_rest() -> None:
    x = images(1, size=16)
    still = run("affine", x, {"degrees": 0.0, "translate": 0.0, "scale_min": 1.0, "scale_max": 1.0})
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    shrunk = run(
        "affine", torch.ones(8, 1, 16, 16), {"degrees": 0.0, "translate": 0.0, "scale_min": 0.5, "scale_max": 0.5}
    )
    assert shrunk[:, :, 0, 0].max() == 0 and shrunk[:, :, 8, 8].min() > 0.99  # zoomed out: black border


def test_policy_fields_are_validated_and_searchable(tmp_path) -> None:
    from pydantic import ValidationError

    from raycls.config import load_experiment, resolve_trial

    with pytest.raises(ValidationError, match="area_min"):
        AugmentConfig.model_validate({"random_erasing": {"area_min": 0.5, "area_max": 0.1}})
    with pytest.raises(ValidationError, match="'cifar10', 'imagenet' or 'svhn'"):
        AugmentConfig.model_validate({"autoaugment": "cifar100"})
    space = tmp_path / "space.yaml"
    space.write_text("""
base: {data: {name: digits}}
space:
  augment.randaugment.magnitude: {type: int, low: 5, high: 15}
  augment.random_erasing.p: {type: uniform, low: 0.1, high: 0.5}
""")
    config = resolve_trial(
        load_experiment(space), {"augment.randaugment.magnitude": 12, "augment.random_erasing.p": 0.3}
    )
    assert config.augment.randaugment.magnitude == 12 and config.augment.randaugment.num_ops == 2
    assert config.augment.random_erasing.p == 0.3
    assert type(config).from_json(config.to_json()) == config
