"""Weights in and out: safetensors or torch files, seqvision/timm or the authors' key format.

Torch files are read with `weights_only=True` only: a pickle that would run code is refused, never retried
in the unsafe mode. Our own files are safetensors with the model's family and config in the metadata, so a
weight file alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from .errors import ConfigError, SeqvisionError, require
from .registry import Entry, build_model, config_from_dict, family_builder

WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


class WeightsError(SeqvisionError, ValueError):
    """A weight file that cannot be read or does not fit the model; the message names file and keys."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch file (a checkpoint's model entry is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-running pickles, RuntimeError for truncated zips, ...
        first = (str(e).splitlines() or ["no message: an empty or truncated file"])[0][:300]
        raise WeightsError(f"{path}: refused to load as a torch file with weights_only=True "
                           f"({type(e).__name__}: {first}). Only plain tensor "
                           f"state dicts are accepted; convert other files to .safetensors.") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


# Key formats -------------------------------------------------------------------------------------------

def is_authors_format(sd: dict) -> bool:
    return any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd) and not any(k.startswith("stages.") for k in sd)


def from_authors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' release keys -> ours (= timm's). Their downsample is the last entry of the stage before."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.(\d+)\.\d+\.down\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.down.", k)
        k = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out


def to_authors(sd: dict[str, torch.Tensor], layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Ours -> the authors' release keys; `layers` places each downsample after its previous stage."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.downsample\.down\.",
                   lambda m: f"blocks.{int(m[1]) - 1}.{layers[int(m[1]) - 1]}.down.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def to_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return from_authors(sd) if is_authors_format(sd) else sd


# Loading into a model ----------------------------------------------------------------------------------

def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict",
                    drop_head: bool = False, adapt_in_chans: bool = False, new_head: bool = False) -> None:
    """Load `sd` into `model` strictly; list every missing, unexpected and mis-shaped key on failure.

    Args:
        model: a seqvision model.
        sd: tensors in seqvision/timm or the authors' key format.
        source: what to name in error messages (usually the file path).
        drop_head: if the classifier's shape differs, keep the model's fresh head instead of failing.
        adapt_in_chans: if the stem's input channels differ, sum (to 1) or tile the RGB filters.
        new_head: keep the model's fresh head whatever the file's shape (the file's classes are other ones).
    """
    sd = to_model_keys(dict(sd))
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd)  # e.g. a ViT resamples its position grid
    own = model.state_dict()
    if adapt_in_chans and hasattr(model, "first_conv"):
        key = f"{model.first_conv}.weight"
        if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
            sd[key] = adapt_input_conv(sd[key], own[key].shape[1])
    head = (classifier_key(model) or "head.weight").rsplit(".", 1)[0] + "."  # head.fc. / head. / fc.
    if drop_head or new_head:  # keep the model's fresh classifier where the file's differs or is absent
        for k in [k for k in sd if k.startswith(head) and k not in own]:
            sd.pop(k)
        for k in [k for k in own if k.startswith(head)]:
            if new_head or k not in sd or sd[k].shape != own[k].shape:
                sd[k] = own[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    # A float parameter from an integer tensor would be cast silently into nonsense, a NaN would load.
    kinds = sorted(f"{k}: file {sd[k].dtype} vs model {own[k].dtype}" for k in set(sd) & set(own)
                   if own[k].dtype.is_floating_point != sd[k].dtype.is_floating_point)
    nonfinite = sorted(k for k in set(sd) & set(own) if sd[k].dtype.is_floating_point
                       and not torch.isfinite(sd[k]).all())
    if missing or unexpected or shapes or kinds or nonfinite:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes),
                             ("integer where float is expected, or the reverse", kinds),
                             ("NaN or infinite values", nonfinite)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        if any(k.startswith(head) for k in shapes):
            parts.append("a different number of classes? pass drop_head=True, or num_classes= to create_model")
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, 3, k, k) RGB filters -> (O, in_chans, k, k): summed for grey, tiled and rescaled otherwise."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def load_weights(model: nn.Module, path: str | os.PathLike, drop_head: bool = False,
                 adapt_in_chans: bool = False, classes: list[str] | None = None) -> None:
    """Read a weight file (any supported format) and load it strictly into `model`; with `classes` (the
    model's class names), a file that records other ones leaves the model's head fresh even where the shapes
    agree (ten clothes -> ten digits)."""
    recorded = recorded_classes(path) if classes is not None else None
    load_state_dict(model, read_state_dict(path), source=str(path), drop_head=drop_head,
                    adapt_in_chans=adapt_in_chans, new_head=recorded is not None and recorded != list(classes))


def recorded_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names a seqvision safetensors file records, or None where it records none it can read."""
    if Path(path).suffix != ".safetensors":
        return None
    try:  # untrusted metadata: unreadable classes say nothing
        names = json.loads(read_metadata(path).get("classes", "null"))
    except ValueError:
        return None
    return names if isinstance(names, list) else None


# Saving and whole-model files --------------------------------------------------------------------------

def model_metadata(model: nn.Module) -> dict[str, str]:
    cfg = dataclasses.asdict(model.cfg)
    meta = {"format": "seqvision", "family": model.family, "config": json.dumps(cfg),
            "name": getattr(model, "pretrained_name", "")}
    if getattr(model, "int8", False):  # seqvision.quantize.quantize_int8: rebuild the int8 modules on load
        meta["int8"] = "1"
    return meta


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new, never half.

    The file gets the usual mode (0666 less the umask; mkstemp's own is 0600). A full disk raises
    WeightsError saying "no space left" with the file, and leaves the old file as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e):
            raise WeightsError(f"{path}: no space left on the device; the previous version of the file, if any, "
                               f"is kept") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_bytes(data: bytes):
    """A writer for atomic_write that puts `data` in the file with plain file IO, so errors keep their errno
    (torch.save's and safetensors' own writers report a full disk as an internal assertion or an untyped error)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_model(model: nn.Module, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Save weights as safetensors (atomically) with the config as metadata, so `load_model` rebuilds it."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**model_metadata(model), **(extra_metadata or {})}
    atomic_write(path, save_bytes(save(sd, metadata=meta)))


def load_model(path: str | os.PathLike, **overrides) -> nn.Module:
    """Rebuild a model from a seqvision safetensors file (config from its metadata) and load its weights.

    The metadata is untrusted: its config is type-checked, and the model is first built on the meta device
    so that a config asking for more parameters than the file's tensors hold is refused before allocating.
    """
    meta = read_metadata(path)
    if meta.get("format") != "seqvision" or "config" not in meta:
        raise WeightsError(f"{path}: no seqvision config in the metadata; build the model with create_model(name) "
                           f"and load it with load_weights(model, path) instead")
    try:
        saved = json.loads(meta["config"])
        if not isinstance(saved, dict):
            raise ConfigError(f"config is a JSON {type(saved).__name__}, not an object")
        family = meta.get("family", "")
        cfg = config_from_dict(family, {**saved, **overrides})
        with torch.device("meta"):
            shapes = {k: tuple(t.shape) for k, t in family_builder(family)(cfg).state_dict().items()}
    except (ValueError, KeyError, TypeError, RuntimeError, ConfigError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise WeightsError(f"{path}: the model config in its metadata is not usable ({msg})") from None
    held = tensor_shapes(path)
    wanted, have = sum(map(math.prod, shapes.values())), sum(map(math.prod, held.values()))
    if wanted > have:
        diff = [f"missing {k}" for k in shapes if k not in held][:6] + \
               [f"{k}: file {held[k]} vs config {shapes[k]}" for k in shapes if k in held and held[k] != shapes[k]][:6]
        raise WeightsError(f"{path}: its metadata asks for a model of {wanted:,} values, but its tensors hold "
                           f"{have:,} ({', '.join(diff) or 'other keys'}); refused before building it")
    model = family_builder(family)(cfg)
    if meta.get("int8") == "1":
        from .quantize import quantize_int8
        model = quantize_int8(model)
    model.pretrained_name = meta.get("name", "")
    load_weights(model, path)
    return model


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header alone."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def resolve_pretrained(entry: Entry, pretrained: bool | str) -> str:
    """A local file for `pretrained`: the path itself, or the preset's released weights from its hub."""
    if isinstance(pretrained, (str, os.PathLike)):
        return str(pretrained)
    if entry.hub_id is None:
        raise WeightsError(f"{entry.name} has no released weights; pass pretrained=PATH to a weight file")
    hf_hub_download = require("huggingface_hub", "hub").hf_hub_download  # or pass pretrained=PATH
    try:
        return hf_hub_download(entry.hub_id, "model.safetensors")
    except Exception as e:
        raise WeightsError(f"could not fetch {entry.hub_id} ({type(e).__name__}: {e}); "
                           f"offline, pass pretrained=PATH to a downloaded file") from None


def classifier_key(model: nn.Module) -> str | None:
    """The state-dict key of the classifier's weight, or None for a headless model."""
    head = model.get_classifier()
    return next((f"{name}.weight" for name, m in model.named_modules() if m is head and hasattr(m, "weight")), None)


def convert(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
            to: str = "seqvision") -> None:
    """Convert a weight file between formats.

    Args:
        src: a safetensors or torch file in any supported key format.
        dst: output path; `.safetensors` unless `to="authors"` with a `.pth` destination.
        model_name: the registered model the weights belong to; checked by loading, and its config is
            written into the metadata. Needed unless `src` is a seqvision file.
        to: "seqvision" (= timm keys) or "authors".
    """
    if model_name is None and Path(src).suffix == ".safetensors" and read_metadata(src).get("format") == "seqvision":
        model = load_model(src)
    elif model_name is None:
        raise WeightsError(f"{src}: name the model these weights belong to (--model NAME)")
    else:
        sd = to_model_keys(read_state_dict(src))
        model = build_model(model_name)
        key = classifier_key(model)  # head.fc.weight (Sequencer), head.weight (ViT, Mixer)
        if key in sd and sd[key].shape[0] != model.num_classes:
            model = build_model(model_name, num_classes=sd[key].shape[0])
        elif key is not None and key not in sd:
            model = build_model(model_name, num_classes=0)
        load_state_dict(model, sd, source=str(src))
    if to == "seqvision":
        save_model(model, dst)
    elif to == "authors":
        if model.family != "sequencer":
            raise WeightsError(f"--to authors: the authors' format is Sequencer's; {model_name or src} is a "
                               f"{model.family} model (its seqvision keys are timm's already)")
        sd = to_authors({k: v.contiguous() for k, v in model.state_dict().items()}, model.cfg.layers)
        if Path(dst).suffix == ".safetensors":
            atomic_write(dst, save_bytes(save(sd)))
        else:
            atomic_write(dst, save_bytes(torch_bytes(sd)))
    else:
        raise ValueError(f"to must be 'seqvision' or 'authors', got {to!r}")
