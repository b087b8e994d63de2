"""Correct on every CPU, not only the one at hand: the int8 path without VNNI, the AVX2 kernel build on an
AVX-512 machine, NaN propagation, thread-count independence, and the device/backend choices for GPUs."""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

import seqvision
from seqvision.ops import cpu, int8, native
from seqvision.quantize import Int8Linear, quantize_int8
from seqvision.train import make_deterministic, process_group_backend

from conftest import random_state_dict

X86 = cpu.cpu_isa() != "baseline"
HAVE_NATIVE = native.available()


def run_python(code: str, *args: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# int8 ----------------------------------------------------------------------------------------------------

def int8_inputs():
    """Signed activations, and non-negative ones (post-GELU-like), whose same-sign products overflow a
    saturating int16 pair sum most."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 96, generator=g) * 3, torch.rand(64, 96, generator=g) * 4]


@pytest.mark.parametrize("engine", [e for e in ("onednn", "x86", "fbgemm")
                                    if e in torch.backends.quantized.supported_engines])
def test_int8_linear_is_close_on_every_engine(engine):
    lin = torch.nn.Linear(96, 192)  # large enough for an int8 GEMM on every CPU (harmonic mean 128)
    with torch.no_grad():
        lin.weight.abs_()  # same-sign weights: the worst case for pair sums
        q = Int8Linear(lin.weight, lin.bias, engine)
        assert q.engine == engine and q.int8_gemm
        for x in int8_inputs():
            assert rel_err(q(x), lin(x)) < 0.02, (engine, q.reduce_range)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("reduce_range", [False, True])
def test_quantize_u8_chooses_and_rounds_as_torch_does(reduce_range):
    """The native activation quantiser picks torch's dynamic (scale, zero point) and the same codes, for
    ranges that straddle zero, lie on one side of it, or are all zero; a NaN anywhere gives a NaN scale."""
    import warnings

    ext = native.extension()
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(1000, 96, generator=g) * 3, torch.rand(3, 5, generator=g) + 1,
              -torch.rand(40000, generator=g), torch.zeros(4, 4)):
        codes = torch.empty(x.shape, dtype=torch.uint8)
        scale, zero_point = ext.quantize_u8(x, reduce_range, codes)
        assert (scale, zero_point) == torch._choose_qparams_per_tensor(x, reduce_range)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantised-tensor constructors warn of their deprecation
            want = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr()
        assert torch.equal(codes, want) and codes.max() <= (127 if reduce_range else 255)
    x = torch.randn(8, 8)
    x[3, 4] = float("nan")
    assert torch.isnan(torch.tensor(ext.quantize_u8(x, reduce_range, torch.empty(8, 8, dtype=torch.uint8))[0]))
    with pytest.raises(RuntimeError, match="uint8 tensor of its shape"):
        ext.quantize_u8(x, reduce_range, torch.empty(8, 7, dtype=torch.uint8))


@pytest.mark.parametrize("engine", [e for e in ("onednn", "x86", "fbgemm")
                                    if e in torch.backends.quantized.supported_engines])
def test_int8_onto_writes_what_the_module_returns(engine):
    """Int8Linear.onto, the native inference block's call: out = q(x), or out += q(x), in out itself (on
    oneDNN or the native kernel the GEMM writes there, the add in its epilogue), both what the engine's own
    dynamic int8 linear gives; a NaN input makes every output NaN."""
    lin = torch.nn.Linear(96, 192)
    q = Int8Linear(lin.weight, lin.bias, engine)
    # oneDNN's call as onto makes it exists in this torch (otherwise onto falls back to the module)
    assert int8._QLINEAR or engine != "onednn"
    for x in int8_inputs():
        with int8._using(engine):
            want = torch.ops.quantized.linear_dynamic(x, q.packed(), q.reduce_range)
        assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)
        out = torch.full((64, 192), float("nan"))
        assert q.onto(out, x) is out and torch.allclose(out, want, rtol=1e-5, atol=1e-5)
        seed = torch.randn(64, 192)
        assert torch.allclose(q.onto(seed.clone(), x, add=True), seed + want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"contiguous float32 \(64, 192\) tensor, got torch.float32 \(64, 191\)"):
        q.onto(torch.empty(64, 191), x)
    with pytest.raises(ValueError, match="strided"):
        q.onto(torch.empty(192, 64).t(), x)
    if (engine == "onednn" or q.native_kernel) and HAVE_NATIVE:
        x = int8_inputs()[0]
        x[5, 7] = float("nan")
        assert torch.isnan(q.onto(torch.zeros(64, 192), x)).all()


def exact_int8_linear(q: Int8Linear, x: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    """What an int8 GEMM with torch's dynamic activation codes computes, in float64: no saturation."""
    import warnings

    scale, zero_point = torch._choose_qparams_per_tensor(x, reduce_range)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised-tensor constructors warn of their deprecation
        codes = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr().double() - zero_point
    y = codes @ q.weight_int8.double().t() * (scale * q.weight_scale.double())
    return y if q.bias is None else y + q.bias.double()


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("reduce_range", [True, False])
def test_native_int8_gemm_is_exact(reduce_range):
    """The native int8 GEMM (what runs where the engines saturate) gives the exact integer sums of torch's
    codes, 7-bit or 8-bit, through the module, onto and onto's add, for row counts and widths off its
    blocks; a NaN makes every output NaN; bad shapes are named."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 2, 3), (7, 96, 40), (64, 96, 192), (50, 288, 96), (13, 10, 70)]:
        for bias in (torch.randn(n, generator=g), None):
            q = Int8Linear(torch.randn(n, k, generator=g).abs(), bias)
            q.reduce_range, q.native_kernel, q.int8_gemm = reduce_range, True, True
            assert "kernel=native" in repr(q)
            for x in (torch.randn(m, k, generator=g) * 3, torch.rand(m, k, generator=g) * 4):
                want = exact_int8_linear(q, x, reduce_range)
                tol = 1e-6 * want.abs().max().item()
                assert (q(x).double() - want).abs().max().item() <= tol
                out = torch.full((m, n), float("nan"))
                assert q.onto(out, x) is out and (out.double() - want).abs().max().item() <= tol
                seed = torch.randn(m, n, generator=g)
                assert (q.onto(seed.clone(), x, add=True).double() - seed.double() - want).abs().max() <= tol
    x[0, 1] = float("nan")
    assert torch.isnan(q(x)).all() and torch.isnan(q.onto(torch.zeros(m, n), x, add=True)).all()
    ext = native.extension()
    with pytest.raises(RuntimeError, match="even number of columns"):
        ext.pack_qgemm(torch.zeros(8, 5, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"out \(M, N\) float32.*\[13, 10\].*\[13, 71\]"):
        ext.qgemm_nt(x, reduce_range, ext.pack_qgemm(q.weight_int8), q.weight_scale, None, torch.empty(13, 71), False)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_int8_model_native_block_computes_what_its_modules_do():
    """An int8 model's native inference block (Int8Linear.onto into the block's buffers, residual adds in the
    GEMM) against the same model with autograd on, where every layer runs its own forward: the same int8
    GEMMs, so they differ only where a float rounding moves an activation to the next code."""
    model = seqvision.create_model("sequencer2d_1m_28", backend="native").eval()
    model.load_state_dict(random_state_dict(model, 0.05))
    q = quantize_int8(model)
    assert any(m.int8_gemm for m in q.modules() if isinstance(m, Int8Linear))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fast = q(x)
    with torch.enable_grad():
        slow = q(x).detach()
    assert rel_err(fast, slow) < 1e-3


INT8_WITHOUT_VNNI = """
import torch, seqvision
from seqvision.ops import int8, native
from seqvision.quantize import Int8Linear, quantize_int8
torch.manual_seed(0)
engine, reduce_range = int8.pick_engine()
lin = torch.nn.Linear(96, 192)
with torch.no_grad():
    lin.weight.abs_()
    q = Int8Linear(lin.weight, lin.bias)
    assert q.int8_gemm and q.native_kernel == (reduce_range and native.available())
    errs = []
    for kernel in (False, True):  # the engine's own GEMM, then the native kernel where it is built
        q.native_kernel = kernel and native.available()
        for x in (torch.randn(64, 96) * 3, torch.rand(64, 96) * 4):
            for y in (q(x), q.onto(torch.empty(64, 192), x)):
                errs.append(float(((y - lin(x)).norm() / lin(x).norm())))
    model = seqvision.create_model("sequencer2d_1m_28").eval()
    g = torch.Generator().manual_seed(1)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 if v.dtype.is_floating_point else v
                           for k, v in model.state_dict().items()})
    x = torch.randn(16, 1, 28, 28)
    qmodel = quantize_int8(model)
    kinds = sorted({m.int8_gemm for m in qmodel.modules() if isinstance(m, Int8Linear)})
    a, b = model(x), qmodel(x)
print(engine, reduce_range, max(errs), float((a - b).norm() / a.norm()), ",".join(map(str, kinds)))
"""

# Each engine with its own ISA cap at AVX2: on an AVX-512 CPU these are the only way to run its non-VNNI
# kernels (fbgemm ignores ONEDNN_MAX_CPU_ISA); on an AVX2 CPU they change nothing.
NO_VNNI = {"onednn": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
           "fbgemm": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
           "x86": {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


@pytest.mark.skipif(not X86, reason="the engines' ISA caps are x86 settings")
@pytest.mark.parametrize("engine", [e for e in NO_VNNI if e in torch.backends.quantized.supported_engines])
def test_int8_is_correct_without_vnni(engine):
    """An engine capped at AVX2 (no VNNI, as on most AMD servers and laptops) saturates full-range u8 x s8
    pair sums; the probe must see it and quantise activations to 7 bits, for the engine's GEMM and the
    native kernel alike (module and onto). A model quantised there keeps its small layers (the 1M model's
    head; its 96 -> 96 too without the native kernel) as float GEMMs and its larger ones in int8."""
    out = run_python(INT8_WITHOUT_VNNI, SEQVISION_INT8_ENGINE=engine, **NO_VNNI[engine]).split()
    picked, reduce_range, err, model_err, kinds = out
    assert picked == engine and reduce_range == "True"
    assert float(err) < 0.02 and float(model_err) < 0.05, (err, model_err)
    assert kinds == "False,True"


def test_small_layers_run_float_where_the_engine_saturates(monkeypatch):
    """Where int8 GEMMs saturate, a layer under FLOAT_BELOW (harmonic mean of its in and out features)
    multiplies by its dequantised weights: exactly F.linear with them, in the module and in the native
    inference block (bias seeded, GEMM accumulated), and the same file as an int8 layer. With the native
    kernel, which does not saturate, the limit is FLOAT_BELOW_VNNI's."""
    engine = int8.pick_engine()[0]
    monkeypatch.setattr(int8, "pick_engine", lambda requested=None: (engine, True))
    torch.manual_seed(0)
    narrow, wide = torch.nn.Linear(96, 191), torch.nn.Linear(96, 192)  # harmonic means 127.8 and 128
    assert not int8.runs_int8(288, 64, True) and int8.runs_int8(288, 96, True)
    assert not int8.runs_int8(64, 64, False) and not int8.runs_int8(96, 10, False) and int8.runs_int8(96, 96, False)
    if HAVE_NATIVE:
        q = Int8Linear(narrow.weight, narrow.bias)
        assert q.native_kernel and q.int8_gemm and "kernel=native" in repr(q)
        assert not Int8Linear(torch.randn(191, 95), None).native_kernel  # an odd number of input features
        wider = Int8Linear(torch.randn(192, int8.NATIVE_BELOW_IN), None)  # oneDNN's 7-bit GEMM from there on
        assert not wider.native_kernel and wider.int8_gemm and "kernel=native" not in repr(wider)
    monkeypatch.setattr(int8, "native_kernel", lambda reduce_range, in_features: False)
    qn, qw = Int8Linear(narrow.weight, narrow.bias), Int8Linear(wide.weight, wide.bias)
    assert not qn.int8_gemm and qw.int8_gemm and "float_gemm=True" in repr(qn) and "activation_bits=7" in repr(qw)
    assert qn.state_dict().keys() == qw.state_dict().keys()
    x = torch.randn(7, 96)
    with torch.no_grad():
        w = qn.weight_int8.float() * qn.weight_scale[:, None]
        assert torch.equal(qn(x), torch.nn.functional.linear(x, w, qn.bias))
        assert rel_err(qn(x), narrow(x)) < 0.01
        qn.weight_int8.neg_()  # the dequantised weights follow the buffers
        assert torch.equal(qn(x), torch.nn.functional.linear(x, -w, qn.bias))
    if not HAVE_NATIVE:
        return
    # Every layer narrower than the limit: the int8 model is then the fp32 model with its weights rounded to
    # int8 per output channel, through the native inference block's fused passes.
    monkeypatch.setattr(int8, "FLOAT_BELOW", 1 << 30)
    model = seqvision.create_model("sequencer2d_1m_28", backend="native").eval()
    model.load_state_dict(random_state_dict(model, 0.05))
    q = quantize_int8(model)
    assert not any(m.int8_gemm for m in q.modules() if isinstance(m, Int8Linear))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for m in rounded.modules():
            for name, w in m.named_parameters(recurse=False):
                if (type(m) is torch.nn.Linear and name == "weight") or name.startswith("weight_ih"):
                    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
                    w.copy_(torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None])
        x = torch.randn(4, 1, 28, 28)
        assert (q(x) - rounded(x)).abs().max().item() < 1e-5


def test_int8_probe_matches_the_kernel():
    """The probe's answer is the kernel's behaviour: where it says 8 bits are safe, an all-max GEMM is exact."""
    for engine in ("onednn", "fbgemm"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        q = Int8Linear(torch.ones(int8.FLOAT_BELOW, 256), None, engine)
        y = q(torch.ones(2, 256))
        assert torch.allclose(y, torch.full_like(y, 256.0), rtol=0.02), (engine, q.reduce_range, y[0, 0])


def test_int8_engine_is_named_and_checked(monkeypatch):
    monkeypatch.setenv("SEQVISION_INT8_ENGINE", "no-such-engine")
    with pytest.raises(RuntimeError, match="no-such-engine.*supported"):
        int8.pick_engine()
    monkeypatch.delenv("SEQVISION_INT8_ENGINE")
    engine, _ = int8.pick_engine()
    assert engine in int8.ENGINES
    assert f"engine={engine}" in repr(Int8Linear(torch.randn(4, 8), None))


# The native kernel per ISA ----------------------------------------------------------------------------------

def test_builds_for_different_isas_never_share_a_cache_entry():
    specs = {isa: native.build_spec(isa) for isa in native.ISA_FLAGS}
    assert len({s.directory for s in specs.values()}) == len(specs)
    assert len({s.name for s in specs.values()}) == len(specs)
    assert "-march=x86-64-v3" in specs["avx2"].cflags and "-march=x86-64-v4" in specs["avx512"].cflags
    assert not any("native" in f or "fast-math" in f for s in specs.values() for f in s.cflags)
    assert native.build_spec("avx2") == specs["avx2"]  # stable: the same install finds its build again


def test_a_wider_isa_than_the_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_isa", lambda: "avx2")
    monkeypatch.setenv("SEQVISION_ISA", "avx512")
    with pytest.warns(UserWarning, match="wider than this CPU"):
        assert cpu.build_isa() == "avx2"
    monkeypatch.setenv("SEQVISION_ISA", "sse9")
    with pytest.raises(ValueError, match="SEQVISION_ISA must be one of"):
        cpu.build_isa()


# Run against whichever build is loaded: train and eval outputs and every gradient against the reference,
# at hidden sizes 10 and 24 (grad W_hh summed in the kernel) and 56 (the GEMM at the end), off the vector
# width; then NaN propagation.
KERNEL_CHECKS = """
import torch, seqvision
from seqvision.models.sequencer import RNN2d
torch.manual_seed(0)
hidden = (10, 24, 56, 24)
for name, size in [("sequencer2d_s", (28, 42)), ("sequencer2d_s", (28, 28)), ("sequencer2d_s_add", (28, 28))]:
    ref = seqvision.create_model(name, backend="reference", layers=(1, 1, 1, 1), hidden_sizes=hidden)
    g = torch.Generator().manual_seed(1)
    ref.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in ref.state_dict().items()})
    fast = seqvision.create_model(name, backend="native", layers=(1, 1, 1, 1), hidden_sizes=hidden)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, *size)
    outs = [m.train()(x) for m in (ref, fast)]
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    for y in outs:
        y.square().mean().backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)) <= 1e-4, n
    with torch.no_grad():
        assert (ref.eval()(x) - fast.eval()(x)).abs().max() <= 1e-5
# NaN reaches exactly the states the reference's does, with and without autograd (the cell's clamps are
# compiled to vector selects on these builds).
rnn = RNN2d(16, 8)
x = torch.randn(2, 6, 5, 16)
x[0, 2, 3, 4] = float("nan")
for train in (True, False):
    with torch.set_grad_enabled(train):
        ref, got = rnn.mix(x), (rnn.set_backend("native"), rnn.mix_native(x))[1]
    assert torch.equal(torch.isnan(ref), torch.isnan(got)), train
# int8 activations: torch's dynamic parameters and codes, vector tails included (16387 = 16384 + 3)
import warnings
from seqvision.ops import native
for reduce_range in (False, True):
    v = torch.randn(16387) * 3
    codes = torch.empty(v.shape, dtype=torch.uint8)
    scale, zero_point = native.extension().quantize_u8(v, reduce_range, codes)
    assert (scale, zero_point) == torch._choose_qparams_per_tensor(v, reduce_range)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(codes, torch.quantize_per_tensor(v, scale, zero_point, torch.quint8).int_repr())
# the native int8 GEMM: exact integer sums of those codes, rows and columns off its blocks (with this build's
# vectors: 4, 8 or 16 int32)
ext = native.extension()
g = torch.Generator().manual_seed(2)
for reduce_range in (False, True):
    for m, k, n in [(1, 2, 3), (7, 96, 40), (50, 288, 100)]:
        x, w = torch.randn(m, k, generator=g) * 3, torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        ws, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
        scale, zero_point = torch._choose_qparams_per_tensor(x, reduce_range)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codes = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr().double() - zero_point
        want = codes @ w.double().t() * (scale * ws.double()) + bias.double()
        out = torch.full((m, n), float("nan"))
        ext.qgemm_nt(x, reduce_range, ext.pack_qgemm(w), ws, bias, out, False)
        assert (out.double() - want).abs().max() <= 1e-6 * want.abs().max(), (m, k, n)
"""

NARROW_KERNEL = """
import os
from seqvision.ops import cpu, native
assert cpu.build_isa() == os.environ["SEQVISION_ISA"], cpu.build_isa()
print(native.build_spec().directory / (native.build_spec().name + ".so"))
""" + KERNEL_CHECKS

# The AVX-512 build's tile shape (6 x 4 blocks of 16 floats) compiled for this CPU's own ISA, in a build
# folder of the test's own, and put in place of the usual build.
AVX512_TILES = """
import sys
from torch.utils.cpp_extension import load
from seqvision.ops import native
spec = native.build_spec()
native._EXT[spec.isa] = load("seqvision_lstm_avx512_tiles", [str(native.SOURCE)], build_directory=sys.argv[1],
                             extra_cflags=[*spec.cflags, "-DSEQVISION_AVX512_TILES"], extra_ldflags=list(spec.ldflags))
import torch
assert native.pack_recurrent(torch.zeros(1, 40, 10)).shape[-1] == 48  # 4D = 40 padded to 16 floats, not 8
""" + KERNEL_CHECKS


@pytest.mark.skipif(not (X86 and HAVE_NATIVE), reason="needs an x86 CPU and a C++ compiler")
# The SSE baseline is slow: one more build (about a minute) for x86 CPUs without AVX2, which few run on.
@pytest.mark.parametrize("isa", ["avx2", pytest.param("baseline", marks=pytest.mark.slow)])
def test_narrower_kernel_builds_match_the_reference(isa):
    """The AVX2 build (what AVX2-only CPUs run) and the SSE baseline, forced on any x86 machine: exact,
    NaN-propagating, and free of wider instructions."""
    so = run_python(NARROW_KERNEL, SEQVISION_ISA=isa).strip().splitlines()[-1]
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", so], capture_output=True, text=True).stdout
        assert "zmm" not in asm and ("ymm" in asm) == (isa == "avx2")


@pytest.mark.slow  # a build of its own: about a minute of compiling
@pytest.mark.skipif(not (X86 and HAVE_NATIVE) or cpu.cpu_isa() == "avx512",
                    reason="needs an x86 CPU without AVX-512 (where the AVX-512 build itself is tested) and a compiler")
def test_avx512_tile_shape_matches_the_reference_on_any_cpu(tmp_path):
    """The AVX-512 build's tiles, padding to 16 floats and partial sums, checked on a CPU that cannot run
    that build."""
    run_python(AVX512_TILES, str(tmp_path))


@pytest.mark.parametrize("backend", ["reference", "fused"] + (["native"] if HAVE_NATIVE else []))
@pytest.mark.parametrize("train", [True, False])
def test_nan_in_nan_out(backend, train):
    model = seqvision.create_model("sequencer2d_s", backend=backend, layers=(1, 1, 1, 1))
    model.load_state_dict(random_state_dict(model, 0.05))
    x = torch.randn(2, 3, 28, 28)
    clean = model.eval()(x).detach()
    x[0, 1, 5, 9] = float("nan")
    with torch.set_grad_enabled(train):
        y = model.train(train)(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert torch.allclose(y[1], clean[1], atol=1e-5)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_native_gradients_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    K, D, B, H, W = 4, 12, 8, 5, 5  # 40 sequences: several work items, so their partial sums are added
    xg = torch.randn(B, H, W, K, 4 * D, requires_grad=True)
    bias = torch.randn(K, 4 * D, requires_grad=True)
    w_hh = (torch.randn(K, 4 * D, D) * 0.2).requires_grad_()
    groups = [([0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 0, 1])]
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = native.LSTMRecurrence.apply(xg, bias, w_hh, groups)
            grads.append(torch.autograd.grad(out.square().sum(), (xg, bias, w_hh)))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


# GPUs: the backend choice and the process group, testable without one -------------------------------------

def test_auto_runs_the_reference_off_the_cpu():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    forced = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1), backend="fused")
    rnn, rnn_forced = model.stages[0].blocks[0].rnn_tokens, forced.stages[0].blocks[0].rnn_tokens
    meta = torch.empty(1, 7, 7, 192, device="meta")  # stands in for a CUDA tensor
    cpu = torch.empty(1, 7, 7, 192)
    assert rnn.runs(meta) == "reference"  # cuDNN's LSTM on a GPU
    assert rnn.runs(cpu) == ("native" if HAVE_NATIVE else "reference")
    assert rnn_forced.runs(meta) == "fused"


def test_process_group_serves_both_devices_and_determinism_sets_cublas(monkeypatch):
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_auto_is_cudnn_and_matches_the_cpu():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    model.load_state_dict(random_state_dict(model, 0.05))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        cpu = model.eval()(x)
        gpu = model.cuda()(x.cuda())
    assert model.stages[0].blocks[0].rnn_tokens.runs(x.cuda()) == "reference"
    assert (gpu.cpu() - cpu).abs().max() <= 1e-3


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("train", [True, False])
def test_native_recurrence_propagates_nan_like_the_reference(train):
    """A NaN at one pixel reaches exactly the states the reference's do: the cross of its row and column,
    from that step on in each direction (the logits test above cannot see this: the MLP spreads it anyway)."""
    from seqvision.models.sequencer import RNN2d

    rnn = RNN2d(16, 8)
    x = torch.randn(2, 6, 5, 16)
    x[0, 2, 3, 4] = float("nan")
    with torch.set_grad_enabled(train):
        ref, got = rnn.mix(x), (rnn.set_backend("native"), rnn.mix_native(x))[1]
    assert torch.equal(torch.isnan(ref), torch.isnan(got))
    assert torch.isnan(got).any(dim=-1).sum() == 6 + 5 - 1 and not torch.isnan(got[1]).any()
