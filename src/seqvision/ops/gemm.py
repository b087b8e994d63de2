"""The library that runs the float GEMMs of the native paths on this CPU: MKL (torch.mm, what nn.Linear and
timm run) or oneDNN (torch.ops.mkldnn._linear_pointwise), the weights oneDNN reads packed once, and a
Linear on that library for training."""
from __future__ import annotations

import functools
import os
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

GEMM_ENGINES = ("mkl", "onednn")


@functools.cache
def gemm_engine(plain: bool = False) -> str:
    """The library that runs the float GEMMs of the native paths here: 'mkl' (torch.mm, what timm and
    nn.Linear run) or 'onednn' (torch.ops.mkldnn._linear_pointwise; at inference with the bias and GELU or
    the residual add in the GEMM's epilogue). SEQVISION_GEMM_ENGINE names one for every GEMM; otherwise
    oneDNN on a CPU that is not Intel's and has AVX-512 for it, MKL elsewhere, except that a plain GEMM takes
    oneDNN on any CPU not Intel's. A rule rather than a timing, so that a model gives the same floats in
    every process on one machine.

    Args:
        plain: the GEMM writes its product and nothing else (BiLSTM2D's input projection at inference).

    MKL picks its code by CPU vendor (on AMD's Zen 4 MKL_VERBOSE names no vector-extension path, and its rates
    were in the range they had under MKL_ENABLE_INSTRUCTIONS=AVX2). On an AMD EPYC (Zen 4, AVX-512), 2 threads,
    oneDNN ran Sequencer2D-S's GEMM shapes at 195-220 GFLOP/s against MKL's 146-197, whole-model inference 4-8%
    faster at batch 16 and 15% at batch 1, and the main job's model's training step 9% faster (forward and input
    gradients on oneDNN); capped at AVX2 there, oneDNN was level with MKL and slower with GELU in its epilogue
    (125-155 against 141-177), but it ran the plain GEMM of the input projection 1.00-1.37x as fast (the
    widest gain at batch 1: 256 x 384 -> 1536, 1.57 against 2.17 ms), whole-model inference at batch 1 3-5%
    faster. On Intel Xeons MKL's GEMMs ran at the machine's rate."""
    name = os.environ.get("SEQVISION_GEMM_ENGINE", "auto").strip().lower()
    if name not in GEMM_ENGINES + ("auto",):
        raise ValueError(f"SEQVISION_GEMM_ENGINE must be one of {GEMM_ENGINES + ('auto',)}, got {name!r}")
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if name == "onednn" and not onednn:
        raise RuntimeError("SEQVISION_GEMM_ENGINE=onednn, but this torch build has no oneDNN linear")
    if name != "auto":
        return name
    return "onednn" if onednn and cpu_vendor() not in ("GenuineIntel", "") and (plain or onednn_avx512()) else "mkl"


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The x86 vendor string of CPU 0 ('GenuineIntel', 'AuthenticAMD'); '' where Linux does not list one."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_avx512() -> bool:
    """Whether oneDNN may run AVX-512 code here: the CPU (as ATen sees it, ATEN_CPU_CAPABILITY included)
    has it, and ONEDNN_MAX_CPU_ISA, if set, does not cap oneDNN below it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).strip().upper()
    return torch.backends.cpu.get_cpu_capability().lower() == "avx512" and cap.startswith(("ALL", "AVX512", "AVX10"))


# id(weight) -> (a weak reference to it, its _version, the generation, the weight in oneDNN's layout); a
# weight's entry goes when the weight does. Keyed by id because tensors compare by value.
_PACKED: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}
_PACKED_LOCK = threading.Lock()
_GENERATION = [0]


def repack() -> None:
    """Make packed() pack every weight afresh at its next call. torch's fused optimizers write the weights
    in place without bumping their _version, so Block.train() (each switch between training and
    evaluation) calls this."""
    _GENERATION[0] += 1


def packed(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout, made once and kept while the weight lives, is not
    written to (a new _version) and repack() is not called. Saves oneDNN a reorder of the weights in every
    call: 2-5% of a GEMM's time on Sequencer2D-S's shapes (AMD EPYC, Zen 4), for a second copy of them."""
    # inference tensors (a stacked weight made under torch.inference_mode) keep no version
    key, now = id(weight), (-1 if weight.is_inference() else weight._version, _GENERATION[0])
    with _PACKED_LOCK:
        hit = _PACKED.get(key)
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, key, None)
        elif hit[1:3] == now:
            return hit[3]
        _PACKED[key] = (weakref.ref(weight), *now, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        return _PACKED[key][3]


def mm_t(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, plain: bool = False) -> torch.Tensor:
    """a (M, K) @ w (N, K)^T + bias into a fresh tensor, on gemm_engine(plain)'s library; float32 CPU
    tensors."""
    if gemm_engine(plain) == "onednn":
        return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")
    return torch.mm(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, N) @ b (N, K) into a fresh tensor, on gemm_engine()'s library; float32 CPU tensors."""
    return mm_t(a, b.t())  # oneDNN reads the transposed view in place, no copy


class Linear(torch.autograd.Function):
    """F.linear with its forward and input gradient on gemm_engine()'s library (mm_t, mm); the weight
    gradient, (M, N)^T @ (M, K), stays torch.mm, which reads both operands transposed without a copy
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
    """F.linear(x, weight, bias), through Linear where gemm_engine() is oneDNN and the tensors are float32
    on the CPU outside autocast; F.linear itself elsewhere."""
    if (gemm_engine() == "onednn" and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")):
        return Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
