"""Plots (PNG) and a short markdown report for a run folder."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    a.legend()
    b.plot(epochs, [h["top1"] for h in history], "o-", label="top-1")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 2), max(4, 0.6 * n + 1.5)))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    if n <= 20:
        peak = max(max(r) for r in confusion) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=7,
                        color="white" if confusion[i][j] > peak / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run: Path, train_seconds: float | None = None) -> Path:
    """curves.png, confusion.png and report.md from the run folder's metrics files: validation figures
    (the split that chose the weights) beside the test split's, scored once on the chosen weights."""
    history = json.loads((run / "metrics.json").read_text())
    last = json.loads((run / "val_last.json").read_text())
    test = json.loads((run / "test.json").read_text()) if (run / "test.json").exists() else None
    meta = json.loads((run / "run.json").read_text())
    plot_curves(history, run / "curves.png")
    shown = test or last  # the confusion matrix and per-class table of the figure that is reported
    plot_confusion(shown["confusion"], shown["classes"], run / "confusion.png")
    cfg = meta["train"]
    seconds = sum(h["epoch_seconds"] for h in history)
    best = max(history, key=lambda h: h["top1"])
    chosen_on = "the test split (--select-on test: optimistic)" if cfg.get("select_on") == "test" else \
        f"the validation split ({cfg.get('val_fraction', 0.1):g} of the training data, seed {cfg['seed']})"
    lines = [f"# {cfg['model']} on {cfg['data']}", "",
             f"- epochs: {len(history)}, batch {cfg['batch_size']}, lr {cfg['lr']}, recipe `{cfg['config'] or 'default'}`"
             + (f", from `{cfg['pretrained']}`" if cfg.get("pretrained") else ""),
             f"- training time (epoch loops, evaluation excluded): {seconds / 60:.1f} min"
             + (f"; wall time of the whole command: {train_seconds / 60:.1f} min" if train_seconds else ""),
             f"- weights chosen on {chosen_on}: epoch {best['epoch']}", "",
             "| split | images | top-1 (%) | top-5 (%) | loss |", "|---|---|---|---|---|",
             f"| validation (epoch {best['epoch']}) | {last['count']} | {best['top1']:.2f} | {best['top5']:.2f} | "
             f"{best['val_loss']:.4f} |"]
    if test is not None:
        lines.append(f"| **test** (scored once) | {test['count']} | **{test['top1']:.2f}** | {test['top5']:.2f} | "
                     f"{test['loss']:.4f} |")
    else:
        lines.append("| test | - | no test split in this data | | |")
    lines += ["", f"Per class ({'test' if test else 'validation'}):", "", "| class | accuracy (%) |", "|---|---|"]
    lines += [f"| {c} | {a:.1f} |" for c, a in zip(shown["classes"], shown["per_class_acc"])]
    lines += ["", "| epoch | train loss | val loss | val top-1 | val top-5 | lr | seconds |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['top1']:.2f} | {h['top5']:.2f} | "
              f"{h['lr']:.2e} | {h['epoch_seconds']:.0f} |" for h in history]
    lines += ["", "![training curves](curves.png)", "", "![confusion matrix](confusion.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
    return run / "report.md"
