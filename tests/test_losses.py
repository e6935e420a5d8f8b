"""raycls.losses: every value is computed by hand here (math on Python floats), never by calling the loss again."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from raycls.errors import ConfigError, RegistryError
from raycls.losses import (
    ALPHA_SCHEDULES,
    LOSSES,
    AdaFace,
    ArcFace,
    CosFace,
    CosineHead,
    CurricularFace,
    HardKD,
    MarginLoss,
    ProjectionHead,
    SoftKD,
    SubCenterArcFace,
    SupConLoss,
    create_loss,
    kd_alpha,
)

MARGIN_LOSSES = [name for name in LOSSES.names() if issubclass(LOSSES.get(name), MarginLoss)]

# Two samples, three classes: targets 0 and 2. At m = 0.3 every negative is below cos(theta_y + m), so
# CurricularFace leaves them alone too and every loss must change the target logit only.
COSINE = [[0.8, 0.3, -0.2], [0.1, 0.2, 0.5]]
LABELS = [0, 2]


def ce(row: list[float], target: int) -> float:
    """Cross-entropy of one row of logits: log(sum(exp)) - logit[target]."""
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def arc(cos: float, m: float) -> float:
    """cos(theta + m) the long way round, through the angle."""
    return math.cos(math.acos(cos) + m)


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def assert_close(actual: torch.Tensor, expected: list, *, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- registry -------------------------------------------------------------------------------------------------


def test_registry_lists_every_loss() -> None:
    assert LOSSES.names() == sorted(
        ["arcface", "cosface", "adaface", "curricularface", "subcenter_arcface", "supcon", "soft_kd", "hard_kd"]
    )
    assert ALPHA_SCHEDULES.names() == ["constant", "cosine", "linear"]


@pytest.mark.parametrize("registry", [LOSSES, ALPHA_SCHEDULES], ids=lambda r: r.family)
def test_unknown_name_lists_the_known_ones(registry) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get("arcfcae")
    assert "arcfcae" in str(info.value)
    assert all(name in str(info.value) for name in registry.names())


def test_create_loss_passes_arguments() -> None:
    loss = create_loss("cosface", 4, 3, margin=0.2, scale=8.0)
    assert isinstance(loss, CosFace) and loss.full_margin == 0.2 and loss.scale == 8.0


# --- bad arguments: the rule and the value, every problem at once ------------------------------------------------


def test_bad_margin_arguments_report_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        ArcFace(0, 1, margin=-0.1, scale=0.0, margin_warmup_steps=-1)
    assert info.value.problems == [
        "dim=0 must be >= 1",
        "num_classes=1 must be >= 2",
        "margin=-0.1 must be >= 0",
        "scale=0.0 must be > 0",
        "margin_warmup_steps=-1 must be >= 0",
    ]
    with pytest.raises(ConfigError, match=r"margin=3.5 must be < 3.142"):
        ArcFace(4, 3, margin=3.5)
    with pytest.raises(ConfigError) as info:
        AdaFace(4, 3, h=0.0, momentum=2.0)
    assert info.value.problems == ["h=0.0 must be > 0", "momentum=2.0 must be in (0, 1]"]
    with pytest.raises(ConfigError, match=r"momentum=0 must be in \(0, 1\]"):
        CurricularFace(4, 3, momentum=0)
    with pytest.raises(ConfigError, match="sub_centers=0 must be >= 1"):
        CosineHead(4, 3, sub_centers=0)


def test_bad_other_arguments() -> None:
    with pytest.raises(ConfigError, match="temperature=0.0 must be > 0"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ConfigError, match="temperature=-1.0 must be > 0"):
        SoftKD(temperature=-1.0)
    with pytest.raises(ConfigError, match="hidden=0 must be >= 1"):
        ProjectionHead(4, 0, 2)
    with pytest.raises(ValueError, match="views=1 must be >= 2"):
        SupConLoss()(torch.ones(2, 1, 3))
    with pytest.raises(ValueError, match=r"\[batch, views, dim\]"):
        SupConLoss()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="norms"):
        AdaFace(4, 3).margin_logits(torch.tensor(COSINE), torch.tensor(LABELS))


# --- the margin family -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_every_margin_loss_changes_the_target_logit_only_and_scales(name: str) -> None:
    loss = create_loss(name, 4, 3, margin=0.3, scale=10.0).eval()
    logits = loss.margin_logits(torch.tensor(COSINE), torch.tensor(LABELS), norms=torch.tensor([1.0, 30.0]))
    for row, (cosines, target) in enumerate(zip(COSINE, LABELS)):
        for j, cos in enumerate(cosines):
            if j == target:
                assert logits[row, j].item() < 10.0 * cos - 1e-3  # a margin makes the target harder
            else:
                assert logits[row, j].item() == pytest.approx(10.0 * cos, abs=1e-6)


def test_arcface_adds_the_angle_margin_to_the_target() -> None:
    m, s = 0.5, 10.0
    logits = ArcFace(4, 3, margin=m, scale=s).margin_logits(torch.tensor(COSINE), torch.tensor(LABELS))
    assert_close(logits, [[s * arc(0.8, m), s * 0.3, s * -0.2], [s * 0.1, s * 0.2, s * arc(0.5, m)]])


def test_arcface_falls_back_past_pi_as_the_official_code() -> None:
    m = 0.5
    # theta = acos(-0.95) = 2.82 rad: theta + m > pi, where cos(theta + m) would grow again with theta.
    assert math.acos(-0.95) + m > math.pi
    logits = ArcFace(4, 2, margin=m, scale=1.0).margin_logits(torch.tensor([[-0.95, 0.2]]), torch.tensor([0]))
    assert_close(logits, [[-0.95 - math.sin(math.pi - m) * m, 0.2]])
    # Easy margin: no margin at all once theta > pi/2 (cos <= 0), the full one below.
    easy = ArcFace(4, 2, margin=m, scale=1.0, easy_margin=True)
    logits = easy.margin_logits(torch.tensor([[-0.3, 0.2], [0.8, 0.1]]), torch.tensor([0, 0]))
    assert_close(logits, [[-0.3, 0.2], [arc(0.8, m), 0.1]])


def test_arcface_end_to_end_from_embeddings() -> None:
    # Class weights at 0, 120 and 240 degrees, stored at length 3 (the head normalises them). Embeddings at
    # 0.3 rad (norm 5, class 0) and 2.0 rad (norm 0.5, class 1): cosine = cos(embedding angle - class angle).
    m, s = 0.4, 4.0
    angles = [0.0, 2 * math.pi / 3, 4 * math.pi / 3]
    loss = ArcFace(2, 3, margin=m, scale=s)
    with torch.no_grad():
        loss.head.weight.copy_(3.0 * torch.tensor([unit(a) for a in angles]))
    embeddings = torch.tensor([[5.0 * c for c in unit(0.3)], [0.5 * c for c in unit(2.0)]])
    out = loss(embeddings, torch.tensor([0, 1]))
    cos = [[math.cos(e - a) for a in angles] for e in (0.3, 2.0)]
    assert_close(out.cosine, cos)
    row0 = [s * arc(cos[0][0], m), s * cos[0][1], s * cos[0][2]]
    row1 = [s * cos[1][0], s * arc(cos[1][1], m), s * cos[1][2]]
    assert out.loss.item() == pytest.approx((ce(row0, 0) + ce(row1, 1)) / 2, abs=1e-5)


def test_cosface_subtracts_the_margin_from_the_target() -> None:
    m, s = 0.35, 10.0
    logits = CosFace(4, 3, margin=m, scale=s).margin_logits(torch.tensor(COSINE), torch.tensor(LABELS))
    assert_close(logits, [[s * (0.8 - m), s * 0.3, s * -0.2], [s * 0.1, s * 0.2, s * (0.5 - m)]])


def test_margin_warms_up_linearly_and_resumes_from_the_checkpoint() -> None:
    loss = ArcFace(4, 3, margin=0.5, scale=10.0, margin_warmup_steps=10)
    cosine, labels = torch.tensor(COSINE), torch.tensor(LABELS)
    assert loss.current_margin().item() == 0.0
    assert_close(loss.margin_logits(cosine, labels), [[10.0 * c for c in row] for row in COSINE])
    loss.set_progress(4)
    assert loss.current_margin().item() == pytest.approx(0.2)
    assert loss.margin_logits(cosine, labels)[0, 0].item() == pytest.approx(10.0 * arc(0.8, 0.2), abs=1e-5)
    resumed = ArcFace(4, 3, margin=0.5, scale=10.0, margin_warmup_steps=10)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.current_margin().item() == pytest.approx(0.2)
    loss.set_progress(25)
    assert loss.current_margin().item() == pytest.approx(0.5)


def test_adaface_margin_adapts_to_the_feature_norm() -> None:
    m, s, h, eps = 0.4, 2.0, 0.333, 1e-3
    loss = AdaFace(4, 2, margin=m, scale=s, h=h).eval()  # eval: the running statistics stay as set
    with torch.no_grad():
        loss.batch_mean.fill_(4.0)
        loss.batch_std.fill_(2.0)
    # Same cosine, same label; only the norm differs (2: low quality, 6: high quality).
    logits = loss.margin_logits(
        torch.tensor([[0.7, 0.1], [0.7, 0.1]]), torch.tensor([0, 0]), norms=torch.tensor([2.0, 6.0])
    )
    expected, margins = [], []
    for norm in (2.0, 6.0):
        norm_hat = max(-1.0, min(1.0, h * (norm - 4.0) / (2.0 + eps)))
        g_angular, g_additive = -m * norm_hat, m * norm_hat + m
        margins.append((g_angular, g_additive))
        expected.append([s * (math.cos(math.acos(0.7) + g_angular) - g_additive), s * 0.1])
    assert_close(logits, expected)
    (low_angular, low_additive), (high_angular, high_additive) = margins
    # Low norm: positive angular margin (ArcFace-like), little additive; high norm: the reverse.
    assert low_angular > 0 > high_angular and high_additive > m > low_additive
    assert logits[0, 0].item() != pytest.approx(logits[1, 0].item(), abs=1e-3)


def test_adaface_running_norm_statistics() -> None:
    loss = AdaFace(4, 2, margin=0.4, scale=2.0)
    assert (loss.batch_mean.item(), loss.batch_std.item()) == (20.0, 100.0)  # the official initial values
    cosine, labels = torch.tensor([[0.7, 0.1], [0.7, 0.1]]), torch.tensor([0, 0])
    loss.margin_logits(cosine, labels, norms=torch.tensor([2.0, 6.0]))
    # Batch mean 4, unbiased std sqrt(((2-4)^2 + (6-4)^2) / 1) = sqrt(8); momentum 0.01.
    assert loss.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * 4)
    assert loss.batch_std.item() == pytest.approx(0.99 * 100 + 0.01 * math.sqrt(8))
    state = (loss.batch_mean.item(), loss.batch_std.item())
    loss.margin_logits(cosine[:1], labels[:1], norms=torch.tensor([3.0]))  # one sample: no std, no update
    loss.eval()
    loss.margin_logits(cosine, labels, norms=torch.tensor([50.0, 60.0]))  # validation never moves them
    assert (loss.batch_mean.item(), loss.batch_std.item()) == state
    assert {"batch_mean", "batch_std", "step"} <= set(loss.state_dict())


def test_adaface_reads_the_norm_of_the_raw_embedding() -> None:
    # The same direction at two lengths: identical cosines, so only AdaFace's loss may differ.
    direction, labels = torch.tensor([[1.0, 0.5, -0.2, 0.3]]), torch.tensor([1])
    for name, differs in [("adaface", True), ("arcface", False)]:
        torch.manual_seed(0)
        loss = create_loss(name, 4, 3).eval()
        short, long = loss(direction, labels).loss.item(), loss(20 * direction, labels).loss.item()
        assert (abs(short - long) > 1e-3) == differs


def test_curricularface_reweights_hard_negatives_and_updates_t() -> None:
    m, s = 0.5, 1.0
    loss = CurricularFace(4, 3, margin=m, scale=s)
    cosine, labels = torch.tensor([[0.6, 0.5, 0.1]]), torch.tensor([0])
    threshold = arc(0.6, m)  # cos(theta_y + m) = 0.1433: 0.5 is above it (hard), 0.1 below (easy)
    assert 0.1 < threshold < 0.5
    logits = loss.margin_logits(cosine, labels)
    t = 0.99 * 0.0 + 0.01 * 0.6  # t starts at 0 and updates before it is used
    assert loss.t.item() == pytest.approx(t)
    assert_close(logits, [[arc(0.6, m), 0.5 * (t + 0.5), 0.1]])
    logits = loss.margin_logits(cosine, labels)
    t = 0.99 * t + 0.01 * 0.6
    assert loss.t.item() == pytest.approx(t)
    assert_close(logits, [[arc(0.6, m), 0.5 * (t + 0.5), 0.1]])
    loss.eval()
    loss.margin_logits(cosine, labels)
    assert loss.t.item() == pytest.approx(t)  # validation never moves t
    assert "t" in loss.state_dict()


def test_subcenter_arcface_takes_the_nearest_subcentre() -> None:
    m, s = 0.5, 4.0
    # Class 0's sub-centres at 0 and 90 degrees, class 1's at 180 and 270 (rows class-major: c*K + k).
    loss = SubCenterArcFace(2, 2, sub_centers=2, margin=m, scale=s)
    with torch.no_grad():
        loss.head.weight.copy_(torch.tensor([unit(k * math.pi / 2) for k in range(4)]))
    embedding = torch.tensor([unit(math.radians(80))], requires_grad=True)
    out = loss(embedding, torch.tensor([0]))
    # Class 0: max(cos 80, cos 10) = cos 10; class 1: max(cos 100, cos 190) = cos 100.
    cos0, cos1 = math.cos(math.radians(10)), math.cos(math.radians(100))
    assert_close(out.cosine, [[cos0, cos1]])
    assert out.loss.item() == pytest.approx(ce([s * arc(cos0, m), s * cos1], 0), abs=1e-5)
    out.loss.backward()
    # Only the winning sub-centre of each class receives a gradient.
    assert [bool(row.abs().sum() > 0) for row in loss.head.weight.grad] == [False, True, True, False]


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_margin_loss_gradients_match_finite_differences(name: str) -> None:
    torch.manual_seed(0)
    loss = create_loss(name, 4, 3, margin=0.3, scale=2.0).double().eval()  # eval: buffers fixed under gradcheck
    if name == "curricularface":
        loss.t.fill_(0.3)
    embeddings = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = loss.head.weight.detach().clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2])

    def of_weight(w: torch.Tensor) -> torch.Tensor:
        return functional_call(loss, {"head.weight": w}, (embeddings.detach(), labels)).loss

    assert torch.autograd.gradcheck(of_weight, (weight,))
    # AdaFace detaches the norms (they steer the margin, as in the official code), so its gradient in the
    # embeddings omits the norm path on purpose and finite differences would disagree.
    if name != "adaface":
        assert torch.autograd.gradcheck(lambda e: loss(e, labels).loss, (embeddings,))


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_margin_loss_trains_and_its_cosine_predicts(name: str) -> None:
    torch.manual_seed(0)
    loss = create_loss(name, 8, 3, margin=0.2, scale=16.0)
    labels = torch.arange(12) % 3
    # Three clusters in 8-d: separable by a cosine classifier, so 30 steps of the head alone must find it.
    embeddings = (3 * torch.randn(3, 8)[labels] + torch.randn(12, 8)).requires_grad_(True)
    out = loss(embeddings, labels)
    out.loss.backward()
    for grad in (embeddings.grad, loss.head.weight.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt = torch.optim.Adam(loss.parameters(), lr=0.1)
    first = out.loss.item()
    for _ in range(30):
        out = loss(embeddings.detach(), labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < first
    assert (loss.cosine(embeddings).argmax(dim=1) == labels).all()


# --- SupCon ----------------------------------------------------------------------------------------------------


def supcon_by_the_formula(features: torch.Tensor, labels: list[int], tau: float) -> float:
    """The paper's L_out, one anchor at a time. Anchors without a positive are skipped."""
    batch, views, _ = features.shape
    z = [features[b, v].tolist() for b in range(batch) for v in range(views)]
    y = [labels[b] for b in range(batch) for _ in range(views)]

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(z[i], z[j])) / tau

    per_anchor = []
    for i in range(len(z)):
        denominator = sum(math.exp(sim(i, a)) for a in range(len(z)) if a != i)
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if positives:
            per_anchor.append(-sum(math.log(math.exp(sim(i, p)) / denominator) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def test_supcon_matches_the_formula() -> None:
    torch.manual_seed(0)
    features = F.normalize(torch.randn(4, 2, 5, dtype=torch.float64), dim=-1)
    labels = [0, 1, 0, 2]
    value = SupConLoss(temperature=0.5)(features, torch.tensor(labels))
    assert value.item() == pytest.approx(supcon_by_the_formula(features, labels, 0.5), abs=1e-6)
    # Without labels every image is its own class (SimCLR).
    value = SupConLoss(temperature=0.5)(features)
    assert value.item() == pytest.approx(supcon_by_the_formula(features, [0, 1, 2, 3], 0.5), abs=1e-6)
    # One view: the anchor whose label appears once has no positive and is left out of the mean.
    one_view = features[:, :1]
    value = SupConLoss(temperature=0.5)(one_view, torch.tensor(labels))
    assert value.item() == pytest.approx(supcon_by_the_formula(one_view, labels, 0.5), abs=1e-6)


def test_supcon_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    features = F.normalize(torch.randn(3, 2, 4, dtype=torch.float64), dim=-1).requires_grad_(True)
    labels = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda f: SupConLoss(temperature=0.3)(f, labels), (features,))


def test_projection_head_outputs_unit_vectors() -> None:
    torch.manual_seed(0)
    out = ProjectionHead(6, 8, 3)(torch.randn(5, 6))
    assert out.shape == (5, 3)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


# --- distillation ----------------------------------------------------------------------------------------------


def softmax(row: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in row)
    return [math.exp(v) / total for v in row]


def test_soft_kd_is_kl_of_softened_distributions_times_t_squared() -> None:
    t = 2.0
    student, teacher = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    p_teacher = softmax([v / t for v in teacher[0]])
    p_student = softmax([v / t for v in student[0]])
    kl_row0 = sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student))  # row 1: identical, KL 0
    value = SoftKD(temperature=t)(torch.tensor(student), torch.tensor(teacher))
    assert value.item() == pytest.approx(t * t * (kl_row0 + 0.0) / 2, abs=1e-6)


def test_hard_kd_is_cross_entropy_on_the_teacher_argmax() -> None:
    student, teacher = [[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]], [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
    value = HardKD()(torch.tensor(student), torch.tensor(teacher))
    assert value.item() == pytest.approx((ce(student[0], 0) + ce(student[1], 1)) / 2, abs=1e-6)


@pytest.mark.parametrize("kd", [SoftKD(temperature=3.0), HardKD()], ids=["soft_kd", "hard_kd"])
def test_kd_gradients_reach_the_student_only(kd) -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kd(student, teacher).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda s: kd(s, teacher), (student.detach().requires_grad_(True),))


def test_alpha_schedules() -> None:
    assert kd_alpha("constant", 0.3, alpha=0.7, alpha_start=0.1) == 0.7
    assert kd_alpha("linear", 0.0, alpha=0.8) == 0.0
    assert kd_alpha("linear", 0.25, alpha=0.8) == pytest.approx(0.2)
    assert kd_alpha("linear", 1.0, alpha=0.8, alpha_start=0.4) == pytest.approx(0.8)
    assert kd_alpha("cosine", 0.0, alpha=0.8, alpha_start=0.2) == pytest.approx(0.2)
    assert kd_alpha("cosine", 0.5, alpha=0.8, alpha_start=0.2) == pytest.approx(0.5)
    assert kd_alpha("cosine", 0.25, alpha=1.0) == pytest.approx(1.0 - (1 + math.cos(math.pi / 4)) / 2)
    assert kd_alpha("cosine", 1.0, alpha=0.8, alpha_start=0.2) == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"progress=1.5 must be in \[0, 1\]"):
        kd_alpha("linear", 1.5, alpha=0.5)
    with pytest.raises(ConfigError) as info:
        kd_alpha("linear", 0.5, alpha=1.2, alpha_start=-0.1)
    assert len(info.value.problems) == 2 and "alpha=1.2 must be in [0, 1]" in str(info.value)
    with pytest.raises(RegistryError, match="known: constant, cosine, linear"):
        kd_alpha("step", 0.5, alpha=0.5)
