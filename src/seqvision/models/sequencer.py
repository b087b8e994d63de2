"""Sequencer: LSTMs along the columns and rows of the feature map instead of self-attention.

Tatsunami & Taki, "Sequencer: Deep LSTM for Image Classification", NeurIPS 2022. Parameter names follow
timm's `sequencer2d_*` so its checkpoints load as they are; the authors' release format is remapped in
`seqvision.weights`. Tensors are channels-last, (B, H, W, C), from the stem to the head.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (DropPath, Mlp, PatchEmbed, check_image, classifier, drop_path_rates, init_weights, named_apply,
                      prune_after, resample_grid, run_blocks, take_indices, to_fmt)
from ..ops import gemm, native, recurrence
from ..ops.buffers import MIXED, scratch
from ..ops.inference import (accumulate, cpu_float_eval, dense, equal_chunks, gate_chunk_bytes, mlp_onto, norm_and_seed,
                             project, project_int8)
from ..ops.int8 import Int8Linear
from ..registry import register_family

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# Input gates per chunk of images at native inference (RNN2d.mix_native_inference): 8 to 32 MiB by the size of
# this CPU's last-level cache (measurements in gate_chunk_bytes).
XG_CHUNK_BYTES = gate_chunk_bytes()
BACKENDS = ("auto", "reference", "fused", "native")


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
        return math.prod(self.patch_sizes)


class RNN2d(nn.Module):
    """BiLSTM2D: an RNN down every column and another along every row, fused by a Linear.

    Three backends compute the same function on the same weights (`set_backend`): "reference" (torch's
    RNN modules, cuDNN on GPUs), "fused" (all directions' input projections as one GEMM and their
    recurrences stepping together, in plain PyTorch) and "native" (the same GEMM, the recurrence in C++ on
    the CPU: seqvision.ops.native).

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
        self.union, self.cell = union, cell
        out = hidden * (2 if bidirectional else 1)
        mixed = 2 * out if union == "cat" else out
        # K*D: every direction's hidden states side by side, the recurrences' output before the union
        self.states_width = out * (1 if union in ("vertical", "horizontal") else 2)
        if not with_fc and mixed != dim:
            raise ValueError(f"without fc the {union} output width {mixed} must equal the input width {dim}")
        rnn = CELLS[cell]
        self.rnn_v = rnn(dim, hidden, batch_first=True, bidirectional=bidirectional) if union != "horizontal" else None
        self.rnn_h = rnn(dim, hidden, batch_first=True, bidirectional=bidirectional) if union != "vertical" else None
        self.fc = nn.Linear(mixed, dim) if with_fc else None
        self.backend, self.requested = "reference", "reference"
        self.proj_int8: Int8Linear | None = None  # the stacked input projection in int8 (quantize_int8_)

    def set_backend(self, requested: str) -> None:
        """"auto" is native for single-layer LSTM cells on CPU tensors where the extension builds, and the
        reference otherwise (cuDNN's LSTM on GPUs, see `runs`); "fused" and "native" are checked here."""
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        rnns = [r for r in (self.rnn_v, self.rnn_h) if r is not None]
        fits = all(r.num_layers == 1 and r.bias for r in rnns)
        if requested in ("fused", "native") and not fits:
            raise ValueError(f"the {requested} backend needs single-layer RNNs with biases")
        if requested == "native" and not (self.cell == "lstm" and native.available()):
            raise ValueError("the native backend needs LSTM cells and a working C++ compiler")
        self.requested = requested
        if requested == "auto":
            self.backend = "native" if fits and self.cell == "lstm" and native.available() else "reference"
        else:
            self.backend = requested

    def runs(self, x: torch.Tensor) -> str:
        """The backend that runs for input x: the native kernel reads CPU memory only, so on other devices
        "auto" takes the reference (cuDNN) and a forced "native" the same math in PyTorch ("fused")."""
        if self.backend != "native" or x.device.type == "cpu":
            return self.backend
        return "reference" if self.requested == "auto" else "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.runs(x)
        x = self.mix_native(x) if backend == "native" else self.mix_fused(x) if backend == "fused" else self.mix(x)
        if backend == "native" and type(self.fc) is nn.Linear:
            return gemm.linear(x, self.fc.weight, self.fc.bias)  # this CPU's faster GEMM library
        return self.fc(x) if self.fc is not None else x

    def unite(self, out: torch.Tensor) -> torch.Tensor:
        """The union of the axes' outputs, given concatenated as (B, H, W, vertical | horizontal)."""
        if self.union == "add" and self.rnn_v is not None and self.rnn_h is not None:
            half = out.shape[-1] // 2
            return out[..., :half] + out[..., half:]
        return out

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
        return outs[0] if len(outs) == 1 else self.unite(torch.cat(outs, dim=-1))

    def directions(self) -> list[tuple[str, int, tuple[torch.Tensor, ...]]]:
        """(axis "v"/"h", reverse 0/1, (W_ih, W_hh, b_ih, b_hh)) of every direction: vertical forward,
        vertical backward, horizontal forward, horizontal backward (those the module has), which is also
        the channel order of the reference's cat([v, h])."""
        dirs = []
        for axis, rnn in (("v", self.rnn_v), ("h", self.rnn_h)):
            if rnn is not None:
                for d, sfx in enumerate(["", "_reverse"] if rnn.bidirectional else [""]):
                    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                    dirs.append((axis, d, tuple(getattr(rnn, f"{n}_l0{sfx}") for n in names)))
        return dirs

    def stacked_weights(self, fold: bool):
        """(directions, W_ih (K*G, C), bias (K*G,), W_hh (K, G, D)) with every direction stacked; `fold`
        adds b_hh into the bias (where the cell adds it unchanged: LSTM, tanh-RNN).

        Outside autograd the result is cached until a parameter changes (its version counter or storage
        moves) or the module changes mode (`train`), so inference does not concatenate weights on every call.
        """
        dirs = self.directions()
        key = None if torch.is_grad_enabled() else (fold, tuple((p.data_ptr(), p._version) for *_, w in dirs
                                                                for p in w))
        cached = self.__dict__.get("_stacked_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        w_ih = torch.cat([w[0] for *_, w in dirs])
        b_ih = torch.cat([w[2] + w[3] if fold else w[2] for *_, w in dirs])
        w_hh = torch.stack([w[1] for *_, w in dirs])
        value = (dirs, w_ih, b_ih, w_hh)
        if key is not None:
            self.__dict__["_stacked_cache"] = (key, value)  # not a buffer: never saved, moved or counted
        return value

    def train(self, mode: bool = True) -> "RNN2d":
        """Also drops the cached stacked and packed weights: fused optimizers (torch's AdamW(fused=True))
        update parameters in place without bumping their version counters, so evaluation after training
        steps would otherwise run on the weights of the last evaluation."""
        self.__dict__.pop("_stacked_cache", None)
        self.__dict__.pop("_packed_hh", None)
        return super().train(mode)

    def mix_native(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing with the recurrence in C++ (CPU): (B, H, W, C) -> (B, H, W, union width). Outside
        autograd, `out` (B, H, W, K*D) may be given for the recurrences to write into."""
        B, H, W, C = x.shape
        dirs, w_ih, bias, w_hh = self.stacked_weights(fold=True)
        K, G, _ = w_hh.shape
        if cpu_float_eval(x):
            return self.unite(self.mix_native_inference(x, w_ih, bias.view(K, G), w_hh, dirs, out))
        xg = gemm.linear(x, w_ih).view(B, H, W, K, G)  # (B, H, W, C) -> (B, H, W, K, G): one GEMM
        out = native.lstm2d(xg.float().contiguous(), bias.view(K, G).float(), w_hh.float(),
                            recurrence.groups(dirs, H, W))
        return self.unite(out.to(x.dtype))  # (B, H, W, K*D) -> (B, H, W, union width)

    def mix_native_inference(self, x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor,
                             dirs: list, out: torch.Tensor | None = None) -> torch.Tensor:
        """mix_native outside autograd, before the union: (B, H, W, C) -> (B, H, W, K*D), no states kept.

        The images go in chunks whose input gates fit in XG_CHUNK_BYTES, so that the recurrence reads them
        from cache right after the GEMM writes them instead of from memory (each direction reads its gates
        at scattered pixels); W_hh is packed for the kernel once and kept while the weights stay the same.
        """
        B, H, W, C = x.shape
        K, G, D = w_hh.shape
        packed = self.__dict__.get("_packed_hh")
        if packed is None or packed[0] is not w_hh:  # stacked_weights hands back the same tensor until it changes
            packed = self.__dict__["_packed_hh"] = (w_hh, native.pack_recurrent(w_hh))
        step = equal_chunks(B, XG_CHUNK_BYTES // (H * W * K * G * 4))  # images whose gates fit in the budget
        groups = recurrence.groups(dirs, H, W)
        out = x.new_empty(B, H, W, K * D) if out is None else out
        # (weights, bias) of a float GEMM, or None for an int8 one (an int8 layer may run float on this CPU)
        proj = (w_ih, None) if self.proj_int8 is None else dense(self.proj_int8)
        for b in range(0, B, step):
            part = x[b: b + step].reshape(-1, C)  # (b, H, W, C) -> (b*H*W, C)
            # (b*H*W, C) @ (C, K*G): one GEMM for every direction
            xg = project_int8(part, self.proj_int8) if proj is None else project(part, proj[0])
            xg = xg.view(-1, H, W, K, G)  # (b*H*W, K*G) -> (b, H, W, K, G)
            native.lstm2d(xg, bias, w_hh, groups, w_t=packed[1], out=out[b: b + step])
        return out

    def mix_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing in plain PyTorch, every direction stepping in one batched matmul per timestep."""
        B, H, W, C = x.shape
        # GRU keeps b_hn inside r * (h W_hn + b_hn), so its b_hh stays on the recurrent side.
        fold = self.cell != "gru"
        dirs, w_ih, b_ih, w_hh = self.stacked_weights(fold)
        G = w_hh.shape[1]
        xg = F.linear(x, w_ih, b_ih).view(B, H, W, len(dirs), G)  # (B, H, W, C) -> (B, H, W, K, G): one GEMM

        def seqs(axis: str, d: int, k: int) -> torch.Tensor:
            g = xg[:, :, :, k]
            # vertical: (B, H, W, G) -> (H, B*W, G), step along rows; horizontal: -> (W, B*H, G), along columns
            g = g.permute(1, 0, 2, 3).reshape(H, B * W, G) if axis == "v" else g.permute(2, 0, 1, 3).reshape(W, B * H, G)
            return g.flip(0) if d == 1 else g

        def unseq(axis: str, d: int, y: torch.Tensor) -> torch.Tensor:
            y = y.flip(0) if d == 1 else y
            # (H, B*W, D) -> (B, H, W, D) for vertical; (W, B*H, D) -> (B, H, W, D) for horizontal
            if axis == "v":
                return y.reshape(H, B, W, -1).permute(1, 0, 2, 3)
            return y.reshape(W, B, H, -1).permute(1, 2, 0, 3)

        outs: list[torch.Tensor | None] = [None] * len(dirs)  # every direction is in one group
        for ks, _, _ in recurrence.groups(dirs, H, W):
            b_hh = torch.stack([torch.zeros_like(dirs[k][2][3]) if fold else dirs[k][2][3] for k in ks]).unsqueeze(1)
            xs = torch.stack([seqs(dirs[k][0], dirs[k][1], k) for k in ks])
            ys = recurrence.run(self.cell, xs, w_hh[ks[0]: ks[-1] + 1], b_hh)
            for j, k in enumerate(ks):
                outs[k] = unseq(dirs[k][0], dirs[k][1], ys[j])
        return self.unite(torch.cat(outs, dim=-1))  # (B, H, W, K*D), directions in channel order

    def quantize_int8_(self, engine: str) -> None:
        """Give the native inference path its stacked input projection in int8 (see seqvision.quantize).
        Made for every LSTM mixer, whichever backend runs here, so that an int8 file written on a machine
        without the native kernel loads on one with it, and the other way round (the other paths ignore it)."""
        if self.cell == "lstm":
            self.proj_int8 = Int8Linear(self.stacked_weights(fold=True)[1], None, engine)


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

    def train(self, mode: bool = True) -> "Block":
        gemm.repack()  # weights packed for the inference GEMMs may be stale after optimizer steps
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and cpu_float_eval(x) and isinstance(self.rnn_tokens, RNN2d) \
                and self.rnn_tokens.runs(x) == "native":
            return self.forward_inference(x)
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """forward in eval mode outside autograd, on CPU float32 with the native BiLSTM2D: the same math,
        with the output built in one tensor (the residual plus each GEMM's bias, seeded in the LayerNorm's
        pass, then the GEMMs accumulating onto it) and the activations in reused per-thread buffers."""
        B, H, W, C = x.shape
        rnn, mlp = self.rnn_tokens, self.mlp_channels
        x = x.reshape(B * H * W, C).contiguous()  # (B, H, W, C) -> (B*H*W, C)
        out = torch.empty_like(x)  # a fresh tensor: the caller's x is left as it was
        y = norm_and_seed(x, self.norm1, rnn.fc, out).view(B, H, W, C)  # out = x + fc's bias
        mixed = rnn.mix_native(y, out=scratch(B * H * W * rnn.states_width, MIXED).view(B, H, W, -1))
        mixed = mixed.reshape(B * H * W, -1)  # (B, H, W, M) -> (B*H*W, M)
        out = accumulate(out, mixed, rnn.fc)
        y = norm_and_seed(out, self.norm2, mlp.fc2, out)  # in place: out += fc2's bias
        return mlp_onto(out, y, mlp).view(B, H, W, C)  # (B*H*W, C) -> (B, H, W, C)


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
        reductions = list(itertools.accumulate(cfg.patch_sizes, operator.mul))
        self.feature_info = [dict(num_chs=d, reduction=r, module=f"stages.{i}")
                             for i, (d, r) in enumerate(zip(cfg.embed_dims, reductions))]
        named_apply(init_weights, self)
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)
        self.set_backend(cfg.backend)

    def set_backend(self, backend: str) -> None:
        """Run every BiLSTM2D with "reference" (torch's RNN modules), "fused" or "auto" (fastest available).
        "auto" and "native" also give the MLPs the native Linear + GELU in training where the extension
        builds; "reference" is plain PyTorch throughout."""
        for m in self.modules():
            if isinstance(m, RNN2d):
                m.set_backend(backend)
            elif isinstance(m, Mlp):
                m.native = backend in ("auto", "native") and native.available()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"} if self.absolute_pos_embed is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then stages or blocks."""
        if coarse:
            return dict(stem=r"^stem|^absolute_pos_embed", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])
        return dict(stem=r"^stem|^absolute_pos_embed",
                    blocks=[(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)\.downsample", (0,)),
                            (r"^norm", (99999,))])

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of `indices` (and the final norm and head) for backbone use."""
        return prune_after(self, "stages", indices, prune_norm, prune_head)

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


def _ablations(base: SequencerConfig, name: str) -> dict[str, SequencerConfig]:
    """The paper's ablations of a preset, built as the authors built theirs of Sequencer2D-S: the one-axis
    variants double the hidden size and drop fc (4D = C as before), the 1-D vanilla mixer has 2D = C."""
    h2x = dict(hidden_sizes=tuple(2 * h for h in base.hidden_sizes))
    r = dataclasses.replace
    return {f"{name}_unidirectional": r(base, bidirectional=False), f"{name}_add": r(base, union="add"),
            f"{name}_without_fc": r(base, with_fc=False),
            f"{name}_vertical": r(base, union="vertical", with_fc=False, **h2x),
            f"{name}_horizontal": r(base, union="horizontal", with_fc=False, **h2x),
            f"gru_{name}": r(base, cell="gru"), f"rnn_{name}": r(base, cell="rnn"),
            f"v_{name.replace('sequencer2d', 'sequencer')}": r(base, mixer="1d", **h2x)}


PRESETS.update(_ablations(PRESETS["sequencer2d_1m_28"], "sequencer2d_1m_28"))  # `seqvision experiment ablation`

HUB_IDS = {f"sequencer2d_{s}": f"timm/sequencer2d_{s}.in1k" for s in "sml"}

register_family("sequencer", SequencerConfig, Sequencer, PRESETS, HUB_IDS)
