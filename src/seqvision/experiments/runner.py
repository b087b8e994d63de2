"""What every experiment shares: cells (model x seed x setting) run as ordinary run folders by the training
engine, skipped when finished and resumed when killed; results.csv; a section of report.md."""
from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig

QUICK = dict(epochs=1, max_steps=2, batch_size=16, workers=0, warmup_epochs=0.5)  # minutes-long smoke runs
# A finished cell's figures without its weights (a few kB): what docs/results/full/cells keeps of each cell,
# enough for the experiments that only tabulate (compare, ablation) to reuse it instead of retraining.
RECORDS = ("run.json", "metrics.json", "test.json", "done.json")


@dataclass(frozen=True)
class Cell:
    """One training run of an experiment.

    Args:
        id: its folder name under OUT/cells/.
        settings: the columns it contributes to results.csv (model, seed, fraction, ...).
        train: TrainConfig fields of this run (model, seed, ...), over the experiment's base settings.
    """
    id: str
    settings: dict
    train: dict = field(default_factory=dict)


def run_cell(cell: Cell, out: Path, base: dict, weights: bool = True) -> Path:
    """Train the cell (or resume it, or nothing when it finished) and return its run folder; `weights`: the
    experiment reads the cell's trained weights, not only its records."""
    from ..train import train

    folder = out / "cells" / cell.id
    if (folder / "done.json").exists():
        if weights and not (folder / "best.safetensors").exists():
            from ..errors import ConfigError
            raise ConfigError(f"{folder}: a finished cell's records without its weights (best.safetensors); "
                              f"this experiment needs the weights: delete the folder to train the cell again")
        return folder
    t0 = time.perf_counter()
    result = train(TrainConfig(**{**base, **cell.train, "output": str(folder), "resume": True}))
    (folder / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, **result}))
    return folder


def run_cells(cells: list[Cell], out: Path, base: dict, weights: bool = True) -> list[Path]:
    """Every cell in turn, with one progress bar across them (see run_cell for `weights`)."""
    from tqdm import tqdm

    folders = []
    for cell in tqdm(cells, desc="cells", unit="cell", dynamic_ncols=True):
        folders.append(run_cell(cell, out, base, weights))
    return folders


def export_records(out: Path, dest: Path) -> list[str]:
    """Copy the RECORDS of every finished cell under OUT/cells into DEST/<cell id>/ (no weights, no
    checkpoints) and return the cell ids; copied back into an OUT/cells, they spare compare and ablation the
    retraining."""
    import shutil

    ids = sorted(f.name for f in (out / "cells").glob("*") if (f / "done.json").exists())
    for cell in ids:
        (dest / cell).mkdir(parents=True, exist_ok=True)
        for record in (out / "cells" / cell / name for name in RECORDS):
            if record.exists():  # test.json is absent when a run scored no test split
                shutil.copyfile(record, dest / cell / record.name)
    return ids


def cell_metrics(folder: Path) -> dict:
    """The figures of a finished run folder: chosen epoch's val top-1, test top-1, speed and time."""
    history = json.loads((folder / "metrics.json").read_text())
    best = max(history, key=lambda h: h["top1"])
    test = json.loads((folder / "test.json").read_text()) if (folder / "test.json").exists() else {}
    seconds = sum(h["epoch_seconds"] for h in history)
    run = json.loads((folder / "run.json").read_text())
    images = history[-1]["step"] * run["train"]["batch_size"]
    return {"val_top1": round(best["top1"], 2), "test_top1": round(test["top1"], 2) if test else "",
            "epochs": len(history), "train_img_per_s": round(images / max(seconds, 1e-9), 1),
            "train_minutes": round(seconds / 60, 2)}


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def mean_sd(values: list[float]) -> str:
    """'mean ± sd' over seeds ('mean' alone for one value)."""
    values = [v for v in values if v != ""]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def provenance(command: str, folders: list[Path]) -> list[str]:
    """The lines that say how a result was made: the command, the machine, and the cells' training time."""
    import platform

    import torch

    from ..benchmark import machine

    where = machine()
    minutes = sum(cell_metrics(f)["train_minutes"] for f in folders)
    return [f"Command: `{command}`", "",
            f"Machine: {where['cpu']} ({where['cpu_isa']}), {torch.get_num_threads()} threads, "
            f"{platform.system()}; training time of the {len(folders)} cell(s): {minutes:.1f} min "
            f"(cells trained by an earlier command are reused, not retrained)."]


def write_section(out: Path, name: str, lines: list[str]) -> Path:
    """Replace (or add) the `## name` section of OUT/report.md, leaving other experiments' sections."""
    path = out / "report.md"
    sections = {}
    if path.exists():
        current = None
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                current = line[3:].strip()
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
    sections[name] = lines
    text = ["# Experiments", ""] + [x for k, v in sections.items() for x in (f"## {k}", *v)]
    path.write_text("\n".join(text).rstrip() + "\n")
    return path
