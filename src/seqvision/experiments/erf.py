"""`erf`: effective receptive fields by the authors' method, for trained and untrained models.

For each stage (Sequencer) or block (ViT, Mixer): the centre position of its output map, summed over
channels, is back-propagated to the input; the ReLU of the input gradient is summed over images and
colour channels. Maps are shown as log10(x + 1), min-max scaled across all maps of the figure. One number
per map: the share of the input area that holds half of the map's mass (small = concentrated).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .compare import cells as compare_cells
from .runner import provenance, run_cells, write_csv, write_section


def erf_map(model: torch.nn.Module, images: torch.Tensor, index: int) -> torch.Tensor:
    """(H, W) summed ReLU input gradient of the centre of intermediate `index` (see forward_intermediates)."""
    model.eval()
    x = images.clone().requires_grad_(True)
    feats = model.forward_intermediates(x, indices=[index], intermediates_only=True, output_fmt="NCHW")[0]
    h, w = feats.shape[-2:]
    feats[:, :, h // 2, w // 2].sum().backward()  # centre position, summed over channels (and images)
    return x.grad.relu().sum(dim=(0, 1))  # (B, C, H, W) -> (H, W)


def half_mass_area(m: torch.Tensor) -> float:
    """Share of the pixels that, taken largest first, hold 50% of the map's total."""
    v = m.flatten().sort(descending=True).values
    total = v.sum()
    if total <= 0:
        return 0.0
    return ((v.cumsum(0) < 0.5 * total).sum().item() + 1) / v.numel()


def intermediates(model) -> list[int]:
    """Every stage of a Sequencer or ResNet (and the ResNet's stem); the first, middle and last block of a
    ViT or Mixer."""
    if model.family in ("sequencer", "cnn"):
        return list(range(len(model.feature_info)))
    n = len(model.blocks)
    return sorted({0, n // 2, n - 1})


def run(out: Path, base: dict, seeds: list[int], budget: str = "1m", size: int = 28, images: int = 64,
        command: str = "", fraction: float = 1.0) -> list[dict]:
    """ERF maps of `compare`'s models trained on `fraction` of the training split (seed `seeds[0]`) and of the
    same models untrained."""
    from ..checkpoint import load_for_inference
    from ..data import Seeded, build_datasets, build_transform
    from ..registry import build_model

    todo = compare_cells(budget, size, seeds[:1], [fraction])
    folders = run_cells(todo, out, base)
    spec = build_datasets(base["data"], base.get("val_fraction", 0.1), seeds[0],
                          data_root=base.get("data_root") or None)
    images_of = spec.test if spec.test is not None else spec.val  # one seed, so one split for every cell
    rows, maps = [], []
    for cell, folder in zip(todo, folders):
        trained, _, data, meta = load_for_inference(folder)
        torch.manual_seed(cell.settings["seed"])
        fresh = build_model(cell.settings["model"], num_classes=trained.num_classes)
        ds = Seeded(images_of, build_transform(False, data["img_size"], trained.cfg.in_chans, tuple(data["mean"]),
                                               tuple(data["std"])), 0)
        x = torch.stack([ds[i][0] for i in range(min(images, len(ds)))])
        for state, model in (("untrained", fresh), ("trained", trained)):
            for i in intermediates(model):
                m = erf_map(model, x, i)
                maps.append((cell.settings["model"], state, i, m))
                rows.append({"model": cell.settings["model"], "state": state, "index": i,
                             "half_mass_area": round(half_mass_area(m), 4)})
    write_csv(rows, out / "erf" / "results.csv")
    plot = _grid(maps, out / "erf" / "erf_maps.png")
    lines = ["", *provenance(command, folders), "", __doc__.split("\n\n", 1)[1].strip(),
             f"Trained models: seed {seeds[0]}, {fraction:.0%} of the training split.", "",
             "| model | state | intermediate | share of area holding 50% of the mass |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['state']} | {r['index']} | {r['half_mass_area']:.3f} |" for r in rows]
    lines += ["", f"![ERF maps](erf/{plot.name})"]
    write_section(out, "erf", lines)
    return rows


def _grid(maps: list, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [torch.log10(m + 1) for *_, m in maps]
    lo, hi = min(l.min().item() for l in logs), max(l.max().item() for l in logs)  # noqa: E741
    rows = list(dict.fromkeys((model, state) for model, state, _, _ in maps))
    cols = max(sum(1 for mm in maps if (mm[0], mm[1]) == r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.2 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (model, state, i, m), lg in zip(maps, logs):
        r = rows.index((model, state))
        c = [mm[2] for mm in maps if (mm[0], mm[1]) == (model, state)].index(i)
        axes[r][c].imshow(lg.numpy(), cmap="viridis", vmin=lo, vmax=hi)
        axes[r][c].set_title(f"{model.split('_')[0]} {state}\n#{i}: 50% in {half_mass_area(m):.0%}", fontsize=7)
    fig.suptitle("Effective receptive fields (log10(x+1), one scale for all maps)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
