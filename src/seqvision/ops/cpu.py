"""What the CPU and the environment allow: the ISA of this CPU and of the native extension's build, the
CPU's vendor, and whether oneDNN may use AVX-512. No imports of the rest of seqvision, so that the modules
choosing a code path (seqvision.ops.native, seqvision.ops.gemm) can share it."""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

_RANK = {"baseline": 0, "avx2": 1, "avx512": 2}


def cpu_isa() -> str:
    """The widest ISA this CPU (and ATEN_CPU_CAPABILITY, if set) allows: avx512, avx2 or baseline."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    cap = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default"
    return cap if cap in _RANK else "baseline"


def build_isa() -> str:
    """The ISA the extension is built for: SEQVISION_ISA where it is no wider than the CPU's, else the CPU's."""
    best = cpu_isa()
    want = os.environ.get("SEQVISION_ISA", "").strip().lower()
    if not want:
        return best
    if want not in _RANK:
        raise ValueError(f"SEQVISION_ISA must be one of {sorted(_RANK)}, got {want!r}")
    if _RANK[want] > _RANK[best]:
        warnings.warn(f"seqvision: SEQVISION_ISA={want} is wider than this CPU allows ({best}); building for {best}")
        return best
    return want


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The x86 vendor string of CPU 0 ('GenuineIntel', 'AuthenticAMD'); '' where Linux does not list one."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_avx512() -> bool:
    """Whether oneDNN may run AVX-512 code here: the CPU (as ATen sees it, ATEN_CPU_CAPABILITY included)
    has it, and ONEDNN_MAX_CPU_ISA, if set, does not cap oneDNN below it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).strip().upper()
    return torch.backends.cpu.get_cpu_capability().lower() == "avx512" and cap.startswith(("ALL", "AVX512", "AVX10"))
