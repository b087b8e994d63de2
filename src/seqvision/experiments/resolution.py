"""`resolution`: models trained at one size, scored without fine-tuning at other test resolutions."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .compare import cells as compare_cells
from .compare import models
from .runner import mean_sd, provenance, run_cells, write_csv, write_section

SIZES = (14, 21, 28, 35, 42, 56)


def effective_size(size: int, stride: int) -> int:
    """The side a model of this patch stride can take: the largest multiple of the stride <= size."""
    return max(stride, size - size % stride)


def score_at(folder: Path, sizes, limit: int = 0) -> list[dict]:
    """Top-1 of a run's chosen weights on its test split (else its validation split) resized to each size;
    the model and the split are loaded once for all sizes."""
    from ..checkpoint import load_for_inference
    from ..data import Seeded, build_datasets, build_transform
    from ..engine import evaluate

    model, classes, data, meta = load_for_inference(folder)
    split = json.loads(meta["split"])
    spec = build_datasets(split["data"], split["val_fraction"], split["seed"], classes=split.get("classes", ""))
    ds = spec.test if spec.test is not None else spec.val
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    rows = []
    for size in sizes:
        eff = effective_size(size, model.stride)
        if getattr(model, "fixed_input_size", False) and eff != model.cfg.img_size[0]:
            rows.append({"test_size": size, "effective": eff, "top1": "",
                         "note": "fixed token count: runs at its training size only"})
            continue
        tf = build_transform(False, eff, model.cfg.in_chans, tuple(data["mean"]), tuple(data["std"]))
        loader = torch.utils.data.DataLoader(Seeded(ds, tf, 0), batch_size=256)
        top1 = evaluate(model, loader, torch.device("cpu"), len(classes))["top1"]
        rows.append({"test_size": size, "effective": eff, "top1": round(top1, 2), "note": ""})
    return rows


def run(out: Path, base: dict, seeds: list[int], budget: str = "1m", size: int = 28, sizes=SIZES, limit: int = 0,
        command: str = "", fraction: float = 1.0) -> list[dict]:
    """Train (or reuse `compare`'s runs on `fraction` of the training split), score each at every size, write
    the table, plot and report."""
    todo = compare_cells(budget, size, seeds, [fraction])  # the same cells as compare's: trained once for both
    folders = run_cells(todo, out, base)
    rows = [{**cell.settings, **r} for cell, folder in zip(todo, folders) for r in score_at(folder, sizes, limit)]
    write_csv(rows, out / "resolution" / "results.csv")
    plot = _plot(rows, out / "resolution" / "accuracy_vs_resolution.png")
    lines = ["", *provenance(command, folders), "", "Test top-1 (%) of models trained at "
             f"{size} px on {fraction:.0%} of the training split, evaluated without fine-tuning; a side that is "
             "not a multiple of the model's patch stride is scored at the largest multiple below it (the "
             "`effective` column of results.csv).", "",
             "| model | " + " | ".join(f"{s} px" for s in sizes) + f" | drop at 2x ({size} -> {2 * size} px) |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for m in models(budget, size):
        per = {s: [r["top1"] for r in rows if r["model"] == m and r["test_size"] == s and r["top1"] != ""]
               for s in sizes}
        drop = "-"
        if per.get(size) and per.get(2 * size):
            drops = [a - b for a, b in zip(per[size], per[2 * size])]
            drop = mean_sd(drops) + " points"
        lines.append(f"| {m} | " + " | ".join(mean_sd(per[s]) if per[s] else "n/a" for s in sizes) + f" | {drop} |")
    notes = sorted({f"{r['model']}: {r['note']}" for r in rows if r["note"]})
    lines += [""] + [f"- {n}" for n in notes] + ["", f"![accuracy against resolution](resolution/{plot.name})"]
    write_section(out, "resolution", lines)
    return rows


def _plot(rows: list[dict], path: Path) -> Path:
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = {}
        for r in rows:
            if r["model"] == model and r["top1"] != "":
                pts.setdefault(r["test_size"], []).append(r["top1"])
        xs = sorted(pts)
        ax.plot(xs, [statistics.mean(pts[x]) for x in xs], "o-", label=model)
    ax.set(xlabel="test resolution (px)", ylabel="test top-1 (%)", title="Accuracy against test resolution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
