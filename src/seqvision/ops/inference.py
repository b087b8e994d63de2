"""Inference-only helpers (eval mode outside autograd on the CPU): the block's GEMMs writing into reused
buffers (seqvision.ops.buffers), and its elementwise work fused into passes of the native extension around
them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from . import native
from .buffers import NORMED, scratch
from .gemm import gemm_engine, packed
from .int8 import Int8Linear


def last_level_cache_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size in bytes of CPU 0's highest-level data or unified cache as Linux lists it (sysfs); 0 where it
    does not."""
    level, size = 0, 0
    for d in Path(root).glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            lv, text = int((d / "level").read_text()), (d / "size").read_text().strip().upper()
            n = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        except (OSError, ValueError):
            continue
        if lv > level:
            level, size = lv, n
    return size


def gate_chunk_bytes(llc: int | None = None) -> int:
    """Input gates per chunk of images at native inference: a quarter of the last-level cache (llc, default
    this CPU's), from 8 to 32 MiB. Sequencer2D-S at batch 16, whole pass, 8 MiB against 32 MiB: level on an
    AMD EPYC (Zen 3, 32 MB L3: sizes 2-64 MiB within noise; stage 1 alone 11% faster in chunks of 6 MiB than
    in one piece); 2.2% and 3.1% faster at 32 MiB on an Intel Xeon (AVX2 and AVX-512 builds, 16 alternating
    rounds), where fewer, larger GEMMs still leave the gates in its larger cache."""
    llc = last_level_cache_bytes() if llc is None else llc
    return min(32 << 20, max(8 << 20, llc // 4))


def cpu_float_eval(x: torch.Tensor) -> bool:
    """Whether x may take the CPU inference paths: float32 on the CPU with autograd off."""
    return not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"


def dense(fc: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a layer that is a float GEMM here: a plain Linear, or an Int8Linear that runs
    float on this CPU (seqvision.ops.int8.runs_int8); None for anything else (an int8 GEMM keeps its bias
    to itself)."""
    if type(fc) is nn.Linear:
        return fc.weight, fc.bias
    if isinstance(fc, Int8Linear) and not fc.int8_gemm:
        return fc.dense_weight(), fc.bias
    return None


# oneDNN's GEMMs hand back a fresh output. glibc serves blocks over 32 MiB from mmap, page-faulted in on
# every call, which costs more than oneDNN saves (16384 x 576, 37.7 MB: 125-135 GFLOP/s against MKL's 179
# in place), so larger outputs go in chunks of rows (mlp_onto) or to MKL.
FRESH_OUTPUT_BYTES = 30 << 20
# Narrower GEMMs stay on MKL at inference: with 64 or 96 on a side, oneDNN's GELU and add epilogues cost
# more than its GEMM saves (the main job's model, batch 128: 0.84x and 0.98x the whole pass with every GEMM
# on oneDNN).
ONEDNN_MIN_FEATURES = 128


def equal_chunks(n: int, most: int) -> int:
    """The chunk size that splits n items into as few chunks of at most `most` as possible, made equal:
    16 by at most 5 -> 4 chunks of 4."""
    return math.ceil(n / math.ceil(n / max(1, most)))


def _onednn(weight: torch.Tensor) -> bool:
    """Whether x @ weight^T goes to oneDNN: gemm_engine() says so and both of weight's sides are at least
    ONEDNN_MIN_FEATURES."""
    return gemm_engine() == "onednn" and min(weight.shape) >= ONEDNN_MIN_FEATURES


def _fresh(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T goes to oneDNN, which writes a fresh output: _onednn and the output is at most
    FRESH_OUTPUT_BYTES."""
    return _onednn(weight) and x.shape[0] * weight.shape[0] * 4 <= FRESH_OUTPUT_BYTES


# The native GEMM writes whole vectors of its build (16 floats at most), so it takes weights with a multiple
# of that many outputs (every layer of the Sequencer blocks here); others go to MKL.
NATIVE_GEMM_MULTIPLE = 16


def _native(weight: torch.Tensor) -> bool:
    """Whether x @ weight^T runs on the extension's gemm_nt: gemm_engine() says so and weight's out
    features are a multiple of NATIVE_GEMM_MULTIPLE."""
    return gemm_engine() == "native" and weight.shape[0] % NATIVE_GEMM_MULTIPLE == 0


def mm_onto(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, add: bool = False) -> torch.Tensor:
    """out = x @ weight^T, or out += it with `add`, for 2-D x and contiguous out: the native GEMM on its
    packed weights where _native, MKL otherwise."""
    if _native(weight):
        ext = native.extension()
        ext.gemm_nt(x.contiguous(), packed(weight, ext.pack_gemm), out, add)
        return out
    return out.addmm_(x, weight.t()) if add else torch.mm(x, weight.t(), out=out)


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for 2-D contiguous x, no bias: on oneDNN into a fresh tensor, otherwise into the WIDE
    buffer (so the caller must be done with it)."""
    if _fresh(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), None, "none", [], "")
    return mm_onto(scratch(x.shape[0] * weight.shape[0]).view(x.shape[0], -1), x, weight)


def project_int8(x: torch.Tensor, fc: Int8Linear) -> torch.Tensor:
    """fc(x) for 2-D x into the WIDE buffer (so the caller must be done with it), written there by the int8
    GEMM itself on the native kernel or oneDNN (Int8Linear.onto)."""
    return fc.onto(scratch(x.shape[0] * fc.out_features).view(x.shape[0], -1), x)


def norm_and_seed(x: torch.Tensor, norm: nn.LayerNorm, fc: nn.Module | None, seed: torch.Tensor) -> torch.Tensor:
    """norm(x) for 2-D contiguous x, into the NORMED buffer (so the caller must be done with the last one),
    and, in the same pass, seed = x + fc's bias: the start accumulate() adds fc's GEMM onto. `seed` may be
    x itself (in place) or a tensor of its shape. With no fc, or one that is not a float GEMM (`dense`),
    seed = x."""
    normed = scratch(x.numel(), NORMED).view_as(x)
    wb = dense(fc)
    native.extension().layer_norm_seed(x, norm.weight, norm.bias, norm.eps, None if wb is None else wb[1], normed, seed)
    return normed


def accumulate(seed: torch.Tensor, x: torch.Tensor, fc: nn.Module | None) -> torch.Tensor:
    """seed + fc(x) without fc's bias for a float GEMM (norm_and_seed put the bias into seed): the GEMM
    adds seed in its epilogue (oneDNN, into a fresh tensor) or accumulates onto it (MKL, in place), no pass
    of its own. An int8 GEMM adds onto seed as well (Int8Linear.onto), its bias inside; other modules are
    called as they are and added in place; no fc adds x. Use the returned tensor."""
    wb = dense(fc)
    if wb is not None:
        if _fresh(x, wb[0]):
            return torch.ops.mkldnn._linear_pointwise(x, seed, packed(wb[0]), None, "add")
        return mm_onto(seed, x, wb[0], add=True)
    if isinstance(fc, Int8Linear):
        return fc.onto(seed, x, add=True)
    return seed.add_(x if fc is None else fc(x))


def linear_gelu(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """gelu(fc(x)) for 2-D x: on oneDNN in the GEMM's epilogue, into a fresh tensor; otherwise written into
    the WIDE buffer (so the caller must be done with it before the next call that uses the buffer), bias
    and GELU in one pass of the native extension, so callers are on the native path
    (Block.forward_inference). An int8 GEMM writes into the WIDE buffer too (project_int8); another module
    is called as it is. Then GELU in place (the native pass where the output is a contiguous 2-D float32
    tensor)."""
    wb = dense(fc)
    if wb is None:  # an int8 GEMM, its bias added inside, or another module
        hidden = project_int8(x, fc) if isinstance(fc, Int8Linear) else fc(x)
        if hidden.dim() == 2 and hidden.is_contiguous() and hidden.dtype == torch.float32:
            native.extension().bias_gelu(hidden, None, hidden)
            return hidden
        return torch.ops.aten.gelu_(hidden)
    weight, bias = wb
    if _fresh(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "gelu", [], "none")
    hidden = project(x, weight)  # not _fresh: into the WIDE buffer
    native.extension().bias_gelu(hidden, bias, hidden)  # bias may be None: GELU alone
    return hidden


def mlp_onto(seed: torch.Tensor, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """seed + mlp(x) for 2-D x, fc2's bias left out as accumulate() leaves it (mlp: seqvision.layers.Mlp
    in eval mode). On oneDNN the rows go in chunks whose hidden layer fits FRESH_OUTPUT_BYTES, each chunk's
    sum copied into seed; otherwise in one piece, onto seed in place. Use the returned tensor."""
    def hidden(rows: torch.Tensor) -> torch.Tensor:
        return linear_gelu(rows, mlp.fc1) if mlp.exact_gelu else mlp.act(mlp.fc1(rows))

    wb = dense(mlp.fc1)
    step = equal_chunks(x.shape[0], FRESH_OUTPUT_BYTES // (4 * mlp.fc1.out_features))
    if wb is None or not _onednn(wb[0]) or step == x.shape[0]:
        return accumulate(seed, hidden(x), mlp.fc2)
    for r in range(0, x.shape[0], step):
        part = seed[r: r + step]
        part.copy_(accumulate(part, hidden(x[r: r + step]), mlp.fc2))  # no copy where it ran in place
    return seed
