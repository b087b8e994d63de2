"""Sequencer: LSTMs along the columns and rows of the feature map instead of self-attention.

Tatsunami & Taki, "Sequencer: Deep LSTM for Image Classification", NeurIPS 2022. Parameter names follow
timm's `sequencer2d_*` so its checkpoints load as they are; the authors' release format is remapped in
`seqvision.weights`. Tensors are channels-last, (B, H, W, C), from the stem to the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..fused import block_inference, fast_inference, pick_backend, rnn2d_fused
from ..layers import (DropPath, Mlp, PatchEmbed, check_image, classifier, drop_path_rates, init_weights, named_apply,
                      resample_grid, run_blocks, take_indices, to_fmt)
from ..registry import register_family

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class SequencerConfig:
    """One Sequencer variant. The defaults are `sequencer2d_s`."""
    layers: tuple[int, ...] = (4, 3, 8, 3)
    patch_sizes: tuple[int, ...] = (7, 2, 1, 1)
    embed_dims: tuple[int, ...] = (192, 384, 384, 384)
    hidden_sizes: tuple[int, ...] = (48, 96, 96, 96)
    mlp_ratio: float = 3.0
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    bidirectional: bool = True
    union: Literal["cat", "add", "vertical", "horizontal"] = "cat"
    with_fc: bool = True
    mixer: Literal["2d", "1d"] = "2d"  # "1d": the vanilla Sequencer, one RNN over row-major tokens
    pos_embed: bool = False  # learned absolute position grid (v_sequencer_s_pe)
    img_size: tuple[int, int] = (224, 224)  # default input size: position grid, MAC count, data config
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0  # before the classifier
    proj_drop_rate: float = 0.0  # inside the MLPs
    drop_path_rate: float = 0.0  # linear ramp over all blocks (the authors' schedule)
    backend: Literal["auto", "reference", "fused", "native"] = "auto"  # how BiLSTM2D runs; same weights either way

    def __post_init__(self):
        n = len(self.layers)
        for field in ("patch_sizes", "embed_dims", "hidden_sizes"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries, layers has {n}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.union not in ("cat", "add", "vertical", "horizontal"):
            raise ValueError(f"union must be cat, add, vertical or horizontal, got {self.union!r}")
        if self.mixer not in ("2d", "1d"):
            raise ValueError(f"mixer must be '2d' or '1d', got {self.mixer!r}")

    @property
    def stride(self) -> int:
        return int(torch.tensor(self.patch_sizes).prod())


class RNN2d(nn.Module):
    """BiLSTM2D: an RNN down every column and another along every row, fused by a Linear.

    Args:
        dim: channels C of the (B, H, W, C) input and output.
        hidden: hidden size D of each direction.
        cell: "lstm", "gru" or "rnn" (tanh); any of torch's RNN modules, so their weights interchange.
        bidirectional: run each axis both ways (output 2D per axis) or forwards only (D).
        union: "cat" concatenates the vertical and horizontal outputs, "add" sums them; "vertical" or
            "horizontal" keeps one axis only.
        with_fc: fuse channels with Linear(mixed, C); without it the mixed width must equal C.
    """

    def __init__(self, dim: int, hidden: int, cell: str = "lstm", bidirectional: bool = True,
                 union: str = "cat", with_fc: bool = True):
        super().__init__()
        self.union = union
        out = hidden * (2 if bidirectional else 1)
        mixed = 2 * out if union == "cat" else out
        if not with_fc and mixed != dim:
            raise ValueError(f"without fc the {union} output width {mixed} must equal the input width {dim}")
        rnn = CELLS[cell]
        self.rnn_v = rnn(dim, hidden, batch_first=True, bidirectional=bidirectional) if union != "horizontal" else None
        self.rnn_h = rnn(dim, hidden, batch_first=True, bidirectional=bidirectional) if union != "vertical" else None
        self.fc = nn.Linear(mixed, dim) if with_fc else None
        self.backend = "reference"  # set by the model through seqvision.fused.pick_backend; same weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend in ("fused", "native"):
            x = rnn2d_fused(self, x, native=self.backend == "native")
        else:
            x = self.mix(x)
        return self.fc(x) if self.fc is not None else x

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: torch's RNN modules on each axis, before channel fusion."""
        B, H, W, C = x.shape
        outs = []
        if self.rnn_v is not None:
            v = x.permute(0, 2, 1, 3).reshape(B * W, H, C)  # (B, H, W, C) -> (B*W, H, C): columns as sequences
            v = self.rnn_v(v)[0]
            outs.append(v.reshape(B, W, H, -1).permute(0, 2, 1, 3))  # (B*W, H, O) -> (B, H, W, O)
        if self.rnn_h is not None:
            h = self.rnn_h(x.reshape(B * H, W, C))[0]  # (B, H, W, C) -> (B*H, W, C): rows as sequences
            outs.append(h.reshape(B, H, W, -1))  # (B*H, W, O) -> (B, H, W, O)
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs, dim=-1) if self.union == "cat" else outs[0] + outs[1]


class RNN1d(nn.Module):
    """The vanilla Sequencer's token mixer: one (bi)RNN over all tokens in row-major order, no fc."""

    def __init__(self, dim: int, hidden: int, cell: str = "lstm", bidirectional: bool = True):
        super().__init__()
        out = hidden * (2 if bidirectional else 1)
        if out != dim:
            raise ValueError(f"the 1-D mixer has no fc: its output width {out} must equal the input width {dim}")
        self.rnn = CELLS[cell](dim, hidden, batch_first=True, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.rnn(x.reshape(B, H * W, C))[0]  # (B, H, W, C) -> (B, H*W, C): raster order
        return y.reshape(B, H, W, -1)  # (B, H*W, C) -> (B, H, W, C)


class Block(nn.Module):
    """Pre-norm residual block: token mixing by the RNN, then channel mixing by the MLP."""

    def __init__(self, cfg: SequencerConfig, dim: int, hidden: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if cfg.mixer == "2d":
            self.rnn_tokens = RNN2d(dim, hidden, cfg.cell, cfg.bidirectional, cfg.union, cfg.with_fc)
        else:
            self.rnn_tokens = RNN1d(dim, hidden, cfg.cell, cfg.bidirectional)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(cfg.mlp_ratio * dim), drop=cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_inference(self.rnn_tokens, x):
            return block_inference(self, x)
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class Downsample(nn.Module):
    """Strided conv between stages, on channels-last tensors."""

    def __init__(self, dim_in: int, dim_out: int, patch: int):
        super().__init__()
        self.down = nn.Conv2d(dim_in, dim_out, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x.permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        # (B, C', H', W') -> (B, H', W', C'), copied once here: as a permuted view, every residual add
        # would keep its strides and every LayerNorm of the stage would copy it again.
        return x.permute(0, 2, 3, 1).contiguous()


class Stage(nn.Module):
    def __init__(self, cfg: SequencerConfig, i: int, drop_paths: list[float]):
        super().__init__()
        dim = cfg.embed_dims[i]
        self.downsample = Downsample(cfg.embed_dims[i - 1], dim, cfg.patch_sizes[i]) if i > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[Block(cfg, dim, cfg.hidden_sizes[i], p) for p in drop_paths])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for x in run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing):
            pass
        return x


class Head(nn.Module):
    """Global average over (H, W), dropout, linear classifier."""

    def __init__(self, dim: int, num_classes: int, drop: float):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = classifier(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, C)
        return x if pre_logits else self.fc(x)


class Sequencer(nn.Module):
    """Sequencer2D (and the vanilla 1-D Sequencer) with timm's module API.

    Args:
        cfg: the variant; see `SequencerConfig` and the presets at the end of this file.
    """

    family = "sequencer"
    first_conv = "stem.proj"

    def __init__(self, cfg: SequencerConfig = SequencerConfig()):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dims[-1]
        self.stride = cfg.stride
        self.stem = PatchEmbed(cfg.in_chans, cfg.embed_dims[0], cfg.patch_sizes[0])
        self.absolute_pos_embed = None
        if cfg.pos_embed:
            grid = (cfg.img_size[0] // cfg.patch_sizes[0], cfg.img_size[1] // cfg.patch_sizes[0])
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, cfg.embed_dims[0]))
        rates = drop_path_rates(cfg.drop_path_rate, cfg.layers)
        self.stages = nn.Sequential(*[Stage(cfg, i, rates[i]) for i in range(len(cfg.layers))])
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = Head(self.num_features, cfg.num_classes, cfg.drop_rate)
        reductions = torch.tensor(cfg.patch_sizes).cumprod(0).tolist()
        self.feature_info = [dict(num_chs=d, reduction=r, module=f"stages.{i}")
                             for i, (d, r) in enumerate(zip(cfg.embed_dims, reductions))]
        named_apply(init_weights, self)
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)
        self.set_backend(cfg.backend)

    def set_backend(self, backend: str) -> None:
        """Run every BiLSTM2D with "reference" (torch's RNN modules), "fused" or "auto" (fastest available)."""
        for m in self.modules():
            if isinstance(m, RNN2d):
                m.backend = pick_backend(m, backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.fc = classifier(self.num_features, num_classes)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.cfg.in_chans, self.stride)
        x = self.stem(x)  # (B, C_in, H, W) -> (B, H/p, W/p, C)
        if self.absolute_pos_embed is not None:
            x = x + resample_grid(self.absolute_pos_embed, tuple(x.shape[1:3]))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalised (B, H/stride, W/stride, num_features)."""
        return self.norm(self.stages(self._embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Per-stage feature maps, as timm returns them.

        Args:
            x: (B, C_in, H, W) images.
            indices: stage indices to return, or an int n for the last n stages; None for all.
            norm: apply the final norm to the last stage's map as well.
            output_fmt: "NCHW" (timm's default) or "NHWC".
            intermediates_only: return only the list, not (final features, list).
        """
        n = len(self.stages)
        take = take_indices(indices, n)
        feats = []
        x = self._embed(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take:
                feats.append(to_fmt(self.norm(x) if norm and i == n - 1 else x, output_fmt))
        if intermediates_only:
            return feats
        return self.norm(x), feats


# Presets ------------------------------------------------------------------------------------------------

_S = SequencerConfig()
_M = SequencerConfig(layers=(4, 3, 14, 3))
_L = SequencerConfig(layers=(8, 8, 16, 4))
_H2X = dict(hidden_sizes=(96, 192, 192, 192))
_V = SequencerConfig(mixer="1d", patch_sizes=(14, 1, 1, 1), embed_dims=(384,) * 4, hidden_sizes=(192,) * 4)

PRESETS = {
    "sequencer2d_s": _S,
    "sequencer2d_m": _M,
    "sequencer2d_l": _L,
    "sequencer2d_s_392": SequencerConfig(img_size=(392, 392)),
    "sequencer2d_m_392": SequencerConfig(layers=_M.layers, img_size=(392, 392)),
    "sequencer2d_l_392": SequencerConfig(layers=_L.layers, img_size=(392, 392)),
    # Ablations of the paper (no released weights).
    "sequencer2d_s_unidirectional": SequencerConfig(bidirectional=False),
    "sequencer2d_s_add": SequencerConfig(union="add"),
    "sequencer2d_s_h2x": SequencerConfig(**_H2X),
    "sequencer2d_s_without_fc": SequencerConfig(with_fc=False),
    "sequencer2d_s_vertical": SequencerConfig(union="vertical", with_fc=False, **_H2X),
    "sequencer2d_s_horizontal": SequencerConfig(union="horizontal", with_fc=False, **_H2X),
    "gru_sequencer2d_s": SequencerConfig(cell="gru"),
    "rnn_sequencer2d_s": SequencerConfig(cell="rnn"),
    "sequencer2d_l_d4_3x": SequencerConfig(layers=_L.layers, embed_dims=(256, 512, 512, 512),
                                           hidden_sizes=(64, 128, 128, 128)),
    # The vanilla (1-D) Sequencer: one deep BiLSTM over the flattened tokens.
    "v_sequencer_s": _V,
    "v_sequencer_s_h": SequencerConfig(mixer="1d", **_H2X),
    "v_sequencer_s_pe": SequencerConfig(mixer="1d", pos_embed=True, patch_sizes=_V.patch_sizes,
                                        embed_dims=_V.embed_dims, hidden_sizes=_V.hidden_sizes),
}


def _small(budget: str, size: int) -> SequencerConfig:
    """Small-image presets: a 4x4-patch stem (7x7 tokens at 28, 8x8 at 32), then a 1x1 widening conv."""
    dims, hidden, layers = {"300k": ((64, 96), (16, 24), (2, 2)), "1m": ((96, 128), (24, 32), (2, 4)),
                            "5m": ((128, 256), (32, 64), (2, 6))}[budget]
    return SequencerConfig(layers=layers, patch_sizes=(4, 1), embed_dims=dims, hidden_sizes=hidden,
                           img_size=(size, size), in_chans=1 if size == 28 else 3, num_classes=10)


PRESETS.update({f"sequencer2d_{b}_{s}": _small(b, s) for b in ("300k", "1m", "5m") for s in (28, 32)})

HUB_IDS = {f"sequencer2d_{s}": f"timm/sequencer2d_{s}.in1k" for s in "sml"}

register_family("sequencer", SequencerConfig, Sequencer, PRESETS, HUB_IDS)
