"""The fast BiLSTM2D backends against the reference path: same weights, same numbers, gradients too."""
import os
import subprocess
import sys

import pytest
import torch

import seqvision
from seqvision.ops import native
from seqvision.quantize import quantize_int8

from conftest import random_state_dict

HAVE_NATIVE = native.available()
LSTM_BACKENDS = ["fused"] + (["native"] if HAVE_NATIVE else [])


def pair(name: str, backend: str, **overrides):
    """The reference model and one on `backend`, with the same random (non-zero head) weights."""
    ref = seqvision.create_model(name, backend="reference", **overrides)
    sd = random_state_dict(ref, 0.05)
    ref.load_state_dict(sd)
    fast = seqvision.create_model(name, backend=backend, **overrides)
    fast.load_state_dict(sd)
    return ref, fast


def compare(name: str, backend: str, size, **overrides):
    ref, fast = pair(name, backend, **overrides)
    x = torch.randn(2, ref.cfg.in_chans, *size)
    outs = []
    for m in (ref, fast):
        y = m.train()(x)  # no dropout or drop path configured: train mode only enables autograd bookkeeping
        y.square().mean().backward()
        outs.append(y.detach())
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        err = (p.grad - q.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)
        assert err.item() <= 1e-4, n


@pytest.mark.parametrize("backend", LSTM_BACKENDS)
@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
@pytest.mark.parametrize("size", [(28, 28), (28, 42)])
def test_released_models_match_reference(name, backend, size):
    compare(name, backend, size)


@pytest.mark.parametrize("name,backend", [
    ("gru_sequencer2d_s", "fused"), ("rnn_sequencer2d_s", "fused"),
    *[(n, b) for b in LSTM_BACKENDS for n in ("sequencer2d_s_unidirectional", "sequencer2d_s_add",
                                               "sequencer2d_s_vertical", "sequencer2d_s_horizontal",
                                               "sequencer2d_s_without_fc")]])
@pytest.mark.parametrize("size", [(28, 28), (42, 28)])
def test_variants_match_reference(name, backend, size):
    compare(name, backend, size, layers=(1, 1, 2, 1))


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_hidden_sizes_off_the_vector_width_match_reference():
    # D = 10 and 14: rows of W_hh padded to whole vectors, partial tiles; grad W_hh summed in the kernel
    compare("sequencer2d_s", "native", (28, 42), layers=(1, 1, 1, 1), hidden_sizes=(10, 14, 14, 14))


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("hidden", [8, 56])  # grad W_hh summed in the kernel, and by the shifted GEMM
@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 1, 5), (3, 5, 1), (1, 1, 1), (3, 2, 3), (1, 3, 2)])
def test_native_gradients_at_the_edges_of_the_grid(hidden, shape):
    """One-step sequences, one image and one-pixel rows: where the GEMM's shifted pairs cross from one
    sequence, row or image into the next and must be taken out again."""
    from seqvision.models.sequencer import RNN2d

    torch.manual_seed(0)
    rnn = RNN2d(16, hidden)
    x = torch.randn(*shape, 16, requires_grad=True)
    grads = []
    for backend in ("reference", "native"):
        rnn.set_backend(backend)
        y = rnn(x)
        grads.append((y.detach(), *torch.autograd.grad(y.square().sum(), [x, *rnn.parameters()])))
    for a, b in zip(*grads):
        assert ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item() <= 1e-5


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("name,overrides", [
    ("sequencer2d_s", {}), ("sequencer2d_s", {"hidden_sizes": (10, 14, 14, 14)}), ("sequencer2d_300k_28", {}),
    *[(n, {}) for n in ("sequencer2d_s_unidirectional", "sequencer2d_s_add", "sequencer2d_s_vertical",
                        "sequencer2d_s_horizontal", "sequencer2d_s_without_fc")]])
@pytest.mark.parametrize("size", [(28, 28), (28, 56)])
def test_inference_path_matches_reference(name, overrides, size):
    """Eval mode outside autograd takes the fused block (cached weights, GEMM epilogues); batch 3 leaves
    a partial tile of sequences."""
    if "layers" not in overrides and not name.startswith("sequencer2d_300k"):
        overrides = {**overrides, "layers": (1, 1, 2, 1)}
    ref, fast = pair(name, "native", **overrides)
    ref.eval(), fast.eval()
    x = torch.randn(3, ref.cfg.in_chans, *size)
    with torch.no_grad():
        assert (ref(x) - fast(x)).abs().max().item() <= 1e-5
        for m in (ref, fast):  # weights changed in place after a call: the cached stacked weights follow
            for name_, p in m.named_parameters():
                if "rnn" in name_:
                    p.mul_(1.5)
        assert (ref(x) - fast(x)).abs().max().item() <= 1e-5


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_evaluation_after_fused_optimizer_steps_uses_the_new_weights():
    """torch's fused AdamW (what make_optimizer gives) updates in place without bumping version counters:
    evaluation between training steps must still see the weights of the latest step, not cached ones."""
    from seqvision.engine import make_optimizer

    model = seqvision.create_model("sequencer2d_300k_28")
    opt = make_optimizer(model, 1e-2, 0.05)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            model(x)  # caches the stacked weights
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    fresh = seqvision.create_model("sequencer2d_300k_28").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("images", [1, 2])
def test_inference_in_chunks_of_images_matches_reference(monkeypatch, images):
    """Native inference runs GEMM and recurrence over chunks of images that fit in cache: batch 5 in
    chunks of 1, and of 2 (2, 2, 1), gives the reference's logits."""
    from seqvision.models import sequencer

    ref, fast = pair("sequencer2d_s", "native", layers=(1, 1, 1, 1))
    ref.eval(), fast.eval()
    x = torch.randn(5, 3, 28, 42)
    per_image = 4 * 6 * 4 * (4 * 48) * 4  # stage 1: 4x6 pixels, K=4 directions of 4D gates, float32
    monkeypatch.setattr(sequencer, "XG_CHUNK_BYTES", images * per_image)
    calls = []
    lstm2d = native.lstm2d
    monkeypatch.setattr(native, "lstm2d", lambda xg, *a, **k: calls.append(xg.shape[0]) or lstm2d(xg, *a, **k))
    chunks = [1] * 5 if images == 1 else [2, 2, 1]
    with torch.no_grad():
        y = ref(x)
        assert (y - fast(x)).abs().max().item() <= 1e-5
        assert calls[: len(chunks)] == chunks  # stage 1's chunks
        calls.clear()
        q = quantize_int8(fast)  # int8 input projection, chunked the same way
        assert ((q(x) - y).norm() / y.norm()).item() < 0.05
        assert calls[: len(chunks)] == chunks


def test_gate_chunks_follow_the_last_level_cache(tmp_path):
    """The chunk of gates per native inference call is a quarter of the last-level cache sysfs lists, from 8
    to 32 MiB; instruction caches are not counted, and a machine without that listing gets 8 MiB."""
    from seqvision.ops.inference import gate_chunk_bytes, last_level_cache_bytes

    def cache(name, level, kind, size):
        d = tmp_path / "cache" / name
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")

    cache("index0", 1, "Data", "48K")
    cache("index1", 1, "Instruction", "64K")
    cache("index2", 2, "Unified", "2048K")
    assert last_level_cache_bytes(tmp_path / "cache") == 2 << 20
    cache("index3", 3, "Unified", "491520K")  # the Intel Xeon's
    assert last_level_cache_bytes(tmp_path / "cache") == 480 << 20
    assert gate_chunk_bytes(480 << 20) == 32 << 20
    assert gate_chunk_bytes(64 << 20) == 16 << 20
    assert gate_chunk_bytes(32 << 20) == 8 << 20  # the AMD EPYC's (Zen 3)
    assert last_level_cache_bytes(tmp_path / "none") == 0 and gate_chunk_bytes(0) == 8 << 20
    cache("index4", 4, "Unified", "garbled")  # an unreadable entry is skipped, not fatal
    assert last_level_cache_bytes(tmp_path / "cache") == 480 << 20


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_kernel_refuses_unpacked_recurrent_weights():
    ext = native.extension()
    xg, out = torch.zeros(1, 2, 2, 1, 32), torch.zeros(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match=r"pack_recurrent\(W_hh\), contiguous \(1, 8, 32\), got \[1, 32, 8\]"):
        ext.lstm_forward(xg, torch.zeros(1, 32), torch.zeros(1, 32, 8), out, [0], [0], [0], False)
    assert ext.pack_recurrent(torch.zeros(1, 32, 8)).shape == (1, 8, 32)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_native_off_the_cpu_takes_the_pytorch_path():
    # the C++ kernel reads CPU memory; on another device (meta stands in for a GPU) the same math runs in PyTorch
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1)).to("meta")
    x = torch.randn(2, 3, 56, 56, device="meta")
    assert model.train()(x).shape == (2, 1000)
    with torch.no_grad():
        assert model.eval()(x).device.type == "meta"


def test_auto_picks_native_for_lstm_only():
    lstm = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    gru = seqvision.create_model("gru_sequencer2d_s", layers=(1, 1, 1, 1))
    assert {m.backend for m in lstm.modules() if hasattr(m, "backend")} == {"native" if HAVE_NATIVE else "reference"}
    assert {m.backend for m in gru.modules() if hasattr(m, "backend")} == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        seqvision.create_model("sequencer2d_s", backend="cuda")


NO_COMPILER = """
import warnings, torch, seqvision
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    m = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    assert any("native BiLSTM2D unavailable" in str(x.message) for x in w), [str(x.message) for x in w]
assert {b.backend for b in m.modules() if hasattr(b, "backend")} == {"reference"}
print(m(torch.randn(1, 3, 28, 28)).shape)
"""


def test_without_a_compiler_falls_back(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 1000])" in out.stdout


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_epilogue_matches_torch(in_place, with_bias):
    """The MLP's epilogue: exact GELU of x + bias (or of x, after an int8 GEMM that adds its own bias), also
    where erf has reached +-1; NaN passes. In place at inference; in training x keeps x + bias for the
    backward."""
    x = torch.linspace(-9, 9, 30000).view(-1, 3)
    b = torch.tensor([0.0, 0.5, -2.0]) if with_bias else torch.zeros(3)
    pre = x.clone()
    y = pre if in_place else torch.empty_like(x)
    native.extension().bias_gelu(pre, b if with_bias else None, y)
    ref = torch.nn.functional.gelu(x + b)
    assert ((y - ref).abs() / (x + b).abs().clamp(min=1)).max() <= 1e-6
    if not in_place:
        assert torch.equal(pre, x + b)
    odd = torch.tensor([[float("nan"), 1.0, float("inf")]])
    native.extension().bias_gelu(odd, torch.zeros(3), odd)
    assert odd[0, 0].isnan() and odd[0, 2] == float("inf")  # NaN stays NaN; inf is gelu's limit
    with pytest.raises(RuntimeError, match=r"bias must have x.size\(1\) = 3 float32 elements, got \[4\]"):
        native.extension().bias_gelu(torch.zeros(2, 3), torch.zeros(4), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"got \[2, 3\] and \[3, 2\]"):
        native.extension().bias_gelu(torch.zeros(2, 3), torch.zeros(3), torch.zeros(3, 2))


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_linear_gelu_matches_torch_in_value_and_gradient():
    """The MLP's first layer in training against F.linear + F.gelu: output and the three gradients, over
    pre-activations from -9 to 9 (GELU's derivative overshoots 1 and its tails vanish); a NaN input row
    gives NaN in that row only; the bias gradient's partial sums (blocks of 256 rows) do not depend on
    the thread count."""
    torch.manual_seed(0)
    x = (torch.randn(3, 200, 16) * 3).requires_grad_()  # 600 rows: three blocks, the last one partial
    w = (torch.randn(48, 16) * 0.3).requires_grad_()
    b = torch.randn(48).requires_grad_()
    g = torch.randn(3, 200, 48)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            y = native.LinearGELU.apply(x, w, b)
            runs.append((y, torch.autograd.grad(y, (x, w, b), g)))
    finally:
        torch.set_num_threads(threads)
    y, grads = runs[0]
    assert y.shape == ref.shape and (y - ref).abs().max() <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert torch.equal(runs[1][1][2], grads[2])
    bad = x.detach().clone()
    bad[1, 7, 3] = float("nan")
    y = native.LinearGELU.apply(bad, w, b)
    assert y[1, 7].isnan().all() and not y[1, 8:].isnan().any() and not y[0].isnan().any()


def test_mlp_takes_linear_gelu_in_training_on_the_native_backends_only():
    model = seqvision.create_model("sequencer2d_300k_28")
    mlp = model.stages[0].blocks[0].mlp_channels
    x = torch.randn(2, 7, 7, 64)
    assert mlp.runs_native(x) == HAVE_NATIVE
    with torch.no_grad():
        assert not mlp.runs_native(x)  # inference has its own paths (Block.forward_inference)
    assert not mlp.runs_native(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlp.runs_native(x)  # autocast would hand the native pass a bf16 GEMM output
    model.set_backend("reference")
    assert not mlp.runs_native(x)  # the reference is plain PyTorch throughout
    model.set_backend("fused")
    assert not mlp.runs_native(x)


class _ShiftedGELU(torch.nn.GELU):
    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_a_gelu_subclass_keeps_its_own_forward_in_training_and_inference():
    """The native passes compute nn.GELU's erf form; a subclass of nn.GELU (here GELU + 1) is run as itself
    by the training MLP and by the inference block alike, so all backends give the same logits."""
    torch.manual_seed(0)
    model = seqvision.create_model("sequencer2d_300k_28").eval()
    torch.nn.init.normal_(model.get_classifier().weight)  # zero at init: the logits would not see the blocks
    for block in model.stages[0].blocks:
        block.mlp_channels.act = _ShiftedGELU()
    x = torch.randn(2, 1, 28, 28)
    assert not model.stages[0].blocks[0].mlp_channels.exact_gelu
    assert model.stages[1].blocks[0].mlp_channels.exact_gelu
    with torch.no_grad():
        auto = model(x)
        model.set_backend("reference")
        ref = model(x)
    assert (auto - ref).abs().max() <= 1e-5
    model.set_backend("auto")
    mlp = model.stages[0].blocks[0].mlp_channels
    h = torch.randn(2, 7, 7, mlp.fc1.in_features)
    assert not mlp.runs_native(h)
    assert (model(x) - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_layer_norm_seed_matches_torch():
    """The inference pass before each GEMM: out = layer_norm(x) and seed = x + add together, seed in place
    or not, affine or not; NaN stays in its row; shapes at fault are named."""
    ext, F = native.extension(), torch.nn.functional
    x = torch.randn(37, 192) * 3 + 1
    w, b, add = torch.randn(192), torch.randn(192), torch.randn(192)
    out, seed = torch.empty_like(x), torch.empty_like(x)
    ext.layer_norm_seed(x, w, b, 1e-6, add, out, seed)
    assert (out - F.layer_norm(x, (192,), w, b, 1e-6)).abs().max() <= 1e-5
    assert torch.equal(seed, x + add)
    inplace = x.clone()
    ext.layer_norm_seed(inplace, None, None, 1e-6, None, out, inplace)
    assert (out - F.layer_norm(x, (192,), None, None, 1e-6)).abs().max() <= 1e-5 and torch.equal(inplace, x)
    x[3, 5] = float("nan")
    ext.layer_norm_seed(x, w, b, 1e-6, add, out, x)
    assert out[3].isnan().all() and not out[torch.arange(37) != 3].isnan().any()
    with pytest.raises(RuntimeError, match=r"must be \(192\) float32, got \[191\]"):
        ext.layer_norm_seed(x, w, b, 1e-6, add[:191], out, seed)
    with pytest.raises(RuntimeError, match="out must not be x"):
        ext.layer_norm_seed(x, w, b, 1e-6, add, x, seed)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_block_inference_leaves_its_input_and_earlier_outputs_alone():
    """The inference block builds its output in place and cycles reused buffers: neither the caller's input
    nor what an earlier call returned may change."""
    ref, fast = pair("sequencer2d_s", "native", layers=(1, 1, 1, 1))
    block = fast.eval().stages[0].blocks[0]
    x1, x2 = torch.randn(2, 4, 6, 192), torch.randn(2, 4, 6, 192)
    keep = x1.clone()
    with torch.no_grad():
        y1 = block(x1)
        first = y1.clone()
        y2 = block(x2)
        assert torch.equal(x1, keep) and torch.equal(y1, first)
        assert (y2 - ref.eval().stages[0].blocks[0](x2)).abs().max() <= 1e-5


@pytest.fixture
def gemm_engine(monkeypatch):
    """Sets SEQVISION_GEMM_ENGINE for the test and clears the cached choice before and after."""
    from seqvision.ops import gemm

    def use(name: str) -> None:
        monkeypatch.setenv("SEQVISION_GEMM_ENGINE", name)
        gemm.gemm_engine.cache_clear()

    yield use
    monkeypatch.undo()
    gemm.gemm_engine.cache_clear()


def test_gemm_engine_follows_the_rule_and_the_variable(monkeypatch, gemm_engine, tmp_path):
    """On a CPU not Intel's: the native GEMM at inference where the extension is built for AVX2 or AVX-512,
    oneDNN in training where it has AVX-512; MKL elsewhere. SEQVISION_GEMM_ENGINE overrides (training takes
    MKL for 'native', which has no training GEMM), and a bad value is named."""
    from seqvision.ops import cpu, gemm

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu.cpu_vendor(info) == "AuthenticAMD"
    assert cpu.cpu_vendor(tmp_path / "none") == ""
    for vendor, avx512, isa, want in [("AuthenticAMD", True, "avx512", ("native", "onednn")),
                                      ("AuthenticAMD", True, "avx2", ("native", "onednn")),
                                      ("AuthenticAMD", False, "avx2", ("native", "mkl")),
                                      ("AuthenticAMD", False, "baseline", ("mkl", "mkl")),
                                      ("GenuineIntel", True, "avx512", ("mkl", "mkl")),
                                      ("GenuineIntel", False, "avx2", ("mkl", "mkl")),
                                      ("", False, "avx2", ("mkl", "mkl"))]:
        monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(gemm, "onednn_avx512", lambda: avx512)
        monkeypatch.setattr(gemm, "build_isa", lambda: isa)
        gemm_engine("auto")
        assert (gemm.gemm_engine(), gemm.gemm_engine(training=True)) == want, (vendor, avx512, isa)
    for name, want in [("MKL", ("mkl", "mkl")), ("onednn", ("onednn", "onednn")), ("native", ("native", "mkl"))]:
        gemm_engine(name)
        assert (gemm.gemm_engine(), gemm.gemm_engine(training=True)) == want, name
    gemm_engine("blas")
    with pytest.raises(ValueError, match="SEQVISION_GEMM_ENGINE must be one of .*'blas'"):
        gemm.gemm_engine()


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
def test_native_gemm_matches_torch_and_names_bad_shapes():
    """gemm_nt against x @ W^T, written and added onto out, for row counts that leave partial row blocks,
    widths that leave partial panels, and K from 1 up; bad shapes are named."""
    ext = native.extension()
    for M, K, N in [(1, 1, 16), (7, 33, 48), (13, 192, 576), (50, 1200, 96), (301, 64, 1536)]:
        x, w, seed = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
        out = torch.full((M, N), float("nan"))
        ext.gemm_nt(x, ext.pack_gemm(w), out, False)
        ref = x.double() @ w.double().t()
        bound = (K + 1) * 2 ** -24 * (x.double().abs() @ w.double().abs().t())  # float32 summation's bound
        assert ((out - ref).abs() <= bound).all(), (M, K, N)
        before = seed.double()
        ext.gemm_nt(x, ext.pack_gemm(w), seed, True)
        assert ((seed - (before + ref)).abs() <= bound + before.abs() * 2 ** -23).all(), (M, K, N)
    with pytest.raises(RuntimeError, match=r"multiple of \d+ rows, got \[10, 4\]"):
        ext.pack_gemm(torch.zeros(10, 4))
    with pytest.raises(RuntimeError, match=r"got \[3, 4\], \[4, 16\], \[3, 15\]"):
        ext.gemm_nt(torch.zeros(3, 4), ext.pack_gemm(torch.zeros(16, 4)), torch.zeros(3, 15), False)


def test_onednn_avx512_follows_the_isa_caps(monkeypatch):
    from seqvision.ops import cpu

    for cap, env, want in [("AVX512", None, True), ("AVX512", "AVX2", False), ("AVX512", "avx512_core_amx", True),
                           ("AVX2", None, False), ("AVX512", "ALL", True)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if env is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", env)
        assert cpu.onednn_avx512() is want, (cap, env)


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("engine", ["mkl", "onednn", "native"])
@pytest.mark.parametrize("fresh_rows", [None, 7])
def test_inference_gemms_on_every_engine_match_reference(monkeypatch, gemm_engine, engine, fresh_rows):
    """Every GEMM engine gives the reference's logits, float and int8, with oneDNN's MLP in one piece and
    in chunks of rows (fresh outputs capped at 7 rows of stage 1's hidden layer: its 24 rows in 4 chunks of 6,
    and the wider GEMMs to MKL)."""
    from seqvision.ops import inference

    gemm_engine(engine)
    if fresh_rows:
        monkeypatch.setattr(inference, "FRESH_OUTPUT_BYTES", fresh_rows * 4 * 3 * 192)
    calls = []
    pack = inference.packed
    monkeypatch.setattr(inference, "packed", lambda w, *how: calls.append(tuple(w.shape)) or pack(w, *how))
    ref, fast = pair("sequencer2d_s", "native", layers=(1, 1, 1, 1))
    ref.eval(), fast.eval()
    x = torch.randn(1, 3, 28, 42)  # stage 1: 4x6 = 24 rows
    with torch.no_grad():
        y = ref(x)
    with torch.inference_mode():  # where the stacked weights are inference tensors
        assert (y - fast(x)).abs().max().item() <= 1e-5
    with torch.no_grad():
        # oneDNN runs the projection, fc, fc1 and fc2 of each of the 4 blocks, fc1 and fc2 once per chunk
        if engine == "mkl":
            assert calls == []
        elif engine == "native":  # every GEMM of the blocks, once each, in one piece
            assert calls == [(768, 192), (192, 192), (576, 192), (192, 576)] + [
                (1536, 384), (384, 384), (1152, 384), (384, 1152)] * 3
        else:
            assert len(calls) >= 16 and calls.count((576, 192)) == (1 if fresh_rows is None else 4)
        q = quantize_int8(fast)
        assert ((q(x) - y).norm() / y.norm()).item() < 0.05


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("engine", ["onednn", "native"])
def test_packed_weights_follow_in_place_updates(gemm_engine, engine):
    """The packed copy of a weight (oneDNN's layout or the native GEMM's) is made again after the weight is
    written to (a new version), and after a switch to training and back, which is what catches fused
    optimizer steps (no version bump); it goes when the weight does."""
    from seqvision.ops import gemm

    gemm_engine(engine)
    ref, fast = pair("sequencer2d_s", "native", layers=(1, 1, 1, 1))
    ref.eval(), fast.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        fast(x)
        for m in (ref, fast):
            m.stages[1].blocks[0].mlp_channels.fc1.weight.mul_(1.5)  # bumps the version
        assert (ref(x) - fast(x)).abs().max().item() <= 1e-5
        for m in (ref, fast):  # as torch's fused AdamW writes: no version bump
            w = m.stages[1].blocks[0].mlp_channels.fc2.weight
            torch._foreach_mul_([w.data], 1.5)
            m.train().eval()
        assert (ref(x) - fast(x)).abs().max().item() <= 1e-5
    w = torch.randn(256, 128)
    gemm.packed(w)
    key = (id(w), gemm.onednn_layout)
    assert key in gemm._PACKED
    del w
    assert key not in gemm._PACKED


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C++ compiler")
@pytest.mark.parametrize("engine", ["mkl", "onednn", "native"])
def test_training_on_every_gemm_engine_matches_reference(gemm_engine, engine):
    """The native backend's training GEMMs (projection, fc, the MLP's two Linears) on every engine (MKL's
    where it is 'native') give the reference's outputs and gradients, and gemm.Linear those of F.linear."""
    from seqvision.ops import gemm

    gemm_engine(engine)
    compare("sequencer2d_s", "native", (28, 28), layers=(1, 1, 1, 1))
    x = torch.randn(2, 5, 7, requires_grad=True)
    w, b = torch.randn(3, 7, requires_grad=True), torch.randn(3, requires_grad=True)
    grads = []
    for f in (torch.nn.functional.linear, gemm.linear):
        y = f(x, w, b)
        grads.append((y, *torch.autograd.grad(y.sin().sum(), (x, w, b))))
    for a, c in zip(*grads):
        assert (a - c).abs().max().item() <= 1e-5
