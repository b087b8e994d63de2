"""Inference-only helpers (eval mode outside autograd on the CPU): a reused activation buffer and GEMMs
with their epilogue written into it."""
from __future__ import annotations

import threading

import torch
from torch import nn

from . import native


class _Scratch(threading.local):
    buf: torch.Tensor | None = None


_SCRATCH = _Scratch()


def scratch(n: int) -> torch.Tensor:
    """A float32 buffer of n elements reused across inference calls (one per thread, so concurrent callers
    never share one). A fresh tensor of tens of MB comes from mmap and page-faults on first touch every
    call, which halves the GEMM rate."""
    if _SCRATCH.buf is None or _SCRATCH.buf.numel() < n:
        _SCRATCH.buf = torch.empty(n)
    return _SCRATCH.buf[:n]


def cpu_float_eval(x: torch.Tensor) -> bool:
    """Whether x may take the CPU inference paths: float32 on the CPU with autograd off."""
    return not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"


def linear_gelu(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """gelu(fc(x)) for 2-D x, written into the reused buffer (so the caller must be done with it before
    the next call that uses the buffer); bias and GELU in one pass of the native extension, so callers are
    on the native path (Block.forward_inference). Any module other than a plain Linear (an int8 one) is
    called as it is."""
    if type(fc) is not nn.Linear:
        return torch.ops.aten.gelu_(fc(x))
    hidden = scratch(x.shape[0] * fc.out_features).view(x.shape[0], fc.out_features)
    torch.mm(x, fc.weight.t(), out=hidden)
    if fc.bias is None:
        return torch.ops.aten.gelu_(hidden)
    native.extension().bias_gelu_(hidden, fc.bias)
    return hidden


def linear_add(x: torch.Tensor, fc: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """fc(x) + residual. For a plain Linear the GEMM accumulates onto residual + bias: one elementwise pass
    instead of two (addmm's copy of the bias into its output, then the residual add)."""
    if type(fc) is not nn.Linear:
        return fc(x).add_(residual)
    start = torch.add(residual, fc.bias) if fc.bias is not None else residual.clone()
    return start.addmm_(x, fc.weight.t())
