"""The paper's claims as commands: `seqvision experiment NAME`. Each experiment is a set of cells (model x
seed x setting), each cell an ordinary run folder made by the training engine, so a rerun skips finished
cells and resumes a killed one. Results go to OUT/NAME/results.csv, PNG plots, and a section of OUT/report.md.
"""
from __future__ import annotations

from pathlib import Path

EXPERIMENTS = ("compare", "resolution", "erf", "ablation", "transfer", "robustness")


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
        epochs: int = 0, quick: bool = False, budget: str = "1m", fractions=None,
        command: str = "", source: str = "", source_classes: str = "", target: str = "", target_classes: str = "",
        images: int = 2000) -> list[dict]:
    """Run one experiment (see EXPERIMENTS) into `out`; `quick` is a minutes-long smoke version.

    `source`/`target` (transfer) default to `data` split by class: the first half of its classes, then the rest.
    `images` (robustness) is how many test images are corrupted. `fractions` are shares of the training split:
    compare runs each (default 5%, 20% and 100%); the others take one (default 100%), and use compare's cells of
    that share (transfer: as its source runs).
    """
    from . import ablation, compare, erf, resolution, robustness, transfer

    if name not in EXPERIMENTS:
        from ..errors import ConfigError
        raise ConfigError(f"unknown experiment {name!r} (one of {', '.join(EXPERIMENTS)})")
    out, seeds = Path(out), list(seeds)
    base = base_settings(data, data_root, epochs, quick)
    if name != "compare" and fractions and len(fractions) != 1:
        from ..errors import ConfigError
        raise ConfigError(f"{name}: --fractions takes one share of the training split, got {len(fractions)}: "
                          f"{' '.join(map(str, fractions))}")
    if quick:
        seeds, fractions = seeds[:1], [1.0]
    share = fractions[0] if fractions and name != "compare" else 1.0
    if name == "compare":
        return compare.run(out, base, seeds, list(fractions or (0.05, 0.2, 1.0)), budget, command=command)
    if name == "resolution":
        return resolution.run(out, base, seeds, budget, limit=64 if quick else 0, command=command, fraction=share)
    if name == "ablation":
        return ablation.run(out, base, seeds, "sequencer2d_1m_28", command=command,  # its ablations are presets
                            speed_batch=8 if quick else 64, fraction=share)
    if name == "transfer":
        src, tgt = class_halves(source or data, source_classes, target or data, target_classes, data_root)
        return transfer.run(out, base, seeds, src, tgt, budget, budgets=(0.8, 1.0) if quick else transfer.BUDGETS,
                            command=command, fraction=share)
    if name == "robustness":
        return robustness.run(out, base, seeds, budget, images=64 if quick else images, command=command,
                              fraction=share)
    return erf.run(out, base, seeds, budget, images=8 if quick else 64, command=command, fraction=share)


def class_halves(source: str, source_classes: str, target: str, target_classes: str, data_root: str
                 ) -> tuple[dict, dict]:
    """Source and target settings; one dataset for both is split by class (first half, then the rest)."""
    if source == target and not (source_classes or target_classes):
        from ..data import build_datasets
        n = len(build_datasets(source, data_root=data_root or None).classes)
        if n < 4:
            from ..errors import ConfigError
            raise ConfigError(f"transfer: {source} has {n} classes, too few to split into a source and a target "
                              f"of two or more each; pass --source-classes and --target-classes")
        source_classes = ",".join(map(str, range(n // 2)))
        target_classes = ",".join(map(str, range(n // 2, n)))
    return ({"data": source, "classes": source_classes}, {"data": target, "classes": target_classes})
