"""Stacked recurrences in plain PyTorch (the "fused" backend): every direction of a BiLSTM2D steps in one
batched matmul per timestep. It runs on any device and any cell (LSTM, GRU, tanh-RNN), differentiated by
autograd; on CPUs the native kernel (seqvision.ops.native) is faster for LSTM cells.
"""
from __future__ import annotations

import torch


def groups(dirs: list, H: int, W: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(slots, axes, reverses) of the directions that step together: all of them when H == W (equal
    lengths), else one group per axis. `dirs` lists (axis name "v"/"h", reverse 0/1, ...) ordered by axis,
    so the slots of a group are consecutive."""
    names = list(dict.fromkeys(d[0] for d in dirs))
    ks = [list(range(len(dirs)))] if H == W else [[k for k, d in enumerate(dirs) if d[0] == a] for a in names]
    return [(g, [0 if dirs[k][0] == "v" else 1 for k in g], [dirs[k][1] for k in g]) for g in ks]


def cell(kind: str, xg: torch.Tensor, hg: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One step for every stacked direction: xg = input gates (bias_ih folded), hg = h @ W_hh^T + b_hh."""
    if kind == "lstm":
        i, f, g, o = (xg + hg).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":
        xr, xz, xn = xg.chunk(3, dim=-1)
        hr, hz, hn = hg.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n + z * (h - n), None
    return torch.tanh(xg + hg), None


def run(kind: str, xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """Stacked recurrences. xg: (K, T, N, G) input gates per direction, already in step order;
    w_hh: (K, G, D); b_hh: (K, 1, G) (zeros where b_hh is folded into xg). -> (K, T, N, D)."""
    K, T, N, _ = xg.shape
    D = w_hh.shape[-1]
    h = xg.new_zeros(K, N, D)
    c = xg.new_zeros(K, N, D) if kind == "lstm" else None
    w_t = w_hh.transpose(1, 2)  # (K, G, D) -> (K, D, G)
    outs = []
    for t in range(T):
        hg = torch.baddbmm(b_hh, h, w_t)  # (K, N, D) @ (K, D, G) -> (K, N, G)
        h, c = cell(kind, xg[:, t], hg, h, c)
        outs.append(h)
    return torch.stack(outs, dim=1)
