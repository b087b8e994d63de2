"""`transfer`: pretrain on a source dataset, fine-tune on a target with 1%, 10% and 100% of its training labels,
against training on the target from scratch with the same recipe and budget; Sequencer and ViT.

Source and target are any datasets `train` takes, each optionally restricted to some of its classes, so one
dataset split by class (pretrain on Fashion-MNIST's first five classes, transfer to the other five) is a
source and a target that share no label. A source that is the experiment's whole `--data` trained on a share
of it is `compare`'s cell of that share, shared with it.

A label budget too small for the recipe's batch would make no step, and with the recipe's epochs a few
dozen: a target cell's batch is halved (down to 8) until an epoch holds at least four steps, and its epochs
are raised until it makes as many optimizer steps as the run on the whole target, for the fine-tuned and the
scratch cell alike. The table says which batch and epochs each budget ran with.
"""
from __future__ import annotations

from pathlib import Path

from .runner import Cell, mean_sd, provenance, run_cells, write_csv, write_section, cell_metrics

MODELS = ("sequencer2d", "vit")
BUDGETS = (0.01, 0.1, 1.0)


def source_cells(budget: str, size: int, seeds: list[int], source: dict, fraction: float = 1.0,
                 shared: bool = False) -> list[Cell]:
    """One pretraining run per model and seed on `fraction` of the source's training split; `shared`: the
    source is the experiments' whole dataset, so the cells are `compare`'s."""
    from .compare import cells as compare_cells

    if shared:
        models = {f"{f}_{budget}_{size}" for f in MODELS}
        return [c for c in compare_cells(budget, size, seeds, [fraction]) if c.settings["model"] in models]
    return [Cell(f"source-{f}_{budget}_{size}-f{fraction:g}-s{s}",
                 {"model": f"{f}_{budget}_{size}", "seed": s, "fraction": fraction},
                 {"model": f"{f}_{budget}_{size}", "seed": s, "train_fraction": fraction, **source})
            for f in MODELS for s in seeds]


def target_batch(images: int, batch: int) -> int:
    """The recipe's batch, halved (not below 8) until `images` make at least four full batches."""
    while batch > 8 and images // batch < 4:
        batch //= 2
    return batch


def target_tag(source: dict, fraction: float, target: dict) -> str:
    """What target cell ids carry so that another source or target in the same OUT never reuses them: the
    target's name and a hash of both settings."""
    import hashlib
    import json
    import re

    digest = hashlib.sha1(json.dumps([source, fraction, target], sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(target["data"]).name).strip("-") + "-" + digest


def target_schedule(images: int, batch: int, epochs: int, budgets) -> dict[float, tuple[int, int]]:
    """(batch, epochs) per label budget of a target with `images` training images: `target_batch`, and the
    epochs that give at least the optimizer steps of the whole target at the recipe's batch and epochs."""
    steps = epochs * (images // batch)
    plan = {}
    for b in budgets:
        n = round(images * b)
        bb = target_batch(n, batch)
        plan[b] = (bb, max(epochs, -(-steps // max(1, n // bb))))
    return plan


def target_cells(sources: list[Cell], out: Path, target: dict, plan: dict, epochs: int, tag: str) -> list[Cell]:
    """A scratch and a fine-tuned cell per source run and label budget; ids name the epochs where the plan
    raised them."""
    cells = []
    for src in sources:
        m, s = src.settings["model"], src.settings["seed"]
        for b, (batch, ep) in plan.items():
            for start in ("scratch", "finetune"):
                extra = {"pretrained": str(out / "cells" / src.id)} if start == "finetune" else {}
                cells.append(Cell(f"target-{tag}-{start}-{m}-l{b:g}{f'-e{ep}' if ep != epochs else ''}-s{s}",
                                  {"model": m, "seed": s, "labels": b, "start": start, "batch": batch},
                                  {"model": m, "seed": s, "train_fraction": b, "batch_size": batch, "epochs": ep,
                                   **target, **extra}))
    return cells


def run(out: Path, base: dict, seeds: list[int], source: dict, target: dict, budget: str = "1m", size: int = 28,
        budgets=BUDGETS, command: str = "", fraction: float = 1.0) -> list[dict]:
    """Pretrain on `source`, then fine-tune and train from scratch on `target` at each label budget.

    Args:
        out: the experiments folder.
        base: training settings shared by every cell.
        seeds: one source run and one target run per seed and setting.
        source, target: TrainConfig fields naming each dataset: {"data": ..., "classes": ...}.
        budget, size: the models' parameter budget and input size.
        budgets: shares of the target's training split.
        fraction: share of the source's training split the source runs train on.
    """
    from ..config import TrainConfig
    from ..data import build_datasets

    shared = source["data"] == base["data"] and not source.get("classes")
    sources = source_cells(budget, size, seeds, source, fraction, shared)
    run_cells(sources, out, base)
    images = len(build_datasets(target["data"], base.get("val_fraction", 0.1), 0, data_root=base.get("data_root")
                                or None, classes=target.get("classes", "")).train)
    epochs = base.get("epochs", TrainConfig.epochs)
    plan = target_schedule(images, base.get("batch_size", TrainConfig.batch_size), epochs, budgets)
    todo = target_cells(sources, out, target, plan, epochs, target_tag(source, fraction, target))
    folders = run_cells(todo, out, base)
    rows = [{**c.settings, **cell_metrics(f)} for c, f in zip(todo, folders)]
    write_csv(rows, out / "transfer" / "results.csv")
    plot = _plot(rows, out / "transfer" / "accuracy_vs_labels.png")
    describe = lambda d: d["data"] + (f" (classes {d['classes']})" if d.get("classes") else "")  # noqa: E731
    lines = ["", *provenance(command, [out / "cells" / c.id for c in sources] + folders), "",
             f"Source: {describe(source)}, {fraction:.0%} of its training split. Target: {describe(target)}, "
             f"{images:,} training images. Fine-tuned cells start from the source run's selected weights with a "
             "new head; scratch cells from the reference init; same recipe, batch and epochs for both.", "",
             "| model | target labels | batch x epochs | scratch test top-1 (%) | fine-tuned test top-1 (%) | gain |",
             "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        for b in budgets:
            def top(start):
                return [r["test_top1"] for r in rows if r["model"] == m and r["labels"] == b and r["start"] == start
                        and r["test_top1"] != ""]
            gain = _mean(top("finetune")) - _mean(top("scratch"))
            lines.append(f"| {m} | {b:g} | {plan[b][0]} x {plan[b][1]} | {mean_sd(top('scratch'))} | "
                         f"{mean_sd(top('finetune'))} | "
                         f"{gain:+.2f} |")
    lines += ["", f"{len(seeds)} seed(s); mean ± sd over seeds. Test split scored once per run.", "",
              f"![transfer](transfer/{plot.name})"]
    write_section(out, "transfer", lines)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["model"] for r in rows):
        for start, style in (("scratch", "--"), ("finetune", "-")):
            pts = sorted({r["labels"] for r in rows if r["model"] == m})
            ys = [_mean([r["test_top1"] for r in rows if r["model"] == m and r["labels"] == b and r["start"] == start
                         and r["test_top1"] != ""]) for b in pts]
            ax.plot([100 * b for b in pts], ys, style, marker="o", label=f"{m}, {start}")
    ax.set(xscale="log", xlabel="target training labels used (%)", ylabel="target test top-1 (%)",
           title="Transfer: fine-tuned vs trained from scratch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
