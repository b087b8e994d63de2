"""The paper's claims as commands: `seqvision experiment NAME`. Each experiment is a set of cells (model x
seed x setting), each cell an ordinary run folder made by the training engine, so a rerun skips finished
cells and resumes a killed one. Results go to OUT/NAME/results.csv, PNG plots, and a section of OUT/report.md.
"""
from __future__ import annotations

from pathlib import Path

EXPERIMENTS = ("compare", "resolution", "erf")


def base_settings(data: str, data_root: str, epochs: int, quick: bool) -> dict:
    """The training settings every cell shares: the main job's recipe (`small`), on `data`."""
    from ..config import load_recipe
    from .runner import QUICK

    base = {k: v for k, v in load_recipe("small").items() if k != "model"}
    base.update(data=data, data_root=data_root, config="small")
    if epochs:
        base["epochs"] = epochs
    if quick:
        base.update(QUICK)
    return base


def run(name: str, out: str | Path, data: str = "fashion-mnist", data_root: str = "", seeds=(0, 1, 2),
        epochs: int = 0, quick: bool = False, budget: str = "1m", fractions=(0.05, 0.2, 1.0),
        command: str = "") -> list[dict]:
    """Run one experiment (see EXPERIMENTS) into `out`; `quick` is a minutes-long smoke version."""
    from . import compare, erf, resolution

    if name not in EXPERIMENTS:
        from ..errors import ConfigError
        raise ConfigError(f"unknown experiment {name!r} (one of {', '.join(EXPERIMENTS)})")
    out, seeds = Path(out), list(seeds)
    base = base_settings(data, data_root, epochs, quick)
    if quick:
        seeds, fractions = seeds[:1], [1.0]
    if name == "compare":
        return compare.run(out, base, seeds, list(fractions), budget, command=command)
    if name == "resolution":
        return resolution.run(out, base, seeds, budget, limit=64 if quick else 0, command=command)
    return erf.run(out, base, seeds, budget, images=8 if quick else 64, command=command)
