"""The library that runs the float GEMMs of the native paths on this CPU: MKL (torch.mm, what nn.Linear and
timm run), oneDNN (torch.ops.mkldnn._linear_pointwise) or, at inference, the native extension's own GEMM;
the weights packed once for oneDNN or that GEMM, and a Linear on the chosen library for training."""
from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from .cpu import build_isa, cpu_vendor, onednn_avx512

GEMM_ENGINES = ("mkl", "onednn", "native")


@functools.cache
def gemm_engine(training: bool = False) -> str:
    """The library that runs the float GEMMs of the native paths here: 'mkl' (torch.mm, what timm and
    nn.Linear run), 'onednn' (torch.ops.mkldnn._linear_pointwise; at inference with the bias and GELU or the
    residual add in the GEMM's epilogue) or 'native' (the extension's gemm_nt; inference only, training
    runs MKL's instead). SEQVISION_GEMM_ENGINE names one; otherwise, on a CPU that is not Intel's, the native
    GEMM at inference where the extension is built for AVX2 or AVX-512, oneDNN in training where it may use
    AVX-512, and MKL elsewhere. A rule rather than a timing, so that a model gives the same floats in every
    process on one machine.

    Args:
        training: the library of the training GEMMs (gemm.Linear, LinearGELU) rather than of inference's.

    MKL picks its code by CPU vendor (on AMD's Zen 4 MKL_VERBOSE names no vector-extension path, and its rates
    were in the range they had under MKL_ENABLE_INSTRUCTIONS=AVX2). On an AMD EPYC (Zen 4), 2 threads: oneDNN
    ran Sequencer2D-S's GEMM shapes at 195-220 GFLOP/s against MKL's 146-197, and the main job's model's
    training step 9% faster (forward and input gradients on oneDNN); capped at AVX2, oneDNN was level with
    MKL. The native GEMM ran 11 shapes of the two models 1.11-1.51x as fast as MKL and 1.04-1.71x as fast as
    oneDNN in an AVX2 build, and level with oneDNN's AVX-512 code when built for AVX-512 (0.91-1.09x); whole
    models at inference, one process, alternating: Sequencer2D-S 1.11x (batch 16) and 1.15x (batch 1) MKL's
    speed in the AVX2 build, 1.04x and 1.09x oneDNN's in the AVX-512 one, the main job's model 1.16x and
    1.17x. On Intel Xeons MKL's GEMMs ran at the machine's rate; the native GEMM is not measured there."""
    name = os.environ.get("SEQVISION_GEMM_ENGINE", "auto").strip().lower()
    if name not in GEMM_ENGINES + ("auto",):
        raise ValueError(f"SEQVISION_GEMM_ENGINE must be one of {GEMM_ENGINES + ('auto',)}, got {name!r}")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if name == "onednn" and not onednn:
        raise RuntimeError("SEQVISION_GEMM_ENGINE=onednn, but this torch build has no oneDNN linear")
    if name != "auto":
        return "mkl" if training and name == "native" else name
    if cpu_vendor() in ("GenuineIntel", ""):
        return "mkl"
    if training:
        return "onednn" if onednn and onednn_avx512() else "mkl"
    return "native" if build_isa() in ("avx2", "avx512") else "mkl"


# (id(weight), pack) -> (a weak reference to the weight, its _version, the generation, pack(weight)); a
# weight's entries go when the weight does. Keyed by id because tensors compare by value.
_PACKED: dict[tuple[int, Callable], tuple[weakref.ref, int, int, torch.Tensor]] = {}
_PACKED_LOCK = threading.Lock()
_GENERATION = [0]


def onednn_layout(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout for its linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def repack() -> None:
    """Make packed() pack every weight afresh at its next call. torch's fused optimizers write the weights
    in place without bumping their _version, so Block.train() (each switch between training and
    evaluation) calls this."""
    _GENERATION[0] += 1


def packed(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor] = onednn_layout) -> torch.Tensor:
    """pack(weight), by default weight (out, in) in oneDNN's blocked layout, made once and kept while the
    weight lives, is not written to (a new _version) and repack() is not called. Saves oneDNN a reorder of the
    weights in every call: 2-5% of a GEMM's time on Sequencer2D-S's shapes (AMD EPYC, Zen 4), for a second
    copy of them; the native GEMM reads only its own layout."""
    # inference tensors (a stacked weight made under torch.inference_mode) keep no version
    key, now = (id(weight), pack), (-1 if weight.is_inference() else weight._version, _GENERATION[0])
    with _PACKED_LOCK:
        hit = _PACKED.get(key)
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, key, None)
        elif hit[1:3] == now:
            return hit[3]
        _PACKED[key] = (weakref.ref(weight), *now, pack(weight.detach()))
        return _PACKED[key][3]


def mm_t(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ w (N, K)^T + bias into a fresh tensor, on gemm_engine(training=True)'s library; float32 CPU
    tensors."""
    if gemm_engine(training=True) == "onednn":
        return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    return torch.mm(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, N) @ b (N, K) into a fresh tensor, on gemm_engine(training=True)'s library; float32 CPU tensors."""
    return mm_t(a, b.t())  # oneDNN reads the transposed view in place, no copy


class Linear(torch.autograd.Function):
    """F.linear with its forward and input gradient on gemm_engine(training=True)'s library (mm_t, mm); the
    weight gradient, (M, N)^T @ (M, K), stays torch.mm, which reads both operands transposed without a copy
    (oneDNN took 1.6x MKL's time over 8 such shapes of the two models, AMD EPYC, Zen 4)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return mm_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (..., N) -> (M, N)
        grad_x = mm(g, weight).view(*grad_y.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(g.t(), x2) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through Linear where gemm_engine(training=True) is oneDNN and the tensors
    are float32 on the CPU outside autocast; F.linear itself elsewhere."""
    if (gemm_engine(training=True) == "onednn" and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")):
        return Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
