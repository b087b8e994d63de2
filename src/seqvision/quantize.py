"""int8 inference on CPUs: every Linear, and BiLSTM2D's stacked input projection, as an int8 GEMM.

The LSTM recurrence (about a tenth of the MACs) and the convs stay float32. The engine and activation
range are chosen per CPU (seqvision.ops.int8.pick_engine): 8-bit activations where the CPU has VNNI/AMX,
7-bit where its int8 multiply-add would saturate. Small layers (in and out features of harmonic mean under
128 there, under 80 with VNNI/AMX) multiply by their dequantised weights in float instead, which is faster
(seqvision.ops.int8.runs_int8).
On CPUs with AMX/VNNI, oneDNN runs these GEMMs 4-10x faster than fp32 (4096x384x1536: 3.3 ms vs 16.7 ms,
2 threads).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .ops.int8 import Int8Linear, pick_engine

__all__ = ["Int8Linear", "quantize_int8"]


def quantize_int8(model: nn.Module, engine: str | None = None) -> nn.Module:
    """An int8 copy of `model` for CPU inference (eval mode); the original is left as it is.

    Every nn.Linear becomes an Int8Linear; a module with a `quantize_int8_(engine)` method (BiLSTM2D)
    quantises what else it owns (its stacked input projection).

    Args:
        model: any seqvision model.
        engine: the quantised engine; None picks it for this CPU (`seqvision.ops.int8.pick_engine`).
    """
    engine = pick_engine(engine)[0]
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in list(model.modules()):
            if hasattr(m, "quantize_int8_"):
                m.quantize_int8_(engine)
            for name, child in list(m.named_children()):
                if type(child) is nn.Linear:
                    setattr(m, name, Int8Linear(child.weight, child.bias, engine))
    model.int8 = True
    return model
