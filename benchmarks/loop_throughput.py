"""Claim: the raycls training loop costs (almost) nothing over a plain PyTorch loop.

Measures training images/s of `raycls.train.fit` and of a plain 30-line PyTorch loop on the same model, data,
batch size and optimizer, alternating runs in one process, and reports the ratio (goal >= 0.95).
Both include per-batch normalisation of uint8 images; raycls also runs its augmentation ops (none here),
LR schedule and device-side indexing. Evaluation time is excluded from both.

    python benchmarks/loop_throughput.py                       # CIFAR-10 subset, small_cnn, CPU
    python benchmarks/loop_throughput.py --model resnet18 --device cuda --subset 50000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import SHARED_DATA, write_result

from raycls.config import TrialConfig
from raycls.data import load_splits
from raycls.models import InputSpec, create_model
from raycls.train import RunContext, fit


def plain_loop(config: TrialConfig, device: torch.device, epochs: int) -> float:
    """The baseline: what a researcher writes by hand. Returns training images/s of the last epochs."""
    torch.manual_seed(config.seed)
    splits = load_splits(config.data, seed=config.seed)
    images, labels = splits.train.images.to(device), splits.train.labels.to(device)
    mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1) * 255
    spec = InputSpec(splits.num_classes, splits.train.channels, splits.train.size)
    model = create_model(config.model, spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bs = config.train.batch_size
    rates = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(labels), device=device)
        start, n = time.perf_counter(), 0
        for i in range(len(labels) // bs):
            idx = perm[i * bs : (i + 1) * bs]
            x = (images[idx].float() - mean) / std
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += bs
        loss.item()  # wait for the device
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates[1:] if len(rates) > 1 else rates)  # the first epoch warms up


def raycls_loop(config: TrialConfig, device: torch.device) -> float:
    history: list[dict] = []
    fit(config, lambda metrics, checkpoint: history.append(metrics), RunContext(device=device))
    rates = [h["images_per_s"] for h in history]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="loop_throughput")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = TrialConfig.model_validate(
        {
            "data": {"name": args.dataset, "root": str(SHARED_DATA), "train_subset": args.subset},
            "model": {"name": args.model},
            "phase": {"name": "supervised"},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "optimizer": "sgd",
                "lr": 0.05,
                "amp": "off",
                "channels_last": "off",
            },
        }
    )
    plain, ours = [], []
    for repeat in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        plain.append(plain_loop(config, device, args.epochs))
        ours.append(raycls_loop(config, device))
        print(f"repeat {repeat}: plain {plain[-1]:.0f} img/s, raycls {ours[-1]:.0f} img/s")
    ratio = statistics.median(ours) / statistics.median(plain)
    path = write_result(
        args.out,
        {
            "claim": "raycls loop images/s >= 0.95 x a plain PyTorch loop (same model, data, batch size)",
            "config": {k: v for k, v in vars(args).items()},
            "plain_images_per_s": plain,
            "raycls_images_per_s": ours,
            "plain_median": statistics.median(plain),
            "raycls_median": statistics.median(ours),
            "ratio": ratio,
            "goal": 0.95,
            "meets_goal": ratio >= 0.95,
        },
    )
    print(f"ratio raycls/plain = {ratio:.3f} (goal >= 0.95) -> {path}")


if __name__ == "__main__":
    main()
