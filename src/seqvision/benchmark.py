"""`seqvision benchmark`: our models against timm's, same weights, same process, alternating rounds."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import create_model
from .engine import make_optimizer
from .flops import count_macs, count_params
from .ops import cpu, gemm, int8
from .ops.inference import mm_onto
from .ops.int8 import Int8Linear
from .quantize import quantize_int8


@dataclass
class BenchConfig:
    model: str = "sequencer2d_s"
    batch_size: int = 16
    img_size: int = 0  # 0: the model's default
    mode: str = "infer"  # infer | train
    rounds: int = 7
    min_seconds: float = 0.0  # and keep alternating rounds until this much time has passed (more_rounds)
    warmup: int = 2
    threads: int = 0
    backends: tuple[str, ...] = ("auto", "reference")
    timm: bool = True
    int8: bool = False


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate (median of `reps` n x n products), in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# glibc's mallopt parameters: above these sizes freed memory goes back to the OS (trim) and new blocks come
# from mmap, so a tensor of that size is page-faulted in again on every step.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT = False


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in this process (as jemalloc or tcmalloc do) instead of handing
    large blocks back to the OS. Implementations that allocate fresh tensors every step (timm's training
    step) then stop page-faulting. The allocator's state is part of a speed figure: `seqvision benchmark`
    measures in either state (`--keep-freed-memory`). Only for glibc; elsewhere it refuses."""
    global _KEPT
    if platform.libc_ver()[0] != "glibc":
        raise RuntimeError(f"keep_freed_memory needs glibc's malloc, this process has {platform.libc_ver()[0]!r}")
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    for param in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD):
        if libc.mallopt(param, 1 << 30) != 1:
            raise RuntimeError(f"mallopt({param}) failed")
    _KEPT = True


def machine() -> dict:
    """What a speed figure depends on: the CPU, the ISA the native kernel was built for, oneDNN's and fbgemm's
    ISA caps, the library of the native paths' float GEMMs (inference, training), the int8 engine with its
    activation width (and the native int8 kernel where it runs), and whether malloc keeps freed memory."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "cpu_isa": cpu.cpu_isa(), "kernel_isa": cpu.build_isa(),
            "onednn_isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "none"),
            "fbgemm_isa_cap": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "none"),
            "gemm": f"{gemm.gemm_engine()}, training {gemm.gemm_engine(training=True)}",
            "int8": int8.describe(),
            "malloc": "keeps freed memory" if _KEPT else "default"}


def timm_equivalent(model: nn.Module) -> nn.Module | None:
    """timm's implementation of the same architecture, or None where timm has none."""
    try:
        import timm
        from timm.models.sequencer import Sequencer2d
    except ImportError:
        return None
    cfg = model.cfg
    if model.family == "sequencer":
        if cfg.mixer != "2d" or cfg.cell != "lstm":
            return None
        n = len(cfg.layers)
        return Sequencer2d(num_classes=cfg.num_classes, in_chans=cfg.in_chans, layers=cfg.layers,
                           patch_sizes=cfg.patch_sizes, embed_dims=cfg.embed_dims, hidden_sizes=cfg.hidden_sizes,
                           mlp_ratios=(cfg.mlp_ratio,) * n, bidirectional=cfg.bidirectional, union=cfg.union,
                           with_fc=cfg.with_fc)
    name = getattr(model, "pretrained_name", "")
    if name in timm.list_models():
        return timm.create_model(name, num_classes=cfg.num_classes, in_chans=cfg.in_chans)
    return None


def _step_fn(model: nn.Module, x: torch.Tensor, mode: str):
    if mode == "infer":
        model.eval()

        def run():
            with torch.no_grad():
                model(x)
        return run
    model.train()
    opt = make_optimizer(model, 1e-4, 0.05)  # the optimizer `seqvision train` runs, for both models
    y = torch.randint(0, max(model.num_classes, 1), (x.shape[0],))

    def run():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def summarize(times: dict[str, list[float]], baseline: str, batch: int) -> dict[str, tuple[float, float]]:
    """(median img/s, median over rounds of baseline time / this time) per implementation: ratios are taken
    within a round, so drift that slows a whole round cancels."""
    return {k: (batch / statistics.median(ts), statistics.median(b / t for t, b in zip(ts, times[baseline])))
            for k, ts in times.items()}


def more_rounds(done: int, elapsed: float, cfg: BenchConfig) -> bool:
    """Whether to time another round: until `rounds` are done and `min_seconds` have passed. A machine whose
    speed drifts over minutes (shared cloud cores) moves the median of a few rounds by +-0.1 in the ratio."""
    return done < cfg.rounds or elapsed < cfg.min_seconds


def run_benchmark(cfg: BenchConfig, progress=None) -> list[dict]:
    """Median img/s of each implementation and the median of per-round ratios to timm's (or the reference)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ours = create_model(cfg.model)
    size = cfg.img_size or ours.cfg.img_size[0]
    x = torch.randn(cfg.batch_size, ours.cfg.in_chans, size, size)
    impls: dict[str, nn.Module] = {}
    for backend in cfg.backends:
        m = create_model(cfg.model, backend=backend) if ours.family == "sequencer" else create_model(cfg.model)
        m.load_state_dict(ours.state_dict())
        impls[f"seqvision[{backend}]" if ours.family == "sequencer" else "seqvision"] = m
    if cfg.int8 and cfg.mode == "infer":
        impls["seqvision[int8]"] = quantize_int8(ours)
    ref = timm_equivalent(ours) if cfg.timm else None
    if ref is not None:
        ref.load_state_dict(ours.state_dict())
        impls["timm"] = ref
    baseline = next((k for k in ("timm", "seqvision[reference]") if k in impls), next(iter(impls)))
    macs = count_macs(ours, (ours.cfg.in_chans, size, size))
    params = count_params(ours)
    rate = matmul_gflops()
    fns = {k: _step_fn(m, x, cfg.mode) for k, m in impls.items()}
    mem = {}
    for k, fn in fns.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(cfg.warmup):
            fn()
        mem[k] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = {k: [] for k in fns}
    r, start = 0, time.perf_counter()
    while more_rounds(r, time.perf_counter() - start, cfg):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate, so drift hits all alike
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        r += 1
        if progress:
            progress(r, max(r, cfg.rounds))
    flop_per_img = 2 * macs * (3 if cfg.mode == "train" else 1)  # backward ~ 2x forward
    rows, where = [], machine()
    for k, (ips, ratio) in summarize(times, baseline, cfg.batch_size).items():
        rows.append(dict(model=cfg.model, impl=k, mode=cfg.mode, batch=cfg.batch_size, img_size=size,
                         threads=torch.get_num_threads(), rounds=r, img_per_s=round(ips, 2), ratio_vs=baseline,
                         ratio=round(ratio, 3), params=params, gmacs=round(macs / 1e9, 3),
                         gflops=round(flop_per_img * ips / 1e9, 1), matmul_gflops=round(rate, 1),
                         roofline_share=round(flop_per_img * ips / 1e9 / rate, 3),
                         peak_mem_growth_mb=round(mem[k], 1), **where))
    return rows


def gemm_shapes(model: nn.Module, x: torch.Tensor) -> dict[tuple[int, int, int], tuple[str, int, torch.Tensor]]:
    """(M, K, N) -> (first layer's name, number of layers, weight) of every GEMM quantize_int8 would make int8
    in an inference pass of `model` on x: each nn.Linear, and each BiLSTM2D's stacked input projection (M
    counted over the whole batch, the native path's chunks aside)."""
    shapes: dict[tuple[int, int, int], tuple[str, int, torch.Tensor]] = {}

    def hook(name: str, weight):
        def record(module, args, _):
            w = (weight() if callable(weight) else weight).detach()
            m = args[0].numel() // args[0].shape[-1]
            key = (m, w.shape[1], w.shape[0])
            first, n, _w = shapes.get(key, (name, 0, w))
            shapes[key] = (first, n + 1, _w)
        return record

    handles = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            handles.append(mod.register_forward_hook(hook(name, mod.weight)))
        elif hasattr(mod, "quantize_int8_") and getattr(mod, "cell", None) == "lstm":
            weight = lambda m=mod: m.stacked_weights(fold=True)[1]  # noqa: E731 (read when the hook fires)
            handles.append(mod.register_forward_hook(hook(name + ".proj", weight)))
    try:
        with torch.enable_grad():  # every layer through its own forward, not the fused inference passes
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def int8_layer_rows(cfg: BenchConfig) -> list[dict]:
    """int8 against fp32 per GEMM shape of `cfg.model`'s inference at cfg.batch_size: the fp32 GEMM into a
    reused buffer as the native inference path runs it (the native GEMM or MKL: gemm_engine()) against
    Int8Linear's int8 GEMM into another (Int8Linear.onto, as that path runs it), alternating rounds, and
    what quantize_int8 makes of that layer on this CPU (`runs_as`: int8, or float for a layer too small for
    this engine). The evidence for seqvision.ops.int8.runs_int8's limits, per CPU."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = create_model(cfg.model, **({"backend": "reference"} if cfg.model.startswith("sequencer") else {}))
    size = cfg.img_size or model.cfg.img_size[0]
    shapes = gemm_shapes(model, torch.randn(cfg.batch_size, model.cfg.in_chans, size, size))
    rows, where = [], machine()
    for (m, k, n), (name, count, w) in shapes.items():
        x, out, out8 = torch.randn(m, k), torch.empty(m, n), torch.empty(m, n)
        q = Int8Linear(w, None)
        runs_as = "int8" if q.int8_gemm else "float"
        q.int8_gemm = True  # time the int8 GEMM whatever this CPU's rule picks
        fns = {"fp32": lambda: mm_onto(out, x, w), "int8": lambda: q.onto(out8, x)}
        for fn in fns.values():
            for _ in range(cfg.warmup):
                fn()
        times = {k_: [] for k_ in fns}
        r, start = 0, time.perf_counter()
        while more_rounds(r, time.perf_counter() - start, cfg):
            for k_ in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t = time.perf_counter()
                fns[k_]()
                times[k_].append(time.perf_counter() - t)
            r += 1
        rows.append(dict(model=cfg.model, layer=name, layers=count, m=m, k=k, n=n, rounds=r,
                         fp32_ms=round(statistics.median(times["fp32"]) * 1e3, 3),
                         int8_ms=round(statistics.median(times["int8"]) * 1e3, 3),
                         int8_speedup=round(statistics.median(f / i for f, i in zip(times["fp32"], times["int8"])), 3),
                         runs_as=runs_as, threads=torch.get_num_threads(), **where))
    return rows
