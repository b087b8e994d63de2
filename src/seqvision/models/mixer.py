"""MLP-Mixer (Tolstikhin et al., NeurIPS 2021): token-mixing and channel-mixing MLPs.

Parameter names follow timm's `mixer_*`. The token-mixing MLP's width is the number of patches, so a
Mixer takes only the input size it was built for; another size raises a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (DropPath, Mlp, PatchEmbed, TokenClassifier, check_image, drop_path_rates, init_weights,
                      named_apply, run_blocks, take_indices, to_fmt)
from ..registry import register_family


@dataclass(frozen=True)
class MixerConfig:
    """One Mixer variant. The defaults are `mixer_s16_224`."""
    patch_size: int = 16
    embed_dim: int = 512
    depth: int = 8
    token_ratio: float = 0.5  # token-MLP width as a fraction of embed_dim
    channel_ratio: float = 4.0
    img_size: tuple[int, int] = (224, 224)  # fixed: it sets the number of tokens
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def stride(self) -> int:
        return self.patch_size

    fixed_size = True  # the token-mixing MLPs are as wide as the token grid


class Block(nn.Module):
    def __init__(self, cfg: MixerConfig, tokens: int, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(tokens, int(cfg.token_ratio * dim), drop=cfg.proj_drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(cfg.channel_ratio * dim), drop=cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, C) -> (B, C, N): the token MLP mixes along N, then back
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(TokenClassifier):
    """MLP-Mixer with timm's module API.

    Args:
        cfg: the variant; see `MixerConfig` and the presets at the end of this file.
    """

    family = "mixer"
    first_conv = "stem.proj"
    fixed_input_size = True

    def __init__(self, cfg: MixerConfig = MixerConfig()):
        super().__init__(cfg)
        self.stem = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        rates = drop_path_rates(cfg.drop_path_rate, (cfg.depth,))[0]
        self.blocks = nn.Sequential(*[Block(cfg, self.grid[0] * self.grid[1], p) for p in rates])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=cfg.embed_dim, reduction=cfg.patch_size, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        named_apply(init_weights, self)

    def _blocks(self, x: torch.Tensor):
        check_image(x, self.cfg.in_chans, self.stride, fixed=self.cfg.img_size)
        x = self.stem(x)  # (B, C_in, H, W) -> (B, h, w, C)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, h, w, C) -> (B, N, C)
        yield from run_blocks(self.blocks, x, self.grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalised tokens (B, N, C)."""
        for x in self._blocks(x):
            pass
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))  # (B, N, C) -> (B, C)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Per-block token maps, as timm returns them; see Sequencer's."""
        take = take_indices(indices, len(self.blocks))
        feats = []
        for i, x in enumerate(self._blocks(x)):
            if i in take:
                y = self.norm(x) if norm else x
                feats.append(to_fmt(y.reshape(y.shape[0], *self.grid, -1), output_fmt))  # (B, N, C) -> (B, h, w, C)
        if intermediates_only:
            return feats
        return self.norm(x), feats


PRESETS = {
    "mixer_s16_224": MixerConfig(),
    "mixer_s32_224": MixerConfig(patch_size=32),
    "mixer_b16_224": MixerConfig(embed_dim=768, depth=12),
}


def _small(budget: str, size: int) -> MixerConfig:
    """Small-image presets at the Sequencer's budgets: 4x4 patches, grey at 28 and RGB at 32, 10 classes."""
    dim, depth = {"1m": (128, 7), "5m": (256, 9)}[budget]
    return MixerConfig(embed_dim=dim, depth=depth, patch_size=4, img_size=(size, size),
                       in_chans=1 if size == 28 else 3, num_classes=10)


PRESETS.update({f"mixer_{b}_{s}": _small(b, s) for b in ("1m", "5m") for s in (28, 32)})

HUB_IDS = {"mixer_b16_224": "timm/mixer_b16_224.goog_in21k_ft_in1k"}

register_family("mixer", MixerConfig, MlpMixer, PRESETS, HUB_IDS)
