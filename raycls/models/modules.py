"""Model modules (`model.modules`): parts added to a built backbone, each with its own options.

    model:
      name: resnet18
      modules: {cbam: {reduction: 16}, mixstyle: {p: 0.5, stages: [0, 1]}}

CNN modules work on the stages timm lists in `feature_info` (resnet's layer1..4, convnext's stages.N, ...):
CBAM (Woo et al. 2018) refines each stage's output with channel then spatial attention; MixStyle (Zhou et
al. 2021) mixes the feature statistics of images in a training batch after the first stages (off at eval).
ViT modules work on timm VisionTransformers' blocks: token merging (ToMe, Bolya et al. 2023) merges the `r`
most similar patch tokens in each block; a TokenLearner (Ryoo et al. 2021) replaces the patch tokens after
one block by a few learned ones.

The backbone's own modules keep their names (state-dict keys): a module is attached beside them (its
weights under `model_modules.`) and runs as a forward hook on the stage it follows, or, for ToMe, as the
blocks' forward. Pretrained weights load before modules are added (timm.create_model), and a checkpoint of a
model with modules loads into a model built from the same config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from raycls.config.schema import Frozen
from raycls.errors import ConfigError
from raycls.registry import Registry

# raycls.models.registry.InputSpec, by name only: the registry applies modules, so importing it is a circle.
InputSpec = Any

# Where added modules live on the backbone (one ModuleDict, so a state dict names them all under it).
ATTACHED = "model_modules"


class ModuleOptions(Frozen):
    """Options every model module takes. `enabled: false` leaves it out (a search can switch it)."""

    enabled: bool = True


@dataclass(frozen=True)
class ModelModule:
    options: type[ModuleOptions]
    apply: Callable[[nn.Module, Any, InputSpec], None]  # (backbone, its options, input) -> changes in place
    # Modules sharing a tag cannot be combined (both ToMe and a TokenLearner change the token count).
    exclusive: str | None = None


MODEL_MODULES: Registry[ModelModule] = Registry("model module")


def model_module(name: str, options: type[ModuleOptions], *, exclusive: str | None = None) -> Callable:
    def add(apply: Callable[[nn.Module, Any, InputSpec], None]) -> Callable:
        MODEL_MODULES.register(name)(ModelModule(options, apply, exclusive))
        return apply

    return add


def apply_modules(backbone: nn.Module, modules: dict[str, dict[str, Any] | None], spec: InputSpec) -> nn.Module:
    """Add the enabled modules of `model.modules` to `backbone`, in registration order (CNN stage modules
    before token modules), whatever order the YAML lists them in."""
    for name, entry in MODEL_MODULES.in_order():
        if name not in modules:
            continue
        options = entry.options.model_validate(modules[name] or {})
        if options.enabled:
            entry.apply(backbone, options, spec)
    return backbone


def attach(backbone: nn.Module, key: str, module: nn.Module) -> nn.Module:
    if not hasattr(backbone, ATTACHED):
        setattr(backbone, ATTACHED, nn.ModuleDict())
    getattr(backbone, ATTACHED)[key] = module
    return module


class AfterStage(nn.Module):
    """A module applied to a stage's output through a forward hook. The hook is this module's bound
    method, which deepcopy (EMA, SWA) rebinds to the copy and pickle stores by name."""

    def after(self, stage: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def follow(self, stage: nn.Module) -> None:
        stage.register_forward_hook(self.after)


# ------------------------------------------------------------------------------------------ CNN stages
@dataclass(frozen=True)
class Stage:
    name: str
    module: nn.Module
    channels: int


def cnn_stages(backbone: nn.Module, what: str) -> list[Stage]:
    """The backbone's feature stages (timm's feature_info, less parameter-free entries such as resnet's act1)."""
    if hasattr(backbone, "patch_embed") or not hasattr(backbone, "feature_info"):
        raise ConfigError(
            f"model.modules.{what}: needs a CNN with feature stages (timm's feature_info: resnet, convnext, "
            f"efficientnet, ...); {type(backbone).__name__} has none"
        )
    named = dict(backbone.named_modules())
    stages = []
    for info in backbone.feature_info:
        module = named.get(info["module"])
        if module is not None and any(True for _ in module.parameters()):
            stages.append(Stage(info["module"], module, int(info["num_chs"])))
    return stages


def pick(stages: list[Stage], indices: list[int] | None, what: str) -> list[Stage]:
    if indices is None:
        return stages
    bad = [i for i in indices if not -len(stages) <= i < len(stages)]
    if bad:
        raise ConfigError(
            f"model.modules.{what}.stages: {bad} out of range; this model's stages are "
            f"{', '.join(f'{i}: {s.name}' for i, s in enumerate(stages))}"
        )
    return [stages[i] for i in indices]


class CbamOptions(ModuleOptions):
    reduction: int = Field(16, ge=1)  # channel attention's bottleneck ratio
    kernel_size: int = Field(7, ge=1)  # spatial attention's kernel
    stages: list[int] | None = None  # indices into the model's stages; None: every stage


class Cbam(AfterStage):
    def __init__(self, channels: int, options: CbamOptions):
        super().__init__()
        from timm.layers.cbam import CbamModule

        self.cbam = CbamModule(channels, rd_ratio=1.0 / options.reduction, spatial_kernel_size=options.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbam(x)


def _apply_cbam(backbone: nn.Module, options: CbamOptions, spec: InputSpec) -> None:
    for stage in pick(cnn_stages(backbone, "cbam"), options.stages, "cbam"):
        attach(backbone, f"cbam_{stage.name.replace('.', '_')}", Cbam(stage.channels, options)).follow(stage.module)


class MixStyleOptions(ModuleOptions):
    p: float = Field(0.5, ge=0.0, le=1.0)  # probability that a training batch is mixed at each stage
    alpha: float = Field(0.1, gt=0.0)  # Beta(alpha, alpha) mixing weights
    eps: float = Field(1e-6, gt=0.0)
    stages: list[int] | None = [0, 1]  # the paper's choice: after the first stages (style lives low)


class MixStyle(AfterStage):
    """Per image and channel, normalise by the feature map's mean and std, then re-style with a mix of its
    own and a random other image's statistics. Training only: in eval mode it returns its input unchanged."""

    def __init__(self, options: MixStyleOptions):
        super().__init__()
        self.p, self.alpha, self.eps = options.p, options.alpha, options.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] < 2 or torch.rand(()) >= self.p:
            return x
        mu = x.mean(dim=(2, 3), keepdim=True)
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        mu, sig = mu.detach(), sig.detach()  # the statistics carry style, not gradient (as the paper)
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((x.shape[0], 1, 1, 1)).to(x)
        perm = torch.randperm(x.shape[0], device=x.device)
        mixed_mu = lam * mu + (1 - lam) * mu[perm]
        mixed_sig = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * mixed_sig + mixed_mu


def _apply_mixstyle(backbone: nn.Module, options: MixStyleOptions, spec: InputSpec) -> None:
    for stage in pick(cnn_stages(backbone, "mixstyle"), options.stages, "mixstyle"):
        attach(backbone, f"mixstyle_{stage.name.replace('.', '_')}", MixStyle(options)).follow(stage.module)


# ---------------------------------------------------------------------------------------- ViT tokens
def vit_blocks(backbone: nn.Module, what: str) -> nn.Sequential:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer) or not isinstance(backbone.blocks, nn.Sequential):
        raise ConfigError(
            f"model.modules.{what}: needs a timm VisionTransformer (vit_*, deit_*, cifar_deit); "
            f"{type(backbone).__name__} is not one"
        )
    return backbone.blocks


class TomeOptions(ModuleOptions):
    r: int = Field(4, ge=1)  # patch tokens merged away in each block (at most half of those left)


class TomeState:
    """The merged tokens' sizes (patches each stands for), shared by one forward pass's blocks."""

    def __init__(self, prefix: int):
        self.prefix = prefix
        self.size: torch.Tensor | None = None


def bipartite_merge(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ToMe's bipartite soft matching on tokens [B, N, C]: alternate tokens form sets A and B, each A token
    points at its most similar B token (cosine of `metric`), and the `r` A tokens with the most similar
    partners are summed into them. Returns the merge (sums; callers divide by merged sizes)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    kept = order[:, r:].sort(dim=1).values  # unmerged A tokens, in their original order
    merged, into = order[:, :r], partner[..., None].gather(dim=1, index=order[:, :r])

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t, c = src.shape
        unmerged = src.gather(dim=1, index=kept.expand(n, t - r, c))
        moving = src.gather(dim=1, index=merged.expand(n, r, c))
        return torch.cat([unmerged, dst.scatter_add(1, into.expand(n, r, c), moving)], dim=1)

    return merge


def _tome_block_forward(block: nn.Module, x: torch.Tensor, state: TomeState, r: int) -> torch.Tensor:
    """timm's Block with ToMe: attention weighted by token size (proportional attention), then the patch
    tokens merged by their keys' similarity (averaged by size), then the MLP."""
    attn = block.attn
    h = block.norm1(x)
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    size = state.size if state.size is not None else torch.ones(B, N, 1, device=x.device, dtype=x.dtype)
    bias = size.log().to(q.dtype).reshape(B, 1, 1, N)  # a token standing for s patches counts s times
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if block.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    p = state.prefix
    r = min(r, (N - p) // 2)
    if r > 0:
        merge = bipartite_merge(k.mean(dim=1)[:, p:], r)
        patches, patch_size = x[:, p:], size[:, p:]
        summed, sizes = merge(patches * patch_size), merge(patch_size)
        x = torch.cat([x[:, :p], summed / sizes], dim=1)
        size = torch.cat([size[:, :p], sizes], dim=1)
    state.size = size
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class TomeBlocks(nn.Sequential):
    """A ViT's blocks (same children, same state-dict keys) running ToMe's block forward in turn."""

    def __init__(self, blocks: nn.Sequential, r: int, prefix: int):
        super().__init__(*blocks)
        self.r = r
        self.tome = TomeState(prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tome.size = None
        for block in self:
            x = _tome_block_forward(block, x, self.tome, self.r)
        self.tome.size = None
        return x


def _apply_tome(backbone: nn.Module, options: TomeOptions, spec: InputSpec) -> None:
    from timm.models.vision_transformer import Block

    blocks = vit_blocks(backbone, "tome")
    if any(type(block) is not Block for block in blocks):
        raise ConfigError(f"model.modules.tome: needs timm's plain ViT Block; {type(blocks[0]).__name__} is another")
    backbone.blocks = TomeBlocks(blocks, options.r, backbone.num_prefix_tokens)


class TokenLearnerOptions(ModuleOptions):
    tokens: int = Field(8, ge=1)  # learned tokens that replace the patch tokens
    after: float = Field(0.5, ge=0.0, le=1.0)  # after this fraction of the blocks (0.5: the middle one)
    hidden: int = Field(64, ge=1)  # the attention maps' MLP width


class TokenLearner(AfterStage):
    """TokenLearner v1.1: a LayerNorm and an MLP give `tokens` attention maps over the patch tokens (softmax
    over positions); each learned token is its map's weighted sum of the patches. Prefix tokens pass."""

    def __init__(self, dim: int, options: TokenLearnerOptions, prefix: int):
        super().__init__()
        self.prefix = prefix
        self.norm = nn.LayerNorm(dim)
        self.maps = nn.Sequential(nn.Linear(dim, options.hidden), nn.GELU(), nn.Linear(options.hidden, options.tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x[:, : self.prefix], x[:, self.prefix :]
        weights = self.maps(self.norm(patches)).softmax(dim=1)  # [B, N, S]: each map sums to 1 over positions
        return torch.cat([prefix, weights.transpose(1, 2) @ patches], dim=1)


def _apply_token_learner(backbone: nn.Module, options: TokenLearnerOptions, spec: InputSpec) -> None:
    blocks = vit_blocks(backbone, "token_learner")
    patches = backbone.patch_embed.num_patches
    if options.tokens >= patches:
        raise ConfigError(
            f"model.modules.token_learner.tokens: {options.tokens} must be fewer than the {patches} patch tokens"
        )
    index = min(len(blocks) - 1, max(0, math.ceil(options.after * len(blocks)) - 1))
    learner = TokenLearner(backbone.embed_dim, options, backbone.num_prefix_tokens)
    attach(backbone, "token_learner", learner).follow(blocks[index])


model_module("cbam", CbamOptions)(_apply_cbam)
model_module("mixstyle", MixStyleOptions)(_apply_mixstyle)
model_module("tome", TomeOptions, exclusive="token count")(_apply_tome)
model_module("token_learner", TokenLearnerOptions, exclusive="token count")(_apply_token_learner)
