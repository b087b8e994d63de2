"""`ablation`: the paper's ablations of one small Sequencer2D (cell, direction, union, one axis, fc, 1-D),
same recipe and epochs, over seeds; each variant's effect on test top-1 next to the paper's sign."""
from __future__ import annotations

from pathlib import Path

from .runner import Cell, cell_metrics, mean_sd, provenance, run_cells, write_csv, write_section

# (variant, what it changes, its model given the base preset's name); the paper found each worse than the base
VARIANTS = (
    ("base", "LSTM, bidirectional, cat, both axes, fc, 2-D", "{}"),
    ("gru", "cell: GRU instead of LSTM", "gru_{}"),
    ("rnn", "cell: tanh-RNN instead of LSTM", "rnn_{}"),
    ("unidirectional", "one direction per axis", "{}_unidirectional"),
    ("add", "union: add instead of cat", "{}_add"),
    ("vertical", "vertical axis only (hidden x2, no fc)", "{}_vertical"),
    ("horizontal", "horizontal axis only (hidden x2, no fc)", "{}_horizontal"),
    ("without_fc", "no channel-fusion fc", "{}_without_fc"),
    ("1d", "1-D vanilla Sequencer (one BiLSTM over row-major tokens)", "v_{}"),
)


def variant_model(pattern: str, base: str) -> str:
    return pattern.format(base) if not pattern.startswith("v_") else "v_" + base.replace("sequencer2d", "sequencer")


def cells(base: str, seeds: list[int], fraction: float = 1.0) -> list[Cell]:
    """Cell ids as `compare`'s cells of the same training share, so the base model's runs are shared with it."""
    return [Cell(f"{m}-f{fraction:g}-s{s}", {"variant": v, "model": m, "seed": s, "fraction": fraction},
                 {"model": m, "seed": s, "train_fraction": fraction})
            for v, _, p in VARIANTS for m in [variant_model(p, base)] for s in seeds]


def run(out: Path, base_settings: dict, seeds: list[int], base: str = "sequencer2d_1m_28", command: str = "",
        speed_batch: int = 64, fraction: float = 1.0) -> list[dict]:
    """Train every variant over `seeds`, write results.csv, a plot and the report section; returns the rows."""
    from .. import create_model
    from ..flops import count_params

    todo = cells(base, seeds, fraction)
    folders = run_cells(todo, out, base_settings, weights=False)
    speed = {}
    rows = []
    for cell, folder in zip(todo, folders):
        m = cell.settings["model"]
        if m not in speed:
            speed[m] = inference_speed(create_model(m).eval(), speed_batch)
        rows.append({**cell.settings, "params": count_params(create_model(m)), "infer_img_per_s": speed[m],
                     **cell_metrics(folder)})
    write_csv(rows, out / "ablation" / "results.csv")
    table, effects = summary(rows, seeds)
    plot = _plot(effects, out / "ablation" / "effects.png")
    lines = ["", *provenance(command, folders), "",
             f"Variants of `{base}` trained on {fraction:.0%} of the training split; effect = variant's mean test "
             "top-1 minus the base's (percentage points). "
             "The paper found every variant worse than the base design (effect < 0). Agrees: the sign matches the "
             "paper's and the effect is larger than the sd of the difference (sqrt(sd_base² + sd_variant²)); "
             "within noise: it is not.", "",
             "| variant | change | params | inference img/s | test top-1 (%) | effect | paper | agrees |",
             "|---|---|---|---|---|---|---|---|", *table, "",
             f"{len(seeds)} seed(s) per variant; mean ± sd over seeds. Weights chosen on the validation split, "
             f"test scored once per run. Inference img/s: batch {speed_batch}, fp32, this machine.", "",
             f"![effects](ablation/{plot.name})"]
    write_section(out, "ablation", lines)
    return rows


def summary(rows: list[dict], seeds: list[int]) -> tuple[list[str], list[tuple[str, float, float]]]:
    """Table lines, and (variant, effect, sd of the variant) for the plot."""
    import statistics

    def tops(v):
        return [r["test_top1"] for r in rows if r["variant"] == v and r["test_top1"] != ""]

    def sd(t):
        return statistics.stdev(t) if len(t) > 1 else 0.0
    base_t = tops("base")
    base = statistics.mean(base_t) if base_t else float("nan")
    lines, effects = [], []
    for v, change, _ in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        t = tops(v)
        effect = statistics.mean(t) - base if t else float("nan")
        noise = (sd(t) ** 2 + sd(base_t) ** 2) ** 0.5  # sd of the difference; 0 with one seed
        paper, ours = ("", "") if v == "base" else ("-", "+" if effect > 0 else "-")
        agree = "" if v == "base" else "within noise" if abs(effect) <= noise else "yes" if ours == paper else "no"
        lines.append(f"| {v} | {change} | {rs[0]['params']:,} | {rs[0]['infer_img_per_s']:.0f} | {mean_sd(t)} | "
                     f"{'' if v == 'base' else f'{effect:+.2f}'} | {paper} | {agree} |")
        if v != "base":
            effects.append((v, effect, sd(t)))
    return lines, effects


def inference_speed(model, batch: int, rounds: int = 5) -> float:
    """Median images per second of fp32 inference at `batch` on this machine."""
    import statistics
    import time

    import torch

    x = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return round(batch / statistics.median(times), 1)


def _plot(effects: list[tuple[str, float, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [e[0] for e in effects]
    ax.barh(names, [e[1] for e in effects], xerr=[e[2] for e in effects], color=["#c44" if e[1] < 0 else "#4a4"
                                                                              for e in effects])
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="test top-1 change vs the base design (points; bars: sd of the variant)",
           title="Ablations: effect of each change")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
