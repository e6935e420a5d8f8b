"""Contract tests over every registry: each registered entry is tested without anyone writing a test.

The families and their entries come from `BUILTIN_MODULES` (a static table), so this file tests the same
ones whether it runs alone or after the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raycls import names
from raycls.config import PHASE_CONFIGS, ModelConfig, TrainConfig
from raycls.errors import RegistryError
from raycls.models import InputSpec, create_model, save_weights
from raycls.optim import LR_SCHEDULES, OPTIMIZERS, create_lr_schedule, create_optimizer
from raycls.phases import PHASES, create_phase
from raycls.registry import BUILTIN_MODULES, FAMILIES, Registry, load_builtins, load_family

load_builtins()
ENTRIES = [(family, name) for family in sorted(BUILTIN_MODULES) for name in FAMILIES[family].names()]


def test_every_registry_is_listed_with_the_module_that_fills_it() -> None:
    assert sorted(f for f in FAMILIES if not f.startswith("test-")) == sorted(BUILTIN_MODULES)
    for family in BUILTIN_MODULES:
        assert FAMILIES[family].names(), f"{family}: no built-in entries after importing {BUILTIN_MODULES[family]}"


@pytest.mark.parametrize(("family", "name"), ENTRIES, ids=[f"{f}:{n}" for f, n in ENTRIES])
def test_every_entry_answers_to_timms_verbs(family: str, name: str) -> None:
    registry = FAMILIES[family]
    load_family(family)
    assert name in registry and registry.get(name) is not None
    assert registry.list(name) == [name]
    assert name in registry.list("*") and registry.list("*") == registry.names()


def test_create_calls_the_entry_with_its_arguments() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = OPTIMIZERS.create("sgd", [{"params": list(model.parameters())}], TrainConfig(lr=0.5))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5


def test_phase_configs_and_implementations_agree() -> None:
    assert sorted(PHASE_CONFIGS) == PHASES.names()


TINY_VIT = ModelConfig(name="cifar_deit", kwargs={"embed_dim": 16, "depth": 2, "num_heads": 2, "stem_width": 8})


def phase_setup(name: str, spec: InputSpec, folder: Path) -> tuple[dict, ModelConfig]:
    """A phase's config fields and student model where its defaults cannot run alone: token distillation
    needs ViTs and a teacher (a saved random one)."""
    if name != "token_distill":
        return {}, ModelConfig(width=8)
    save_weights(create_model(TINY_VIT, spec), folder / "teacher")
    return {"teacher": str(folder / "teacher"), "teacher_model": TINY_VIT}, TINY_VIT


@pytest.mark.parametrize("name", PHASES.names())
def test_every_phase_lowers_its_loss_on_a_batch(name: str, tmp_path: Path) -> None:
    spec = InputSpec(num_classes=4, in_chans=1, image_size=8)
    fields, student = phase_setup(name, spec, tmp_path)
    phase = create_phase(PHASE_CONFIGS[name](**fields), spec)
    model = phase.build(create_model(student, spec))
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    views = images[:, None].repeat(1, phase.views, 1, 1, 1) + 0.1 * torch.randn(16, phase.views, 1, 8, 8)
    batch = (views if phase.views > 1 else images, labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss, _ = phase.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    sums, embeddings = phase.eval_batch(model, (images, labels))
    metrics = phase.eval_metrics({k: v.item() for k, v in sums.items()})
    if embeddings is not None:
        metrics.update(phase.embedding_metrics(embeddings, labels))
    assert phase.metric in metrics and 0 <= metrics[phase.metric] <= 1
    # What a phase says it reports is what it reports (the chain preflight relies on it); VAL_IMAGES is the loop's.
    assert type(phase).reports(phase.topk) - {names.VAL_IMAGES} == set(metrics)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_steps(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(TrainConfig(optimizer=name, lr=0.1), model)
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, TrainConfig().weight_decay}  # no decay on bias


@pytest.mark.parametrize("name", LR_SCHEDULES.names())
def test_every_schedule_starts_at_base_lr_and_stays_in_range(name: str) -> None:
    config = TrainConfig(scheduler=name, epochs=5, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_lr_schedule(config, opt, steps_per_epoch=4, metric="val_acc")
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0.0 < lr <= 1.0 + 1e-9 for lr in lrs)
    if LR_SCHEDULES.get(name).multiplier is not None:  # torch's classes have their own floors and starts
        assert lrs[0] == pytest.approx(1.0) and all(0.1 - 1e-9 <= lr <= 1.0 for lr in lrs)


@pytest.mark.parametrize("family", sorted(BUILTIN_MODULES))
def test_unknown_names_list_the_known_ones(family: str) -> None:
    registry = FAMILIES[family]
    with pytest.raises(RegistryError) as info:
        registry.get("no-such-thing")
    assert "no-such-thing" in str(info.value)
    assert registry.names()[0] in str(info.value)


def test_double_registration_is_refused() -> None:
    registry: Registry[int] = Registry("test-family")
    registry.register("a")(1)
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("a")(2)
    FAMILIES.pop("test-family")
