"""`robustness`: ImageNet-C-style corruptions of the test split (the `imagecorruptions` package, severities
1 to 5), each model's corruption error, and mCE normalised by a named baseline model.

The package's corruptions need at least 32x32 pixels: a smaller image is padded with its border's mean value
to 32x32, corrupted as RGB, cropped back and averaged to grey where the data is grey. Two of its functions fail
on today's libraries and are wrapped, nothing else: `gaussian` is called with scikit-image's `channel_axis`
instead of the removed `multichannel` (glass_blur), and `fog`'s `np.float_` (removed in numpy 2) reads as
`np.float64`. The corrupted set is generated once with a seed and cached under OUT/robustness/cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .compare import cells as compare_cells
from .runner import mean_sd, provenance, run_cells, write_csv, write_section

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")  # ImageNet-C's fifteen
NOT_APPLICABLE = {}  # corruption -> why it cannot apply to this data; all fifteen apply to grey 28 px images
FAMILIES = ("sequencer2d", "vit", "mixer")
BASELINE = "resnet"  # the mCE denominator, in AlexNet's place: the CNN of the same budget


def corruptions():
    """The package's `corrupt`, after the two compatibility wraps described in the module docstring."""
    import importlib.util
    import os
    import sys
    import types
    import warnings

    if "pkg_resources" not in sys.modules:  # the package locates its frost images through pkg_resources
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda pkg, name: os.path.join(
                os.path.dirname(importlib.util.find_spec(pkg.split(".")[0]).origin), name)
            sys.modules["pkg_resources"] = shim
    from ..errors import require

    module = require("imagecorruptions.corruptions", "experiments")
    import skimage.filters

    class NumpyCompat(types.ModuleType):
        def __getattr__(self, name):
            return np.float64 if name == "float_" else getattr(np, name)

    def gaussian(image, sigma=1, multichannel=None, **kw):
        return skimage.filters.gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kw)
    module.np, module.gaussian = NumpyCompat("numpy"), gaussian
    warnings.filterwarnings("ignore", module="imagecorruptions")
    return require("imagecorruptions", "experiments").corrupt


def corrupt_image(corrupt, img: np.ndarray, name: str, severity: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> the same shape, corrupted (padded to 32x32 first where smaller)."""
    grey = img.ndim == 2
    rgb = np.repeat(img[..., None], 3, -1) if grey else img
    h, w = rgb.shape[:2]
    ph, pw = max(0, 32 - h), max(0, 32 - w)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).mean(0)
    padded = np.empty((h + ph, w + pw, 3), np.uint8)
    padded[:] = border.round().astype(np.uint8)
    padded[ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = rgb
    out = np.asarray(corrupt(padded, corruption_name=name, severity=severity))
    out = np.clip(out, 0, 255).astype(np.uint8)[ph // 2: ph // 2 + h, pw // 2: pw // 2 + w]
    return out.mean(-1).round().astype(np.uint8) if grey else out


def test_images(folder: Path, limit: int, seeds: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `limit` images of a run's test split (else, for one seed, its validation split) as uint8
    arrays, with labels."""
    from ..checkpoint import load_for_inference
    from ..data import build_datasets
    from ..errors import ConfigError

    _, classes, _, meta = load_for_inference(folder)
    split = json.loads(meta["split"])
    spec = build_datasets(split["data"], split["val_fraction"], split["seed"], classes=split.get("classes", ""))
    if spec.test is None and seeds > 1:  # each seed holds out other images: one set would score training images
        raise ConfigError(f"robustness: {split['data']} has no test split for the {seeds} seeds to share; give "
                          f"it train/ and test/ folders, or run one seed")
    ds = spec.test if spec.test is not None else spec.val
    images, labels = [], []
    for i in range(min(limit, len(ds)) if limit else len(ds)):
        img, y = ds[i]
        # (C, H, W) uint8 tensor -> (H, W[, C]); a PIL image as it is
        a = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        images.append(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
        labels.append(y)
    if len({a.shape for a in images}) > 1:
        from ..data import DataError
        raise DataError(f"{split['data']}: robustness needs test images of one size, found "
                        f"{sorted({a.shape for a in images})[:4]}")
    return np.stack(images), np.asarray(labels), classes


def corrupted_set(cache: Path, images: np.ndarray, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """Every (corruption, severity) of `images`, generated once (seeded per image) and cached as .npy files."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    corrupt, out = None, {}
    todo = [(c, s) for c in CORRUPTIONS if c not in NOT_APPLICABLE for s in range(1, 6)]
    for c, s in tqdm(todo, desc="corrupting", unit="set", dynamic_ncols=True):
        path = cache / f"{c}-{s}.npy"
        # image i's corruption depends on (seed, corruption, severity, i) only, so a longer cached set holds
        # this one as its first rows
        cached = np.load(path) if path.exists() else None
        if cached is None or len(cached) < len(images):
            corrupt = corrupt or corruptions()
            sets = []
            for i, img in enumerate(images):
                np.random.seed((seed * 1_000_003 + CORRUPTIONS.index(c) * 10_007 + s * 101 + i) % 2**32)
                sets.append(corrupt_image(corrupt, img, c, s))
            cached = np.stack(sets)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, cached)
            tmp.replace(path)
        out[(c, s)] = cached[:len(images)]
    return out


def error_rates(folder: Path, clean: np.ndarray, labels: np.ndarray, sets: dict) -> dict:
    """Top-1 error (%) of a run's chosen weights on the clean images and on every corrupted set."""
    from ..checkpoint import eval_transform, load_for_inference

    model, _, data, _ = load_for_inference(folder)
    tf, _ = eval_transform(model, data)

    def error(images: np.ndarray) -> float:
        wrong = 0
        with torch.no_grad():
            for k in range(0, len(images), 256):
                # (N, H, W[, C]) -> (N, C, H, W): the eval transform takes uint8 (C, H, W)
                batch = torch.from_numpy(images[k:k + 256])
                batch = batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
                x = torch.stack([tf(img) for img in batch])
                wrong += (model(x).argmax(-1) != torch.from_numpy(labels[k:k + 256])).sum().item()
        return 100.0 * wrong / len(images)
    return {"clean": error(clean), **{key: error(imgs) for key, imgs in sets.items()}}


def run(out: Path, base: dict, seeds: list[int], budget: str = "1m", size: int = 28, images: int = 2000,
        command: str = "", fraction: float = 1.0) -> list[dict]:
    """Corruption error per model, corruption and severity; CE and mCE against the baseline; a heat map.
    The models are `compare`'s cells trained on `fraction` of the training split, shared with it."""
    models = [f"{f}_{budget}_{size}" for f in FAMILIES]
    baseline = f"{BASELINE}_{budget}_{size}"
    todo = [c for c in compare_cells(budget, size, seeds, [fraction]) if c.settings["model"] in models + [baseline]]
    folders = run_cells(todo, out, base)
    clean, labels, _ = test_images(folders[0], images, len(seeds))
    sets = corrupted_set(out / "robustness" / "cache", clean, seed=0)
    rows = []
    for cell, folder in zip(todo, folders):
        err = error_rates(folder, clean, labels, sets)
        rows.append({**cell.settings, "corruption": "clean", "severity": 0, "error": round(err["clean"], 2)})
        rows += [{**cell.settings, "corruption": c, "severity": s, "error": round(err[(c, s)], 2)} for c, s in sets]
    write_csv(rows, out / "robustness" / "results.csv")
    ce = corruption_errors(rows, baseline)
    plot = _heatmap(ce, out / "robustness" / "ce_heatmap.png", baseline)
    lines = ["", *provenance(command, folders), "",
             f"Models trained on {fraction:.0%} of the training split. "
             f"The first {len(clean)} test images under ImageNet-C's fifteen corruptions at severities 1-5 "
             f"(`imagecorruptions`; see the experiment's docstring for the 32-pixel padding and the two wrapped "
             f"functions). CE = a model's error summed over severities / {baseline}'s (the baseline in AlexNet's "
             "place; its errors averaged over seeds, so every seed of every model is divided by the same "
             "numbers); mCE = mean CE over corruptions x 100. Mean ± sd over seeds; the heat map shows seed means.",
             "", "| model | clean error (%) | mean corrupted error (%) | mCE (baseline = 100) |", "|---|---|---|---|"]
    per_seed = [corruption_errors(rows, baseline, seed=s) for s in seeds]
    for m in [*models, baseline]:
        lines.append("| " + " | ".join([m] + [mean_sd([e[m][k] for e in per_seed]) for k in ("clean", "mean_error",
                                                                                           "mCE")]) + " |")
    if NOT_APPLICABLE:
        lines += ["", "Not applied: " + "; ".join(f"{k} ({v})" for k, v in NOT_APPLICABLE.items())]
    lines += ["", f"![corruption errors](robustness/{plot.name})"]
    write_section(out, "robustness", lines)
    return rows


def corruption_errors(rows: list[dict], baseline: str, seed: int | None = None) -> dict[str, dict]:
    """Per model: clean error, mean corrupted error, CE per corruption (vs the baseline's seed-mean errors) and
    mCE, of one seed or of the seed means (seed=None)."""
    def err(m, c, s, only=seed):
        vals = [r["error"] for r in rows if r["model"] == m and r["corruption"] == c and r["severity"] == s
                and (only is None or r["seed"] == only)]
        return sum(vals) / len(vals)
    out = {}
    applied = [c for c in CORRUPTIONS if c not in NOT_APPLICABLE]
    for m in dict.fromkeys(r["model"] for r in rows):
        ce = {c: sum(err(m, c, s) for s in range(1, 6))
                 / max(sum(err(baseline, c, s, only=None) for s in range(1, 6)), 1e-9)
              for c in applied}
        out[m] = {"clean": err(m, "clean", 0), "ce": ce, "mCE": 100 * sum(ce.values()) / len(ce),
                  "mean_error": sum(err(m, c, s) for c in applied for s in range(1, 6)) / (5 * len(applied))}
    return out


def _heatmap(ce: dict, path: Path, baseline: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(ce)
    cols = list(next(iter(ce.values()))["ce"])
    grid = np.array([[100 * ce[m]["ce"][c] for c in cols] for m in models])
    fig, ax = plt.subplots(figsize=(11, 2.4 + 0.5 * len(models)))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=min(50, grid.min()), vmax=max(150, grid.max()))
    ax.set_xticks(range(len(cols)), [c.replace("_", " ") for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(cols)):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=f"CE (% of {baseline})")
    ax.set_title("Corruption error per model and corruption, severities 1-5 summed (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
