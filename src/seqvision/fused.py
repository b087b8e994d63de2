"""Backend choice for BiLSTM2D. The fused implementation lands with the speed work; until then every
backend request resolves to the reference path of torch's RNN modules."""
from __future__ import annotations

BACKENDS = ("auto", "reference")


def pick_backend(module, requested: str) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    return "reference"
