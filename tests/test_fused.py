"""The fast BiLSTM2D backends against the reference path: same weights, same numbers, gradients too."""
import os
import subprocess
import sys

import pytest
import torch

import seqvision
from seqvision.fused import native_extension

from conftest import random_state_dict

HAVE_NATIVE = native_extension() is not None
LSTM_BACKENDS = ["fused"] + (["native"] if HAVE_NATIVE else [])


def compare(name: str, backend: str, size, **overrides):
    ref = seqvision.create_model(name, backend="reference", **overrides)
    sd = random_state_dict(ref, 0.05)
    ref.load_state_dict(sd)
    fast = seqvision.create_model(name, backend=backend, **overrides)
    fast.load_state_dict(sd)
    x = torch.randn(2, 3, *size)
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
