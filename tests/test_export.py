"""ONNX (checked in onnxruntime) and torch.export, plus int8 and the benchmark command."""
import fnmatch
import json
import platform
import subprocess
import sys

import pytest
import torch

import seqvision
from seqvision import cli
from seqvision.benchmark import BenchConfig, int8_layer_rows, more_rounds, run_benchmark, summarize
from seqvision.export import check_onnx, dynamic_sides, export_onnx, export_program
from seqvision.quantize import Int8Linear, quantize_int8

from conftest import random_state_dict

SEQUENCERS = seqvision.list_models("*sequencer*")


def shallow(name):
    """Every variant's operators at depth one per stage, so the whole family exports in seconds."""
    cfg = seqvision.registry.get_entry(name).config
    model = seqvision.create_model(name, layers=(1,) * len(cfg.layers))
    model.load_state_dict(random_state_dict(model, 0.05))
    return model


@pytest.mark.parametrize("name", [n for n in SEQUENCERS if not fnmatch.fnmatch(n, "*_[15]m_*")])
def test_onnx_every_sequencer_variant(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model = shallow(name)
    if dynamic_sides(model):
        path = export_onnx(model, tmp_path / "m.onnx", img_size=28)
        results = check_onnx(model, path, [28, 56], batch=3)
    else:  # a position grid: one graph per size
        results = [check_onnx(model, export_onnx(model, tmp_path / f"m{s}.onnx", img_size=s), [s], batch=3)[0]
                   for s in (28, 56)]
    assert len(results) == 2 and all(r["max_abs_diff"] <= 1e-4 for r in results), results


def test_onnx_cli_small_preset(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert cli.main(["export", str(tmp_path / "s.onnx"), "--model", "sequencer2d_1m_28"]) == 0
    out = capsys.readouterr().out
    assert "at 28px" in out and "at 36px" in out


def test_torch_export_dynamic_batch(tmp_path):
    model = shallow("sequencer2d_s")
    export_program(model, tmp_path / "s.pt2", img_size=42)
    loaded = torch.export.load(str(tmp_path / "s.pt2")).module()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 42, 42)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5)
    with pytest.raises(Exception):
        loaded(torch.randn(1, 3, 56, 56))  # the sides were fixed at export time


def test_int8_linear_is_close_and_follows_its_buffers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 192)  # harmonic mean 128 (FLOAT_BELOW): an int8 GEMM on every CPU
    q = Int8Linear(lin.weight, lin.bias)
    assert q.int8_gemm
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        ref = lin(x)
        got = q(x)
        assert got.shape == (3, 5, 192)
        assert ((got - ref).norm() / ref.norm()).item() < 0.02
        q.bias.add_(1.0)  # packed weights are rebuilt when a buffer changes in place
        assert ((q(x) - ref - 1.0).norm() / ref.norm()).item() < 0.02
    assert {k: v.dtype for k, v in q.state_dict().items()} == {
        "weight_int8": torch.int8, "weight_scale": torch.float32, "bias": torch.float32}
    with pytest.raises(ValueError, match="expects 96 input features"):
        q(torch.randn(2, 95))


@pytest.mark.parametrize("name", ["sequencer2d_1m_28", "sequencer2d_s_add", "vit_1m_28", "mixer_1m_28"])
def test_int8_agrees_with_fp32_and_round_trips(name, tmp_path):
    model = shallow(name) if name.startswith("sequencer2d_s") else seqvision.create_model(name)
    model.eval().load_state_dict(random_state_dict(model, 0.05))
    q = quantize_int8(model)
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the original is untouched
    x = torch.randn(16, model.cfg.in_chans, 28, 28)
    with torch.no_grad():
        a, b = model(x), q(x)
        assert ((a - b).norm() / a.norm()).item() < 0.05
        seqvision.save_model(q, tmp_path / "q.safetensors")
        loaded = seqvision.load_model(tmp_path / "q.safetensors").eval()
        assert torch.equal(loaded(x), b)


def test_benchmark_summary_is_the_median_of_per_round_ratios():
    # per-round ratios timm/ours: 2, 1, 4 -> median 2
    times = {"ours": [2.0, 4.0, 1.0], "timm": [4.0, 4.0, 4.0]}
    out = summarize(times, "timm", batch=8)
    assert out["ours"] == (8 / 2.0, 2.0) and out["timm"] == (8 / 4.0, 1.0)
    out = summarize({"ours": [1.0, 3.0, 3.0], "timm": [3.0, 3.0, 6.0]}, "timm", batch=1)
    assert out["ours"][1] == 2.0 and out["ours"][0] == pytest.approx(1 / 3)  # ratios 3, 1, 2; medians 3 vs 3


def test_benchmark_times_rounds_until_both_count_and_time_are_reached():
    cfg = BenchConfig(rounds=3, min_seconds=10.0)
    assert more_rounds(2, 60.0, cfg) and more_rounds(5, 9.9, cfg) and not more_rounds(3, 10.0, cfg)
    assert not more_rounds(3, 0.0, BenchConfig(rounds=3))  # min_seconds 0: exactly `rounds`


def test_benchmark_rows(tmp_path, capsys):
    rows = run_benchmark(BenchConfig(model="sequencer2d_1m_28", batch_size=4, rounds=2, warmup=1, mode="train"))
    impls = {r["impl"] for r in rows}
    assert {"seqvision[auto]", "seqvision[reference]", "timm"} <= impls
    assert all(r["ratio_vs"] == "timm" and r["img_per_s"] > 0 and 0 < r["roofline_share"] for r in rows)
    assert all(r["rounds"] == 2 for r in rows)
    assert all(r["kernel_isa"] in ("avx512", "avx2", "baseline") and "-bit activations" in r["int8"]
               and r["gemm"].split(", training ")[0] in ("mkl", "onednn", "native")
               and r["gemm"].split(", training ")[1] in ("mkl", "onednn") for r in rows)
    out = tmp_path / "b.json"
    assert cli.main(["benchmark", "--model", "vit_1m_28", "--batch-size", "2", "--rounds", "2", "--min-seconds", "0",
                     "--mode", "infer", "--output", str(out)]) == 0
    assert json.loads(out.read_text())[0]["model"] == "vit_1m_28"


def test_int8_layer_rows_cover_every_gemm_once_per_shape(tmp_path):
    """`benchmark --int8-layers`: one row per GEMM shape of the model's inference (every Linear and each
    BiLSTM2D's stacked projection), with how many layers share it and what quantize_int8 runs for it here."""
    from seqvision.ops import int8

    rows = int8_layer_rows(BenchConfig(model="sequencer2d_300k_28", batch_size=2, rounds=1, warmup=0))
    shapes = {(r["m"], r["k"], r["n"]): r for r in rows}
    tokens = 2 * 7 * 7  # two 28x28 images, patches of 4
    for c, d in [(64, 16), (96, 24)]:  # each stage: C channels, hidden D, 2 blocks
        for k, n in [(c, 16 * d), (4 * d, c), (c, 3 * c), (3 * c, c)]:  # projection, fc, fc1, fc2
            assert shapes.pop((tokens, k, n))["layers"] == 2
    head = shapes.pop((2, 96, 10))
    assert head["layer"] == "head.fc" and head["layers"] == 1 and not shapes
    reduce_range = int8.pick_engine()[1]
    assert all(r["runs_as"] == ("int8" if int8.runs_int8(r["k"], r["n"], reduce_range and not int8.native_kernel(
        reduce_range, r["k"])) else "float") for r in rows)
    assert all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    out = tmp_path / "layers.json"
    assert cli.main(["benchmark", "--model", "sequencer2d_300k_28", "--batch-size", "2", "--rounds", "1",
                     "--min-seconds", "0", "--warmup", "0", "--int8-layers", "--output", str(out)]) == 0
    assert len(json.loads(out.read_text())) == len(rows)


KEEP_FREED = """
import resource, torch
from seqvision import benchmark
def faults_of_second_fill():
    for i in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
cold = faults_of_second_fill()
benchmark.keep_freed_memory()
faults_of_second_fill()
print(cold, faults_of_second_fill(), benchmark.machine()["malloc"])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_a_freed_block():
    """By default glibc returns a freed 64 MB block to the OS, so the next one page-faults again (16k faults);
    kept, the second one reuses it. Run in a subprocess: it changes the allocator of the whole process."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, check=True)
    cold, kept, label = out.stdout.split(maxsplit=2)
    assert int(cold) > 10000 and int(kept) < 1000, out.stdout
    assert label.strip() == "keeps freed memory"
