"""Run-folder checkpoints: written atomically, `latest` pointer last, read back without unpickling code.

A checkpoint is `checkpoints/step-NNNNNNNN.safetensors` (model weights, config in the metadata), an
optional `...ema.safetensors`, and `...state.pt` (optimizer, scheduler position, scaler, counters, history)
which holds only tensors and plain Python values and is read with `weights_only=True`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .weights import WeightsError, atomic_write, load_model, read_metadata, save_model

LATEST = "latest"


def ckpt_stem(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run: Path, step: int, model, ema, state: dict, extra_meta: dict[str, str], keep: int = 2) -> Path:
    """Write a checkpoint for `step`, then point `latest` at it, then prune older ones."""
    stem = ckpt_stem(run, step)
    save_model(model, f"{stem}.safetensors", extra_meta)
    if ema is not None:
        save_model(ema, f"{stem}.ema.safetensors", extra_meta)
    atomic_write(f"{stem}.state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(run / LATEST, lambda tmp: Path(tmp).write_text(stem.name + "\n"))
    old = sorted((run / "checkpoints").glob("step-*.state.pt"))[:-keep]
    for state_file in old:
        base = state_file.name.removesuffix(".state.pt")
        for f in run.joinpath("checkpoints").glob(f"{base}.*"):
            f.unlink()
    return stem


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / LATEST
    if not pointer.exists():
        return None
    stem = run / "checkpoints" / pointer.read_text().strip()
    if not Path(f"{stem}.state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {stem.name}, whose files are missing")
    return stem


def load_state(stem: Path) -> dict:
    return torch.load(f"{stem}.state.pt", map_location="cpu", weights_only=True)


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a run folder (best, else latest) or a file path."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "best.safetensors", ):
            if candidate.exists():
                return candidate
        stem = latest_checkpoint(path)
        if stem is None:
            raise FileNotFoundError(f"{path}: run folder has no best.safetensors and no checkpoint")
        return Path(f"{stem}.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_for_inference(path: str | Path):
    """(model, classes, data settings, metadata) from a run folder or a seqvision weights file."""
    weights = resolve_weights(path)
    model = load_model(weights).eval()
    meta = read_metadata(weights)
    classes = json.loads(meta.get("classes", "null")) or [str(i) for i in range(model.num_classes)]
    data = json.loads(meta.get("data", "{}"))
    if len(classes) != model.num_classes:
        raise WeightsError(f"{weights}: {len(classes)} class names for a {model.num_classes}-class head")
    return model, classes, data, meta


def eval_transform(model, data: dict, img_size: int = 0, crop_pct: float = 0.0):
    """(transform, side) for evaluating `model` the way its run was evaluated, unless overridden.

    Args:
        model: the loaded model (its config gives channels and the default size).
        data: the run's data settings from the weights' metadata (`load_for_inference`).
        img_size: evaluation side; 0 keeps the training size.
        crop_pct: centre-crop fraction for large images; 0 keeps the run's.
    """
    from .data import build_transform

    size = img_size or data.get("img_size") or model.cfg.img_size[0]
    tf = build_transform(False, size, model.cfg.in_chans, tuple(data.get("mean", (0.485, 0.456, 0.406))),
                         tuple(data.get("std", (0.229, 0.224, 0.225))), crop_pct or data.get("crop_pct", 0.875))
    return tf, size
