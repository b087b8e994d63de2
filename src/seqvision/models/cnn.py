"""A small ResNet as the CNN baseline at the small-image parameter budgets: timm's ResNet class with one
BasicBlock per stage (a ResNet-10) and narrowed widths, so its module API and weight names are timm's own."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.resnet import BasicBlock
from timm.models.resnet import ResNet as TimmResNet

from ..registry import register_family


@dataclass(frozen=True)
class CNNConfig:
    """One ResNet variant. The defaults are `resnet_1m_28`."""
    layers: tuple[int, int, int, int] = (1, 1, 1, 1)  # timm's ResNet has four stages
    channels: tuple[int, int, int, int] = (32, 64, 128, 224)
    stem_width: int = 32
    img_size: tuple[int, int] = (28, 28)  # default input size (any size runs: convolutions and a global pool)
    in_chans: int = 1
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    stride = 1  # convolutions and a global pool take any size


class ResNet(TimmResNet):
    """timm's ResNet built from a CNNConfig: a 7x7 stride-2 stem and max pool (28 px -> 7x7), then four
    stages, each after the first halving the map (7 -> 4 -> 2 -> 1 at 28 px).

    Args:
        cfg: the variant; see `CNNConfig` and the presets below.
    """

    family = "cnn"
    first_conv = "conv1"
    stride = 1  # takes any input size

    def __init__(self, cfg: CNNConfig = CNNConfig()):
        super().__init__(BasicBlock, cfg.layers, num_classes=cfg.num_classes, in_chans=cfg.in_chans,
                         channels=cfg.channels, stem_width=cfg.stem_width, drop_rate=cfg.drop_rate,
                         drop_path_rate=cfg.drop_path_rate)
        self.cfg = cfg

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, **kw):
        """timm's ResNet feature maps, also as NHWC (timm's own gives NCHW only)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        out = super().forward_intermediates(x, indices, norm=norm, intermediates_only=intermediates_only, **kw)
        if output_fmt == "NCHW":
            return out
        nhwc = lambda fs: [f.permute(0, 2, 3, 1) for f in fs]  # noqa: E731  (B, C, H, W) -> (B, H, W, C)
        return nhwc(out) if intermediates_only else (out[0], nhwc(out[1]))


def _small(budget: str, size: int) -> CNNConfig:
    channels = {"1m": (32, 64, 128, 224), "5m": (64, 128, 256, 512)}[budget]
    return CNNConfig(channels=channels, img_size=(size, size), in_chans=1 if size == 28 else 3)


PRESETS = {f"resnet_{b}_{s}": _small(b, s) for b in ("1m", "5m") for s in (28, 32)}

register_family("cnn", CNNConfig, ResNet, PRESETS)
