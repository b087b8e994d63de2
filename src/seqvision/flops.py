"""Parameter and MAC counts that include the recurrent cells (common counters skip the LSTM op)."""
from __future__ import annotations

import torch
from torch import nn

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _rnn_macs(m: nn.RNNBase, inp: torch.Tensor) -> int:
    # Per token and direction: the input projection (G*D x C) and the recurrent one (G*D x D).
    n, t = (inp.shape[0], inp.shape[1]) if m.batch_first else (inp.shape[1], inp.shape[0])
    dirs = 2 if m.bidirectional else 1
    return n * t * dirs * GATES[type(m)] * m.hidden_size * (m.input_size + m.hidden_size)


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass of `batch` images of `input_size` (C, H, W).

    Convs, Linears and RNN cells are counted; a module may add its own functional work (attention's
    matrix products) through a `macs(inputs, output) -> int` method.
    """
    total = 0

    def hook(m, inputs, output):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += output.numel() * k
        elif isinstance(m, nn.Linear):
            total += output.numel() * m.in_features
        elif type(m) in GATES:
            total += _rnn_macs(m, inputs[0])
        if hasattr(m, "macs"):
            total += m.macs(inputs, output)

    # Count on the reference path, where each recurrence is an RNN module call; other backends do the
    # same arithmetic without those calls.
    backends = {m: m.backend for m in model.modules() if hasattr(m, "backend")}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        for m in backends:
            m.backend = "reference"
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *input_size))
    finally:
        for h in handles:
            h.remove()
        for m, b in backends.items():
            m.backend = b
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
