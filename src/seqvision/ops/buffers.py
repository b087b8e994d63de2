"""Buffers reused across inference calls, one set per thread, so concurrent callers never share one. A
fresh tensor of megabytes comes from mmap (or from heap glibc has trimmed) and page-faults on first touch
every call, which halves a GEMM's rate."""
from __future__ import annotations

import threading

import torch

# WIDE holds the widest float activation (the input projection, then the MLP's hidden layer), NORMED a
# LayerNorm's output, MIXED the recurrences' output (Block.forward_inference cycles through them); CODES
# the uint8 activations of oneDNN's int8 GEMM.
WIDE, NORMED, MIXED, CODES = range(4)
_DTYPES = (torch.float32, torch.float32, torch.float32, torch.uint8)


class _Scratch(threading.local):
    def __init__(self):
        self.bufs: list[torch.Tensor | None] = [None] * len(_DTYPES)


_SCRATCH = _Scratch()


def scratch(n: int, slot: int = WIDE) -> torch.Tensor:
    """A buffer of n elements reused across inference calls: buffer `slot` (WIDE, NORMED, MIXED: float32;
    CODES: uint8) of this thread. The caller must be done with the last one it took from that slot."""
    buf = _SCRATCH.bufs[slot]
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.bufs[slot] = torch.empty(n, dtype=_DTYPES[slot])
    return buf[:n]
