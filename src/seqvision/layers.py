"""Layers shared by the Sequencer, ViT and MLP-Mixer families."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .ops import gemm, native


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated-normal fan-in init (JAX's lecun_normal), as the reference code uses for convs."""
    fan_in = weight[0].numel()
    # .8796 is the std of a unit normal truncated to [-2, 2]; dividing restores unit variance.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """The authors' linear stochastic-depth ramp, 0 at the first block to `rate` at the last, split per stage.

    timm (since 2023) uses the constant `rate` for every block instead; this only matters in training.
    """
    total = sum(depths)
    ramp = [rate * i / max(total - 1, 1) for i in range(total)]
    return [ramp[sum(depths[:s]): sum(depths[: s + 1])] for s in range(len(depths))]


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `p`, rescale the rest."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout on the last dimension.

    With `native` set (Sequencer's auto and native backends set it), autograd on float32 CPU tensors runs
    the first Linear and the GELU as seqvision.ops.native.LinearGELU: the same function, fewer passes; both
    Linears then run on the GEMM library seqvision.ops.gemm picks for this CPU.
    """

    def __init__(self, dim: int, hidden: int, out: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, out or dim)
        self.drop2 = nn.Dropout(drop)
        self.native = False

    def runs_native(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes LinearGELU: autograd on, float32 on the CPU outside autocast, a plain
        Linear with a bias and exact GELU (an int8 or swapped layer keeps its own forward)."""
        return (self.native and torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and type(self.fc1) is nn.Linear and self.fc1.bias is not None
                and self.exact_gelu)

    @property
    def exact_gelu(self) -> bool:
        """Whether the activation is nn.GELU itself with erf, which the native passes compute. A subclass may
        compute something else in its forward, so it keeps that forward."""
        return type(self.act) is nn.GELU and self.act.approximate == "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_native(x):
            h = native.LinearGELU.apply(x, self.fc1.weight, self.fc1.bias)
            if type(self.fc2) is nn.Linear:  # this CPU's faster GEMM library
                return self.drop2(gemm.linear(self.drop1(h), self.fc2.weight, self.fc2.bias))
        else:
            h = self.act(self.fc1(x))
        return self.drop2(self.fc2(self.drop1(h)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv; returns channels-last (B, H/p, W/p, C)."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, W, C), contiguous: see seqvision.models.sequencer.Downsample
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


def check_image(x: torch.Tensor, in_chans: int, stride: int, fixed: tuple[int, int] | None = None) -> None:
    """Validate an image batch once, at the model boundary, before any layer runs.

    Args:
        x: the batch, expected (B, in_chans, H, W).
        in_chans: channels the model was built for.
        stride: H and W must be multiples of this.
        fixed: the only (H, W) the model accepts, for models whose token count is fixed.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {c} (input shape {tuple(x.shape)})")
    if fixed is not None and (h, w) != tuple(fixed):
        raise ValueError(f"this model takes only {fixed[0]}x{fixed[1]} inputs (its token-mixing MLP fixes "
                         f"the token count), got {h}x{w}")
    if h % stride or w % stride or h == 0 or w == 0:
        raise ValueError(f"input height and width must be positive multiples of the model's stride {stride}, "
                         f"got {h}x{w}")


def resample_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, H, W, C) position grid to (1, size[0], size[1], C).

    Antialiased, as timm does it (its bicubic kernel then matches PIL's), so resampled weights agree.
    """
    if tuple(pos.shape[1:3]) == tuple(size):
        return pos
    grid = pos.permute(0, 3, 1, 2).float()  # (1, H, W, C) -> (1, C, H, W)
    grid = F.interpolate(grid, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).to(pos.dtype)  # (1, C, h, w) -> (1, h, w, C)


def init_weights(module: nn.Module, name: str = "") -> None:
    """The reference init of all three families, applied per module by `named_apply`."""
    if isinstance(module, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                # A tiny random bias in MLPs, as in the JAX ViT/Mixer code the references follow.
                nn.init.normal_(module.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        bound = 1.0 / math.sqrt(module.hidden_size)
        for p in module.parameters():
            nn.init.uniform_(p, -bound, bound)


def named_apply(fn, module: nn.Module, name: str = "") -> None:
    """Apply fn(module, name) depth-first, children before parents, with dotted names."""
    for child_name, child in module.named_children():
        named_apply(fn, child, f"{name}.{child_name}" if name else child_name)
    fn(module, name)


def classifier(dim: int, num_classes: int) -> nn.Module:
    """A zero-initialised Linear classifier (the references' head init), or Identity for 0 classes."""
    if num_classes <= 0:
        return nn.Identity()
    fc = nn.Linear(dim, num_classes)
    nn.init.zeros_(fc.weight)
    nn.init.zeros_(fc.bias)
    return fc


def take_indices(indices: int | list[int] | None, n: int) -> list[int]:
    """timm's convention: None for all n, an int k for the last k, or explicit (possibly negative) indices."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: expected 1..{n} (the last k of {n})")
        return list(range(n - indices, n))
    out = [i % n for i in indices]
    if any(not -n <= i < n for i in indices):
        raise ValueError(f"indices {list(indices)} out of range for {n} outputs")
    return out


def to_fmt(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
    """A (B, H, W, C) map in the requested layout."""
    if output_fmt == "NHWC":
        return x
    if output_fmt == "NCHW":
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool = False):
    """Yield the output of each block in turn, recomputing activations in backward when `checkpointing`."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else block(x)
        yield x


def prune_after(model: nn.Module, seq: str, indices, prune_norm: bool, prune_head: bool) -> list[int]:
    """timm's prune_intermediate_layers for a model whose `seq` (blocks, stages) runs in order before a final
    `norm` and a classifier: keep up to the last index taken; returns the indices taken."""
    take = take_indices(indices, len(getattr(model, seq)))
    setattr(model, seq, getattr(model, seq)[:max(take) + 1])
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.reset_classifier(0)
    return take


class TokenClassifier(nn.Module):
    """The module API that ViT and Mixer share: a Linear `head`, a `blocks` sequence, grad checkpointing.

    Args:
        cfg: the family's config; it needs patch_size, embed_dim, img_size and num_classes.
    """

    grad_checkpointing = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim
        self.stride = cfg.patch_size
        self.grid = (cfg.img_size[0] // cfg.patch_size, cfg.img_size[1] // cfg.patch_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = classifier(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then one group per block."""
        stem = r"^cls_token|^pos_embed|^patch_embed|^stem"
        return dict(stem=stem, blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm and head) for backbone use."""
        return prune_after(self, "blocks", indices, prune_norm, prune_head)
