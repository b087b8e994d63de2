"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with the DeiT presets (Touvron et al., 2021).

Class token, learned position embedding, pre-norm blocks, attention through
`torch.nn.functional.scaled_dot_product_attention`. Parameter names follow timm's `vit_*`/`deit_*` so its
checkpoints load as they are. Any input whose sides are multiples of the patch size works: the position
grid is resampled (bicubic, antialiased as in timm) per forward call, and at load time when the checkpoint
was trained at another size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (DropPath, Mlp, PatchEmbed, TokenClassifier, check_image, drop_path_rates, resample_grid,
                      run_blocks, take_indices, to_fmt)
from ..registry import register_family


@dataclass(frozen=True)
class ViTConfig:
    """One ViT variant. The defaults are `deit_small_patch16_224`."""
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    img_size: tuple[int, int] = (224, 224)  # the size the position grid is stored at
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0  # before the classifier
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # linear ramp over the blocks

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def stride(self) -> int:
        return self.patch_size


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads): one GEMM for q, k, v
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, C/heads) -> (B, N, C)
        return self.proj_drop(self.proj(x))

    def macs(self, inputs, output) -> int:
        """q @ k^T and attn @ v, which no Linear hook sees."""
        B, N, C = inputs[0].shape
        return 2 * B * N * N * C


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads, cfg.attn_drop_rate, cfg.proj_drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit(module: nn.Module) -> None:
    """timm's original ViT init: truncated normal (std .02) Linears with zero bias; torch defaults elsewhere."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(TokenClassifier):
    """ViT/DeiT with a class token and timm's module API.

    Args:
        cfg: the variant; see `ViTConfig` and the presets at the end of this file.
    """

    family = "vit"
    first_conv = "patch_embed.proj"

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], cfg.embed_dim))
        rates = drop_path_rates(cfg.drop_path_rate, (cfg.depth,))[0]
        self.blocks = nn.Sequential(*[Block(cfg, p) for p in rates])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=cfg.embed_dim, reduction=cfg.patch_size, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + h*w, C) position embedding for a patch grid of (h, w)."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, *self.grid, -1)  # (1, N, C) -> (1, H, W, C)
        patch_pos = resample_grid(patch_pos, grid).reshape(1, grid[0] * grid[1], -1)  # -> (1, h*w, C)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample a checkpoint's position grid (square, as timm stores it) to this model's grid."""
        pos = sd.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape and pos.ndim == 3:
            side = int((pos.shape[1] - 1) ** 0.5)
            if side * side == pos.shape[1] - 1:
                grid = pos[:, 1:].reshape(1, side, side, -1)  # (1, N, C) -> (1, H, W, C)
                grid = resample_grid(grid, self.grid).reshape(1, -1, pos.shape[-1])
                sd = {**sd, "pos_embed": torch.cat([pos[:, :1], grid], dim=1)}
        return sd

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image(x, self.cfg.in_chans, self.stride)
        x = self.patch_embed(x)  # (B, C_in, H, W) -> (B, h, w, C)
        B, h, w, C = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, h * w, C)], dim=1)  # -> (B, 1 + h*w, C)
        return x + self.pos_embed_for((h, w)), (h, w)

    def _blocks(self, x: torch.Tensor):
        yield from run_blocks(self.blocks, x, self.grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalised tokens (B, 1 + H*W/p^2, C), class token first."""
        x, _ = self._embed(x)
        for x in self._blocks(x):
            pass
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])  # the class token
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Per-block patch-token maps (class token dropped), as timm returns them; see Sequencer's."""
        take = take_indices(indices, len(self.blocks))
        x, (h, w) = self._embed(x)
        feats = []
        for i, x in enumerate(self._blocks(x)):
            if i in take:
                y = self.norm(x) if norm else x
                feats.append(to_fmt(y[:, 1:].reshape(y.shape[0], h, w, -1), output_fmt))  # (B, N, C) -> (B, h, w, C)
        if intermediates_only:
            return feats
        return self.norm(x), feats


def _vit(dim: int, depth: int, heads: int, **kw) -> ViTConfig:
    return ViTConfig(embed_dim=dim, depth=depth, num_heads=heads, **kw)


PRESETS = {
    "deit_tiny_patch16_224": _vit(192, 12, 3),
    "deit_small_patch16_224": _vit(384, 12, 6),
    "deit_base_patch16_224": _vit(768, 12, 12),
    "vit_small_patch16_224": _vit(384, 12, 6),
    "vit_base_patch16_224": _vit(768, 12, 12),
}


def _small(budget: str, size: int) -> ViTConfig:
    """Small-image presets at the Sequencer's budgets: 4x4 patches, grey at 28 and RGB at 32, 10 classes."""
    dim, depth, heads = {"1m": (128, 5, 4), "5m": (256, 6, 8)}[budget]
    return _vit(dim, depth, heads, patch_size=4, img_size=(size, size), in_chans=1 if size == 28 else 3,
                num_classes=10)


PRESETS.update({f"vit_{b}_{s}": _small(b, s) for b in ("1m", "5m") for s in (28, 32)})

HUB_IDS = {
    "deit_tiny_patch16_224": "timm/deit_tiny_patch16_224.fb_in1k",
    "deit_small_patch16_224": "timm/deit_small_patch16_224.fb_in1k",
    "deit_base_patch16_224": "timm/deit_base_patch16_224.fb_in1k",
    "vit_small_patch16_224": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
}

register_family("vit", ViTConfig, VisionTransformer, PRESETS, HUB_IDS)
