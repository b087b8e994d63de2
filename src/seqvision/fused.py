"""Fast BiLSTM2D backends, on the same weights as torch's RNN modules.

Two things make them faster than calling `nn.LSTM` twice per block:
- the input projections of all directions (vertical/horizontal x forward/backward) are one GEMM over the
  normed input, with both biases folded in; about 80% of the LSTM's MACs are in it;
- the recurrences of all directions run together: when H == W the four directions have the same length
  and batch; otherwise each axis is a group of its own.

Backends: "reference" (torch's modules), "fused" (the above in plain PyTorch, each timestep one batched
matmul and the cell as aten calls, differentiated by autograd: it runs anywhere, but on a 2-core CPU it
is slower than oneDNN's LSTM kernel, 0.74x inference at batch 128 on 28x28), and "native" (the recurrence,
forward and backward, in C++: csrc/lstm_recurrence.cpp, compiled on first use with the machine's
compiler). "auto" takes "native" for LSTM cells where it builds, else the reference; GRU and tanh-RNN
cells stay on the reference unless forced.

Outside autograd (eval, no_grad) a block with the native backend runs `block_inference`: cached stacked
weights, the widest activations in one reused buffer, GELU in place, nothing saved for backward.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "reference", "fused", "native")
_NATIVE = None  # the compiled extension once built; False when the build failed


def native_extension():
    """The compiled LSTM recurrence (built once per machine and cached by torch), or None without a compiler."""
    global _NATIVE
    if _NATIVE is None:
        try:
            import logging

            from torch.utils.cpp_extension import load

            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU hosts
            # torch looks for ninja on PATH; a venv's own ninja sits beside its python.
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            src = Path(__file__).parent / "csrc" / "lstm_recurrence.cpp"
            flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp"]
            _NATIVE = load("seqvision_lstm_recurrence", [str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           verbose=False)
        except Exception as e:  # no compiler, no headers, no ninja: run the Python paths instead
            warnings.warn(f"seqvision: native BiLSTM2D unavailable ({type(e).__name__}: {str(e)[:200]}); "
                          f"using the reference path")
            _NATIVE = False
    return _NATIVE or None


class _NativeBiLSTM2d(torch.autograd.Function):
    """All LSTM directions of a BiLSTM2D in C++: xg (B, H, W, K, 4D) input projections, bias (K, 4D)
    (b_ih + b_hh, added in the cell), w_hh (K, 4D, D) -> (B, H, W, K*D), direction k's hidden states at
    channels [k*D, (k+1)*D).

    `groups` lists (slots, axes, reverses) of directions that step together (see `_groups`); a group's
    slots are consecutive, so its W_hh is a contiguous slice.
    """

    @staticmethod
    def forward(ctx, xg, bias, w_hh, groups):
        ext = native_extension()
        B, H, W, K, _ = xg.shape
        out = xg.new_empty(B, H, W, K * w_hh.shape[-1])
        save = any(ctx.needs_input_grad)
        saved = []
        for slots, axes, reverses in groups:
            saved += ext.lstm_forward(xg, bias, w_hh[slots[0]: slots[-1] + 1], out, slots, axes, reverses, save)
        ctx.groups = groups
        ctx.save_for_backward(w_hh, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ext = native_extension()
        w_hh, *saved = ctx.saved_tensors
        B, H, W, _ = grad_out.shape
        grad_xg = grad_out.new_empty(B, H, W, w_hh.shape[0], w_hh.shape[1])  # every slot is in one group
        grad_w, grad_b = torch.empty_like(w_hh), grad_out.new_empty(w_hh.shape[:2])
        for i, (slots, axes, reverses) in enumerate(ctx.groups):
            hs, cs, acts = saved[3 * i: 3 * i + 3]
            ks = slice(slots[0], slots[-1] + 1)
            grad_w[ks], grad_b[ks] = ext.lstm_backward(grad_out, grad_xg, hs, cs, acts, w_hh[ks], slots, axes,
                                                       reverses)
        return grad_xg, grad_b, grad_w, None


def pick_backend(module, requested: str) -> str:
    """The backend a BiLSTM2D runs: "auto" is native for LSTM cells where the extension builds."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    rnns = [r for r in (module.rnn_v, module.rnn_h) if r is not None]
    fits = all(r.num_layers == 1 and r.bias for r in rnns)
    lstm = all(isinstance(r, nn.LSTM) for r in rnns)
    if requested == "auto":
        return "native" if fits and lstm and native_extension() is not None else "reference"
    if not fits:
        raise ValueError(f"the {requested} backend needs single-layer RNNs with biases")
    if requested == "native" and not (lstm and native_extension() is not None):
        raise ValueError("the native backend needs LSTM cells and a working C++ compiler")
    return requested


def _directions(rnn: nn.RNNBase) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W_ih, W_hh, b_ih, b_hh) per direction, forward first."""
    sfx = ["", "_reverse"] if rnn.bidirectional else [""]
    return [tuple(getattr(rnn, f"{n}_l0{s}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for s in sfx]


def _cell(kind: str, xg: torch.Tensor, hg: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
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


def _run(kind: str, xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """Stacked recurrences. xg: (K, T, N, G) input gates per direction, already in step order;
    w_hh: (K, G, D); b_hh: (K, 1, G) (zeros for the LSTM, whose b_hh is folded into xg). -> (K, T, N, D)."""
    K, T, N, _ = xg.shape
    D = w_hh.shape[-1]
    h = xg.new_zeros(K, N, D)
    c = xg.new_zeros(K, N, D) if kind == "lstm" else None
    w_t = w_hh.transpose(1, 2)  # (K, G, D) -> (K, D, G)
    outs = []
    for t in range(T):
        hg = torch.baddbmm(b_hh, h, w_t)  # (K, N, D) @ (K, D, G) -> (K, N, G)
        h, c = _cell(kind, xg[:, t], hg, h, c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def _groups(dirs: list, H: int, W: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(slots, axes, reverses) of the directions that step together: all of them when H == W (equal
    lengths), else one group per axis. Slots of a group are consecutive, directions being ordered by axis."""
    names = list(dict.fromkeys(name for name, _, _ in dirs))
    groups = [list(range(len(dirs)))] if H == W else [[k for k, d in enumerate(dirs) if d[0] == a] for a in names]
    return [(ks, [0 if dirs[k][0] == "v" else 1 for k in ks], [dirs[k][1] for k in ks]) for ks in groups]


def _stacked(m, fold: bool):
    """Every direction's weights stacked as one: (dirs, W_ih (K*G, C), bias (K*G,), W_hh (K, G, D)).

    Outside autograd the result is cached on the module until a parameter changes (its version counter or
    storage moves), so inference does not concatenate weights on every call.
    """
    rnns = [(name, r) for name, r in (("v", m.rnn_v), ("h", m.rnn_h)) if r is not None]
    dirs = [(name, d, w) for name, r in rnns for d, w in enumerate(_directions(r))]
    grad = torch.is_grad_enabled()
    key = None if grad else (fold, tuple((p.data_ptr(), p._version) for _, _, w in dirs for p in w))
    cached = m.__dict__.get("_stacked_cache")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    w_ih = torch.cat([w[0] for _, _, w in dirs])
    b_ih = torch.cat([w[2] + w[3] if fold else w[2] for _, _, w in dirs])
    w_hh = torch.stack([w[1] for _, _, w in dirs])
    value = (dirs, w_ih, b_ih, w_hh)
    if key is not None:
        m.__dict__["_stacked_cache"] = (key, value)  # not a buffer: never saved, moved or counted
    return value


class _Scratch(threading.local):
    buf: torch.Tensor | None = None


_SCRATCH = _Scratch()


def _scratch(n: int) -> torch.Tensor:
    """A float32 buffer of n elements reused across inference calls (one per thread). A fresh tensor of
    tens of MB comes from mmap and page-faults on first touch every call, which halves the GEMM rate."""
    if _SCRATCH.buf is None or _SCRATCH.buf.numel() < n:
        _SCRATCH.buf = torch.empty(n)
    return _SCRATCH.buf[:n]


def native_mix(m, x: torch.Tensor) -> torch.Tensor:
    """The native recurrence outside autograd (inference): (B, H, W, C) float32 -> (B, H, W, K*D)."""
    B, H, W, C = x.shape
    dirs, w_ih, bias, w_hh = _stacked(m, fold=True)
    K, G, D = w_hh.shape
    proj = getattr(m, "proj_int8", None)  # set by seqvision.quantize.quantize_int8
    if proj is not None:
        xg = proj(x.reshape(B * H * W, C))
    else:
        xg = _scratch(B * H * W * K * G).view(B * H * W, K * G)
        torch.mm(x.reshape(B * H * W, C), w_ih.t(), out=xg)  # (B*H*W, C) @ (C, K*G): all directions, one GEMM
    xg = xg.view(B, H, W, K, G)  # (B*H*W, K*G) -> (B, H, W, K, G)
    out = x.new_empty(B, H, W, K * D)
    ext = native_extension()
    for slots, axes, reverses in _groups(dirs, H, W):
        ext.lstm_forward(xg, bias.view(K, G), w_hh[slots[0]: slots[-1] + 1], out, slots, axes, reverses, False)
    return out


def _union(m, out: torch.Tensor) -> torch.Tensor:
    """The "add" union of (B, H, W, K*D) outputs: vertical half + horizontal half."""
    if m.union == "add" and m.rnn_v is not None and m.rnn_h is not None:
        half = out.shape[-1] // 2
        return out[..., :half] + out[..., half:]
    return out


def _native_eval(x: torch.Tensor) -> bool:
    """Whether the native recurrence may run outside autograd on x (CPU float32, grad disabled)."""
    return not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"


def fast_inference(m, x: torch.Tensor) -> bool:
    """Whether a block with token mixer `m` may take `block_inference` for input x."""
    return getattr(m, "backend", None) == "native" and _native_eval(x)


def _linear_gelu(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """gelu(fc(x)) for 2-D x, written into the reused buffer (so the caller must be done with it
    before the next call that uses the buffer); GELU in place."""
    if type(fc) is not nn.Linear:  # seqvision.quantize.Int8Linear
        return torch.ops.aten.gelu_(fc(x))
    hidden = _scratch(x.shape[0] * fc.out_features).view(x.shape[0], fc.out_features)
    return torch.ops.aten.gelu_(torch.addmm(fc.bias, x, fc.weight.t(), out=hidden))


def _linear_add(x: torch.Tensor, fc: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    y = fc(x) if type(fc) is not nn.Linear else torch.addmm(fc.bias, x, fc.weight.t())
    return y.add_(residual)


def block_inference(blk, x: torch.Tensor) -> torch.Tensor:
    """A Sequencer block (seqvision.models.sequencer.Block) in eval mode outside autograd, on CPU float32,
    with the native BiLSTM2D: the same math as Block.forward, with stacked weights cached and the two
    widest activations (the input projection, the MLP's hidden layer) written into one reused buffer."""
    B, H, W, C = x.shape
    rnn, mlp = blk.rnn_tokens, blk.mlp_channels
    x = x.reshape(B * H * W, C)  # (B, H, W, C) -> (B*H*W, C); the residual stream stays contiguous
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps).view(B, H, W, C)
    mixed = _union(rnn, native_mix(rnn, y))
    mixed = mixed.reshape(B * H * W, -1)  # (B, H, W, M) -> (B*H*W, M)
    x = _linear_add(mixed, rnn.fc, x) if rnn.fc is not None else x + mixed
    y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    if isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none":
        hidden = _linear_gelu(y, mlp.fc1)
    else:
        hidden = mlp.act(mlp.fc1(y))
    return _linear_add(hidden, mlp.fc2, x).view(B, H, W, C)  # (B*H*W, C) -> (B, H, W, C)


def rnn2d_fused(m, x: torch.Tensor, native: bool = False) -> torch.Tensor:
    """BiLSTM2D's token mixing (before its fc) for module `m` (seqvision.models.sequencer.RNN2d).

    The directions are ordered [vertical fwd, vertical bwd, horizontal fwd, horizontal bwd] (those the
    module has), which is also the channel order of the reference's cat([v, h]).
    """
    B, H, W, C = x.shape
    kind = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}[type(m.rnn_v or m.rnn_h)]
    axes = [(name, r) for name, r in (("v", m.rnn_v), ("h", m.rnn_h)) if r is not None]
    if native and _native_eval(x):
        return _union(m, native_mix(m, x))
    # Fold b_hh into the input projection where the cell adds it unchanged (LSTM, tanh-RNN); GRU keeps
    # b_hn inside r * (h W_hn + b_hn), so its b_hh stays on the recurrent side.
    fold = kind != "gru"
    dirs, w_ih, b_ih, w_hh = _stacked(m, fold)
    G = dirs[0][2][0].shape[0]
    if native and x.device.type == "cpu":  # elsewhere (a GPU) the same math in PyTorch below
        xg = F.linear(x, w_ih).view(B, H, W, len(dirs), G)  # (B, H, W, C) -> (B, H, W, K, G): one GEMM
        bias = b_ih.view(len(dirs), G).float()
        out = _NativeBiLSTM2d.apply(xg.float().contiguous(), bias, w_hh.float(), _groups(dirs, H, W)).to(x.dtype)
        return _union(m, out)  # (B, H, W, K*D)
    xg = F.linear(x, w_ih, b_ih).view(B, H, W, len(dirs), G)  # (B, H, W, C) -> (B, H, W, K, G): one GEMM

    def seqs(name: str, d: int, k: int) -> torch.Tensor:
        g = xg[:, :, :, k]
        # vertical: (B, H, W, G) -> (H, B*W, G), step along rows; horizontal: -> (W, B*H, G), along columns
        g = g.permute(1, 0, 2, 3).reshape(H, B * W, G) if name == "v" else g.permute(2, 0, 1, 3).reshape(W, B * H, G)
        return g.flip(0) if d == 1 else g

    def unseq(name: str, d: int, y: torch.Tensor) -> torch.Tensor:
        y = y.flip(0) if d == 1 else y
        # (H, B*W, D) -> (B, H, W, D) for vertical; (W, B*H, D) -> (B, H, W, D) for horizontal
        if name == "v":
            return y.reshape(H, B, W, -1).permute(1, 0, 2, 3)
        return y.reshape(W, B, H, -1).permute(1, 2, 0, 3)

    inputs = [seqs(name, d, k) for k, (name, d, _) in enumerate(dirs)]
    outs: list[torch.Tensor | None] = [None] * len(dirs)
    for ks, _, _ in _groups(dirs, H, W):
        b_hh = torch.stack([torch.zeros_like(dirs[k][2][3]) if fold else dirs[k][2][3] for k in ks]).unsqueeze(1)
        ys = _run(kind, torch.stack([inputs[k] for k in ks]), w_hh[ks[0]: ks[-1] + 1], b_hh)
        for j, k in enumerate(ks):
            outs[k] = unseq(dirs[k][0], dirs[k][1], ys[j])
    per_axis = [torch.cat([o for o, dd in zip(outs, dirs) if dd[0] == a], dim=-1) for a, _ in axes]
    if len(per_axis) == 1:
        return per_axis[0]
    return torch.cat(per_axis, dim=-1) if m.union == "cat" else per_axis[0] + per_axis[1]
