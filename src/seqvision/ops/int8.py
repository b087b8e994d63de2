"""int8 GEMMs for CPU inference: Int8Linear and the choice of quantised engine and activation range.

Weights are int8 per output channel (symmetric); activations are quantised per call from their own range
(dynamic quantisation) inside the GEMM, which needs no calibration data and, measured here, beats a static
scale (a static scale still costs a separate quantising pass over the activation).

Without VNNI or AMX, x86 int8 GEMMs multiply u8 activations by s8 weights with `vpmaddubsw`, which sums
each pair of products into int16 with saturation: 255 * 127 * 2 = 64770 does not fit, so full-range
activations overflow silently. Whether an engine does that on this CPU (and under ONEDNN_MAX_CPU_ISA) is
probed once per process with a GEMM built to overflow; where it does, activations are quantised to 7 bits
(`reduce_range`), whose pair sums (127 * 127 * 2 = 32258) fit.

Where the engine saturates and the native extension is built, the int8 GEMMs with fewer than
NATIVE_BELOW_IN input features run the extension's own (qgemm_nt) instead: the same 7-bit codes widened to
int16, multiplied by `vpmaddwd`, which sums each pair into int32 and cannot overflow, so its sums are the
engine's own; it quantises each block of rows just before its GEMM. Small layers run a float GEMM on their
dequantised weights instead, smaller ones still where the int8 GEMM does not saturate (FLOAT_BELOW,
FLOAT_BELOW_VNNI).

The native inference block calls Int8Linear.onto, not the module. The native kernel writes into the
block's buffer or adds onto its output like oneDNN's call: on oneDNN the activations are quantised
by the native extension into a reused uint8 buffer (the range and parameters torch's dynamic quantisation
picks) and oneDNN's int8 GEMM writes into the block's own buffer, the residual add in its epilogue. The
module's forward (torch's dynamic linear) hands back a fresh output, which glibc page-faults in again
whenever it has handed that memory back to the OS.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from . import native
from .buffers import CODES, scratch

ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")  # preference order; oneDNN uses AMX/VNNI where present

# Where the engine saturates (no VNNI/AMX), a layer whose in and out features have a harmonic mean under this
# runs a float GEMM on its dequantised weights. A dynamic int8 GEMM of M rows pays passes over its input and
# output, M * (in + out), for a saving in the multiply-adds, M * in * out, that without VNNI is small: it wins
# where in * out / (in + out) is large. `seqvision benchmark --int8-layers` measures it per layer. On an Intel
# Xeon with oneDNN capped at AVX2, 2 threads, 6272 rows (the main job's model at batch 128), two runs, int8
# against the fp32 GEMM: 0.64-0.72x at 64 -> 64 (harmonic mean 64), 0.85-0.87x at 192 -> 64 (96), 0.94-0.95x
# at 96 -> 96 (96), 0.97-1.01x at 64 -> 192 (96), 1.04-1.07x at 64 -> 256 (102); 1.06-1.13x at 288 -> 96
# (144), 1.15x at 96 -> 288 (144) and 1.24x at 96 -> 384 (154). Sequencer2D-S's block layers (harmonic means
# 192 to 614) ran 1.25-1.57x.
FLOAT_BELOW = 128
# The same where the int8 GEMM does not saturate (VNNI or AMX, or the native int16 kernel), which saves more.
# The native kernel in an AVX2 build on an AMD EPYC (Zen 4), 2 threads, the main job's model at batch 128
# against its fp32, one process, alternating, three runs: 1.10-1.15x at this limit, 1.06-1.08x at 128 and
# 1.08-1.18x at 60 (where 64 -> 64 turns int8 too; that layer alone is level with its fp32 GEMM). oneDNN on
# the Xeon above with AMX and VNNI, same shapes, 40 rounds: 0.62x at 64 -> 64 (64) and 0.12x for the head
# (96 -> 10, 128 rows: 18); 0.89x, 0.92x and 1.16x at 192 -> 64, 96 -> 96 and 64 -> 192 (all 96); 1.20-2.00x above.
# The main job's model with this limit against int8 everywhere, in one process, alternating, three runs of
# 80 rounds: 1.11-1.13x fp32's speed against 1.10-1.12x. A run before them gave 0.81x against 1.09x (the
# model with the limit 5 ms slower throughout), which the three did not reproduce.
FLOAT_BELOW_VNNI = 80


def _qlinear_sum() -> bool:
    """Whether this torch has oneDNN's int8 linear with a sum post-op in the form Int8Linear.onto calls it."""
    try:
        schema = torch.ops.onednn.qlinear_pointwise.binary._schema
        torch.ops.onednn.qlinear_prepack.default
    except (AttributeError, RuntimeError):
        return False
    return [a.name for a in schema.arguments] == [
        "qx", "x_scale", "x_zero_point", "qw", "w_scale", "w_zero_point", "other", "bias", "output_scale",
        "output_zero_point", "output_dtype", "other_scale", "other_zp", "binary_post_op", "binary_alpha",
        "unary_post_op", "unary_post_op_args", "unary_post_op_algorithm"]


_QLINEAR = _qlinear_sum()


def runs_int8(in_features: int, out_features: int, saturates: bool) -> bool:
    """Whether a layer of this shape is an int8 GEMM where that GEMM does or does not saturate: the harmonic
    mean of its in and out features is at least FLOAT_BELOW or FLOAT_BELOW_VNNI."""
    limit = FLOAT_BELOW if saturates else FLOAT_BELOW_VNNI
    return 2 * in_features * out_features >= limit * (in_features + out_features)


# The native int8 GEMM takes layers with fewer input features than this; oneDNN's 7-bit GEMM the wider ones.
# Against oneDNN's, on an AMD EPYC (Zen 4), AVX2 build, 2 threads, Sequencer2D-S at batch 16 (10 alternating
# rounds): 1.05-1.10x at 192 in, 1.01x at 576 -> 192, 0.95-1.02x at 384 and 0.87x at 1152 -> 384; the main
# job's model (64 to 288 in) 1.24x as a whole.
NATIVE_BELOW_IN = 384


def native_kernel(reduce_range: bool, in_features: int) -> bool:
    """Whether a layer runs the native extension's int8 GEMM (qgemm_nt): where the engine's would saturate
    (reduce_range), with an even number of input features (it multiplies pairs of them) under
    NATIVE_BELOW_IN, and the extension built."""
    return reduce_range and in_features % 2 == 0 and in_features < NATIVE_BELOW_IN and native.available()


@contextlib.contextmanager
def _using(name: str):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _prepack(engine: str, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    with warnings.catch_warnings(), _using(engine):
        warnings.simplefilter("ignore")  # quantised-tensor constructors warn of their deprecation
        q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(),
                                                     torch.zeros(len(weight_int8), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, bias)


@functools.cache
def saturates(engine: str) -> bool:
    """Whether `engine`'s int8 GEMM overflows on full-range activations on this CPU (no VNNI/AMX path).

    All-ones activations quantise to u8 255 and all-ones weights to s8 127; an exact GEMM of 64 of them
    gives 64, one that saturates each pair's int16 sum gives about half of it.
    """
    packed = _prepack(engine, torch.full((16, 64), 127, dtype=torch.int8), torch.full((16,), 1 / 127), None)
    with _using(engine):
        y = torch.ops.quantized.linear_dynamic(torch.ones(4, 64), packed, False)
    return not torch.allclose(y, torch.full_like(y, 64.0), rtol=0.02)


def pick_engine(requested: str | None = None) -> tuple[str, bool]:
    """(engine, reduce_range) for int8 GEMMs on this CPU.

    Args:
        requested: an engine name, or None for SEQVISION_INT8_ENGINE or else the first of ENGINES this
            torch build supports. The activation range is 8 bits where the engine's kernel cannot
            overflow here, 7 bits where it can.
    """
    supported = torch.backends.quantized.supported_engines
    name = requested or os.environ.get("SEQVISION_INT8_ENGINE") or next((e for e in ENGINES if e in supported), None)
    if name is None or name not in supported or name == "none":
        raise RuntimeError(f"int8 engine {name!r} is not available in this torch build (supported: {supported})")
    return name, saturates(name)


def describe() -> str:
    """What runs the int8 GEMMs on this CPU, for reports: the engine, its activation width, and the native
    kernel where it takes the engine's place."""
    engine, reduce_range = pick_engine()
    kernel = f", native int16 kernel under {NATIVE_BELOW_IN} inputs" if native_kernel(reduce_range, 2) else ""
    return f"{engine}, {7 if reduce_range else 8}-bit activations{kernel}"


class Int8Linear(nn.Module):
    """A Linear with int8 weights (one scale per output channel) and per-call int8 activations.

    The state dict holds plain tensors (weight_int8, weight_scale, bias), so it saves as safetensors;
    the GEMM's packed weights are built on first use and rebuilt if those tensors change. Where the layer is
    small for this CPU's engine (`runs_int8`), it multiplies float activations by its
    dequantised weights instead (`int8_gemm` False): the same file, faster on such CPUs, and closer to fp32.

    Args:
        weight: (out_features, in_features) float weights.
        bias: (out_features,) float bias, or None.
        engine: the quantised engine; None picks it with `pick_engine`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None = None):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.engine, self.reduce_range = pick_engine(engine)
        self.native_kernel = native_kernel(self.reduce_range, self.in_features)
        self.int8_gemm = runs_int8(self.in_features, self.out_features, self.reduce_range and not self.native_kernel)
        self._cache: dict[str, tuple] = {}

    def _derived(self, kind: str, build):
        """build() of the buffers, kept until one of them is replaced or changed in place."""
        tensors = [t for t in (self.weight_int8, self.weight_scale, self.bias) if t is not None]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if kind not in self._cache or self._cache[kind][0] != key:
            self._cache[kind] = (key, build())
        return self._cache[kind][1]

    def packed(self):
        """The engine's packed int8 weights and bias."""
        return self._derived("packed", lambda: _prepack(self.engine, self.weight_int8, self.weight_scale, self.bias))

    def dense_weight(self) -> torch.Tensor | None:
        """The dequantised (out_features, in_features) float weights where this layer runs a float GEMM on this
        CPU (int8_gemm False), else None."""
        if self.int8_gemm:
            return None
        return self._derived("dense", lambda: self.weight_int8.float() * self.weight_scale[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if not self.int8_gemm:
            return F.linear(x.float(), self.dense_weight(), self.bias)
        lead = x.shape[:-1]
        if self.native_kernel:
            x2 = x.reshape(-1, self.in_features)
            return self.onto(x2.new_empty(x2.shape[0], self.out_features, dtype=torch.float32), x2).view(*lead, -1)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float().contiguous(),
                                               self.packed(), self.reduce_range)
        return y.view(*lead, self.out_features)  # (M, N) -> (..., N)

    def onto(self, out: torch.Tensor, x: torch.Tensor, add: bool = False) -> torch.Tensor:
        """out = self(x), or out += self(x) with `add`, for 2-D x and contiguous out (rows, out_features).
        The native kernel and oneDNN's int8 GEMM write into out, the add in their epilogue: no fresh output,
        which glibc would page-fault in again on every call."""
        if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != (x.shape[0], self.out_features):
            raise ValueError(f"Int8Linear.onto writes a contiguous float32 ({x.shape[0]}, {self.out_features}) "
                             f"tensor, got {out.dtype} {tuple(out.shape)}{'' if out.is_contiguous() else ' strided'}")
        if self.int8_gemm and self.native_kernel:
            ext = native.extension()
            w = self._derived("native", lambda: ext.pack_qgemm(self.weight_int8))
            ext.qgemm_nt(x.float().contiguous(), self.reduce_range, w, self.weight_scale, self.bias, out, add)
            return out
        if not (self.int8_gemm and self.engine == "onednn" and _QLINEAR and native.available()):
            y = self(x)
            return out.add_(y) if add else out.copy_(y)
        x = x.float().contiguous()
        codes = scratch(x.numel(), CODES).view(x.shape)
        scale, zero_point = native.extension().quantize_u8(x, self.reduce_range, codes)
        if not add:
            out.zero_()
        w, w_zp = self._derived("qlinear", lambda: (torch.ops.onednn.qlinear_prepack(self.weight_int8, None),
                                                    torch.zeros(self.out_features, dtype=torch.int32)))
        # the "sum" post-op: the GEMM's output is out itself, added onto
        torch.ops.onednn.qlinear_pointwise.binary(codes, scale, zero_point, w, self.weight_scale, w_zp, out, self.bias,
                                                  1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
        return out

    def extra_repr(self) -> str:
        gemm = f"activation_bits={7 if self.reduce_range else 8}" if self.int8_gemm else "float_gemm=True"
        if self.int8_gemm and self.native_kernel:
            gemm += ", kernel=native"
        return f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}, {gemm}"
