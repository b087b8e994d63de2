"""Run-folder checkpoints: written atomically, `latest` pointer last, read back without unpickling code.

A checkpoint is `checkpoints/step-NNNNNNNN.safetensors` (model weights, config in the metadata), an
optional `...ema.safetensors`, and `...state.pt` (optimizer, scheduler position, scaler, counters, history)
which holds only tensors and plain Python values and is read with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import SeqvisionError
from .weights import WeightsError, atomic_write, load_model, read_metadata, save_bytes, save_model, torch_bytes

LATEST = "latest"


class RunFolderError(SeqvisionError):
    """A run folder that cannot be written or resumed; the message names it."""


def ckpt_stem(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run: Path, step: int, model, ema, state: dict, extra_meta: dict[str, str], keep: int = 2) -> Path:
    """Write a checkpoint for `step`, then point `latest` at it, then prune older ones."""
    stem = ckpt_stem(run, step)
    save_model(model, f"{stem}.safetensors", extra_meta)
    if ema is not None:
        save_model(ema, f"{stem}.ema.safetensors", extra_meta)
    atomic_write(f"{stem}.state.pt", save_bytes(torch_bytes(state)))
    atomic_write(run / LATEST, lambda tmp: Path(tmp).write_text(stem.name + "\n"))
    old = sorted((run / "checkpoints").glob("step-*.state.pt"))[:-keep]
    for state_file in old:
        base = state_file.name.removesuffix(".state.pt")
        for f in run.joinpath("checkpoints").glob(f"{base}.*"):
            f.unlink()
    return stem


def checkpoints(run: Path) -> list[Path]:
    """Checkpoint stems of a run folder, newest first: the one `latest` names, then the others by step."""
    stems = sorted((p.with_name(p.name.removesuffix(".state.pt"))
                    for p in (run / "checkpoints").glob("step-*.state.pt")), reverse=True)
    pointer = run / LATEST
    named = run / "checkpoints" / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    return sorted(stems, key=lambda s: s != named)  # stable: `latest` first, then by step


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[0] if found else None


def load_state(stem: Path) -> dict:
    return torch.load(f"{stem}.state.pt", map_location="cpu", weights_only=True)


def read_checkpoint(run: Path, ema: bool) -> tuple[Path, dict, dict | None, dict]:
    """(stem, weights, EMA weights, state) of the newest checkpoint that reads back whole; an unreadable one
    (truncated, zero bytes, deleted) is passed over for the next older one, saying so."""
    from .weights import read_state_dict

    problems = []
    for stem in checkpoints(run):
        try:
            sd = read_state_dict(f"{stem}.safetensors")
            ema_sd = read_state_dict(f"{stem}.ema.safetensors") if ema else None
            state = load_state(stem)
        except (WeightsError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # damage
            problems.append(f"{stem.name} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
            print(f"warning: {run}: checkpoint {problems[-1]} cannot be read; trying an older one", file=sys.stderr)
            continue
        if problems:
            print(f"warning: {run}: resuming from {stem.name}, the newest intact checkpoint", file=sys.stderr)
        return stem, sd, ema_sd, state
    raise RunFolderError(f"{run}: no readable checkpoint to resume from ({'; '.join(problems) or 'none written'})")


@contextmanager
def locked(run: Path):
    """Hold `run/.lock` while training into `run`, and clear the temporary files a killed writer left there.
    A second trainer on the same folder is refused, naming the process and host that hold it; a start
    refused before it wrote anything leaves no folder behind."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        with open(run / ".lock", "a+") as f:  # closing it releases the lock, as does the process's death
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise RunFolderError(f"{run} is in use by {f.read().strip() or 'another process'} "
                                     f"({run / '.lock'}); wait for it to finish or choose another --output") from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            try:
                remove_orphans(run)
                yield
            finally:
                (run / ".lock").unlink(missing_ok=True)  # while still held: nobody else can be inside
    finally:
        if created and not any(run.iterdir()):  # a refused start leaves no folder behind
            run.rmdir()


def remove_orphans(run: Path) -> None:
    """Temporary files a killed writer left behind (atomic_write's `.NAME.*.tmp`)."""
    for folder in (run, run / "checkpoints"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


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
