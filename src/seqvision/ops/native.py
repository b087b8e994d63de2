"""The compiled LSTM recurrence (csrc/lstm_recurrence.cpp) and its autograd Function; the same binary holds
the MLP's bias + GELU (LinearGELU here in training, seqvision.ops.inference at inference) and the inference
block's LayerNorm pass.

The extension is compiled on first use for one instruction set, and its build folder is named after that
instruction set and a hash of everything the binary depends on (source, flags, torch install), so:
- a machine never loads a binary built for a wider ISA than its own (a home folder shared by an AVX-512
  node and an AVX2 node holds two builds side by side, not one that SIGILLs on the smaller node);
- two virtual environments, or two torch versions, never take turns rebuilding one cache entry.

`SEQVISION_ISA=avx2|avx512|baseline` chooses a narrower build than the CPU's (tests use it to run the
AVX2 kernel on an AVX-512 machine); a wider one than the CPU supports is refused with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gemm
from .cpu import build_isa

# torch's extension builder warns "no CUDA runtime" on import on CPU-only hosts; the kernel is CPU code.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
SOURCE = Path(__file__).parent / "csrc" / "lstm_recurrence.cpp"
# ISA -> compiler flags. Named x86-64 levels rather than -march=native, so that a build is defined by its
# ISA alone; -mtune only schedules, it never adds instructions.
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    "avx2": ["-march=x86-64-v3"],
    "baseline": [],
}
# No -ffast-math: it lets the compiler assume no NaN, and a NaN input must give NaN logits.
# -fno-trapping-math only drops the promise that FP exceptions trap where the source says: without it GCC
# will not turn the clamps of tanh/sigmoid into selects except with AVX-512 masks, so the AVX2 and SSE
# builds ran the cell loops one float at a time (measured 3x slower than the AVX-512 build, not 2x).
# -fopenmp is needed for at::parallel_for (an inline OpenMP region in torch's headers); the binary is
# linked to the OpenMP runtime torch itself loads, so it runs on torch's thread pool (see _omp_ldflags).
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def _omp_ldflags() -> list[str]:
    """Link against the OpenMP runtime inside torch's lib folder where there is one, so that
    torch.set_num_threads governs the extension's parallel regions too."""
    lib = Path(torch.__file__).parent / "lib"
    gomp = sorted(lib.glob("libgomp*.so*"))
    if gomp:
        return [str(gomp[0]), f"-Wl,-rpath,{lib}"]
    return ["-fopenmp"]


@dataclass(frozen=True)
class BuildSpec:
    isa: str
    name: str  # the Python module name, unique per ISA so two builds can be imported side by side
    directory: Path
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]


def build_spec(isa: str | None = None) -> BuildSpec:
    """Where and how the extension for `isa` (default: build_isa()) is built."""
    isa = isa or build_isa()
    cflags = tuple(COMMON_FLAGS + ISA_FLAGS[isa])
    ldflags = tuple(_omp_ldflags())
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(cflags).encode(), repr(ldflags).encode(), torch.__version__.encode(),
                 str(Path(torch.__file__).parent.resolve()).encode(), sys.version.encode()):
        key.update(part)
    from torch.utils.cpp_extension import get_default_build_root

    name = f"seqvision_lstm_{isa}"
    return BuildSpec(isa, name, Path(get_default_build_root()) / f"{name}-{key.hexdigest()[:12]}", cflags, ldflags)


_EXT: dict[str, object] = {}  # ISA -> loaded module, or None where the build failed


def extension(isa: str | None = None):
    """The compiled recurrence for `isa` (default: build_isa()), built on first use; None without a compiler."""
    isa = isa or build_isa()
    if isa in _EXT:  # every kernel call comes here: no hashing of the source once it is loaded
        return _EXT[isa]
    spec = build_spec(isa)
    try:
        from torch.utils.cpp_extension import load

        # torch looks for ninja on PATH; a venv's own ninja sits beside its python.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        spec.directory.mkdir(parents=True, exist_ok=True)
        if not (spec.directory / f"{spec.name}.so").exists():
            print(f"seqvision: compiling the native BiLSTM2D kernel for {spec.isa} into {spec.directory} "
                  f"(once per machine kind and torch install, about a minute)", file=sys.stderr, flush=True)
        _EXT[spec.isa] = load(spec.name, [str(SOURCE)], extra_cflags=list(spec.cflags),
                              extra_ldflags=list(spec.ldflags), build_directory=str(spec.directory), verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja: run the Python paths instead
        warnings.warn(f"seqvision: native BiLSTM2D unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      f"using the reference path")
        _EXT[spec.isa] = None
    return _EXT[spec.isa]


def available() -> bool:
    return extension() is not None


class LSTMRecurrence(torch.autograd.Function):
    """All LSTM directions of a BiLSTM2D in C++: xg (B, H, W, K, 4D) input projections, bias (K, 4D)
    (b_ih + b_hh, added in the cell), w_hh (K, 4D, D) -> (B, H, W, K*D), direction k's hidden states at
    channels [k*D, (k+1)*D).

    `groups` lists (slots, axes, reverses) of directions that step together; a group's slots are
    consecutive, so its W_hh is a contiguous slice.
    """

    @staticmethod
    def forward(ctx, xg, bias, w_hh, groups):
        ext = extension()
        B, H, W, K, _ = xg.shape
        out = xg.new_empty(B, H, W, K * w_hh.shape[-1])
        save = any(ctx.needs_input_grad)
        w_t = ext.pack_recurrent(w_hh)
        saved = []
        for slots, axes, reverses in groups:
            saved += ext.lstm_forward(xg, bias, w_t[slots[0]: slots[-1] + 1], out, slots, axes, reverses, save)
        ctx.groups = groups
        ctx.save_for_backward(w_hh, out, *saved)  # backward reads the hidden states from out
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ext = extension()
        w_hh, out, *saved = ctx.saved_tensors
        B, H, W, _ = grad_out.shape
        grad_xg = grad_out.new_empty(B, H, W, w_hh.shape[0], w_hh.shape[1])  # every slot is in one group
        grad_w, grad_b = torch.empty_like(w_hh), grad_out.new_empty(w_hh.shape[:2])
        for i, (slots, axes, reverses) in enumerate(ctx.groups):
            cs, acts = saved[2 * i: 2 * i + 2]
            ks = slice(slots[0], slots[-1] + 1)
            grad_w[ks], grad_b[ks] = ext.lstm_backward(grad_out, grad_xg, out, cs, acts, w_hh[ks], slots, axes,
                                                       reverses)
        return grad_xg, grad_b, grad_w, None


class LinearGELU(torch.autograd.Function):
    """gelu(x @ weight^T + bias) (exact GELU) for float32 CPU tensors, x (..., K): the MLP's first layer in
    training. The bias and GELU take one pass after the GEMM, which keeps the pre-activation for the backward;
    the backward's GELU derivative also sums the bias gradient. Against F.linear + F.gelu on the 300k model's
    shapes (6272 x 192 and x 288), forward and backward: 13-15% faster (AMD EPYC Zen 3, 2 threads)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ext = extension()
        x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)
        pre = gemm.mm_t(x2, weight)  # (M, N), + bias in the pass below
        y = torch.empty_like(pre)
        ext.bias_gelu(pre, bias, y)
        ctx.save_for_backward(x2, weight, pre)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, pre = ctx.saved_tensors
        grad_pre = torch.empty_like(pre)
        grad_b = extension().gelu_backward_bias(grad_y.reshape(pre.shape).contiguous(), pre, grad_pre)
        grad_x = gemm.mm(grad_pre, weight).view(*grad_y.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad_pre.t(), x2) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b


def pack_recurrent(w_hh: torch.Tensor) -> torch.Tensor:
    """W_hh (K, 4D, D) in the layout the kernel reads, (K, D, 4D padded); lstm2d's `w_t`."""
    return extension().pack_recurrent(w_hh)


def lstm2d(xg: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor, groups: list, w_t: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """All directions of a BiLSTM2D through LSTMRecurrence, with autograd where it is needed. Outside
    autograd no states are kept, `w_t` may bring pack_recurrent(w_hh) made once for many calls, and `out`
    (B, H, W, K*D), contiguous, may be given to write into."""
    if torch.is_grad_enabled() and (xg.requires_grad or w_hh.requires_grad or bias.requires_grad):
        return LSTMRecurrence.apply(xg, bias, w_hh, groups)
    B, H, W, K, _ = xg.shape
    out = xg.new_empty(B, H, W, K * w_hh.shape[-1]) if out is None else out
    ext = extension()
    w_t = ext.pack_recurrent(w_hh) if w_t is None else w_t
    for slots, axes, reverses in groups:
        ext.lstm_forward(xg, bias, w_t[slots[0]: slots[-1] + 1], out, slots, axes, reverses, False)
    return out
