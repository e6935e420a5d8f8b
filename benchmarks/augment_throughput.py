"""Claim: the heaviest default augmentation policy costs under 10% of a training step on a GPU; on CPU its
share is reported as measured.

For each policy (raycls.data.augment, every draw per image), images/s of augmenting a CIFAR-sized batch on
the device, against images/s of one training step (forward, backward, SGD) of the model on the same batch.
The share is augment time / (augment time + step time), the part of an augmented step spent augmenting.

    python benchmarks/augment_throughput.py                          # CPU, small_cnn and resnet18, batch 128
    python benchmarks/augment_throughput.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from raycls.config import AugmentConfig
from raycls.config.schema import ModelConfig
from raycls.data.augment import apply_augmentations
from raycls.models import InputSpec, create_model

POLICIES = {
    "crop+flip": {"random_crop": 4, "hflip": True},
    "cutout": {"cutout": 8},
    "random_erasing": {"random_erasing": {"p": 0.25}},
    "affine": {"affine": {"degrees": 15, "translate": 0.1, "scale_min": 0.9, "scale_max": 1.1}},
    "color_jitter": {"color_jitter": 0.4, "grayscale": 0.2},
    "randaugment(2,9)": {"randaugment": {"num_ops": 2, "magnitude": 9}},
    "trivialaugment": {"trivialaugment": True},
    "autoaugment(cifar10)": {"autoaugment": "cifar10"},
    "autoaugment(imagenet)": {"autoaugment": "imagenet"},
}
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cudnn, first-call allocations)
    sync(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="augment_throughput")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch, 3, 32, 32, generator=gen, device=device)
    normalised = (images - torch.tensor(MEAN, device=device).view(1, 3, 1, 1)) / torch.tensor(STD, device=device).view(
        1, 3, 1, 1
    )
    labels = torch.randint(0, 10, (args.batch,), device=device, generator=gen)

    steps = {}
    for name in args.models:
        model = create_model(ModelConfig(name=name), InputSpec(num_classes=10, in_chans=3, image_size=32)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(normalised), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        steps[name] = timed(step, device, args.repeats)
        print(f"step {name}: {args.batch / steps[name]:.0f} images/s")

    results = []
    for policy, fields in POLICIES.items():
        config = AugmentConfig.model_validate(fields)
        seconds = timed(lambda: apply_augmentations(normalised, config, gen, mean=MEAN, std=STD), device, args.repeats)
        row = {
            "policy": policy,
            "augment_images_per_s": args.batch / seconds,
            **{f"share_of_{m}_step": seconds / (seconds + s) for m, s in steps.items()},
        }
        print(row)
        results.append(row)
    heaviest = max(results, key=lambda r: 1 / r["augment_images_per_s"])
    print(
        write_result(
            args.out,
            {
                "claim": "the heaviest default policy costs under 10% of the step on GPU (reported as measured on CPU)",
                "device": str(device),
                "batch": args.batch,
                "step_images_per_s": {m: args.batch / s for m, s in steps.items()},
                "heaviest": heaviest["policy"],
                "results": results,
            },
        )
    )


if __name__ == "__main__":
    main()
