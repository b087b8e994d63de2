"""`compare`: Sequencer2D, ViT, MLP-Mixer and a ResNet at matched parameter budgets, same recipe and epochs,
over seeds and shares of the training data; validation and test top-1 as mean ± sd."""
from __future__ import annotations

from pathlib import Path

from .runner import Cell, cell_metrics, mean_sd, provenance, run_cells, write_csv, write_section

FAMILIES = ("sequencer2d", "vit", "mixer", "resnet")  # resnet: the CNN baseline (timm's ResNet, narrowed)


def models(budget: str, size: int) -> list[str]:
    return [f"{family}_{budget}_{size}" for family in FAMILIES]


def cells(budget: str, size: int, seeds: list[int], fractions: list[float]) -> list[Cell]:
    return [Cell(f"{m}-f{f:g}-s{s}", {"model": m, "fraction": f, "seed": s},
                 {"model": m, "seed": s, "train_fraction": f})
            for f in fractions for m in models(budget, size) for s in seeds]


def run(out: Path, base: dict, seeds: list[int], fractions: list[float], budget: str = "1m", size: int = 28,
        command: str = "") -> list[dict]:
    """Train every cell, write results.csv, the plots and the report section; returns the rows."""
    from .. import create_model
    from ..flops import count_macs, count_params

    todo = cells(budget, size, seeds, fractions)
    folders = run_cells(todo, out, base, weights=False)
    rows = []
    for cell, folder in zip(todo, folders):
        model = create_model(cell.settings["model"])
        shape = (model.cfg.in_chans, *model.cfg.img_size)
        rows.append({**cell.settings, "params": count_params(model), "gmacs": round(count_macs(model, shape) / 1e9, 3),
                     **cell_metrics(folder)})
    write_csv(rows, out / "compare" / "results.csv")
    plots = _plots(rows, out / "compare")
    lines = ["", *provenance(command, folders), "",
             "| model | train share | params | GMACs | val top-1 (%) | test top-1 (%) | train img/s | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for f in fractions:
        for m in models(budget, size):
            rs = [r for r in rows if r["model"] == m and r["fraction"] == f]
            stats = " | ".join(mean_sd([r[k] for r in rs]) for k in ("val_top1", "test_top1", "train_img_per_s",
                                                                      "train_minutes"))
            lines.append(f"| {m} | {f:g} | {rs[0]['params']:,} | {rs[0]['gmacs']} | {stats} |")
    lines += ["", f"{len(seeds)} seed(s) per cell; mean ± sd over seeds. Weights chosen on the validation split, "
                  "test scored once per run.", ""] + [f"![{p.stem}](compare/{p.name})" for p in plots]
    write_section(out, "compare", lines)
    return rows


def _plots(rows: list[dict], folder: Path) -> list[Path]:
    """Test top-1 against parameters and against training time, one point per model and share (seed mean)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x, label, name in (("params", "parameters", "accuracy_vs_params"),
                           ("train_minutes", "training time (minutes)", "accuracy_vs_time")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = []
            for f in sorted({r["fraction"] for r in rows}):
                rs = [r for r in rows if r["model"] == model and r["fraction"] == f and r["test_top1"] != ""]
                if rs:
                    pts.append((statistics.mean(r[x] for r in rs), statistics.mean(r["test_top1"] for r in rs), f))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=model)
            for px, py, f in pts:
                ax.annotate(f"{f:g}", (px, py), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel=label, ylabel="test top-1 (%)",
               title=f"Test accuracy against {label}\n(point labels: share of the training split)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
