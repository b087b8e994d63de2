"""Hub folders in timm's layout: `config.json` (architecture, num_classes, label names, pretrained_cfg,
model_args) beside `model.safetensors`. Written by `save_pretrained` (and by `seqvision train` for its best
weights), read by `create_model("local-dir:DIR")` and `create_model("hf-hub:ORG/NAME")`.

A Sequencer2D that timm's own class can build names timm's architecture, so plain timm loads the folder
with `timm.create_model("local-dir:DIR", pretrained=True)`; every folder also records seqvision's family and
config, which seqvision rebuilds exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from .errors import require
from .timm_compat import PREFIX, pretrained_cfg, timm_architecture
from .weights import WeightsError, atomic_write, load_state_dict, read_state_dict, save_model

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_pretrained(model: nn.Module, folder: str | os.PathLike, label_names: list[str] | None = None,
                    data: dict | None = None) -> Path:
    """Write `model` as a hub folder; returns the folder.

    Args:
        model: a seqvision model.
        folder: where to write config.json and model.safetensors (created if needed).
        label_names: class names, one per output.
        data: the run's data settings (img_size, mean, std, crop_pct) for the pretrained_cfg.
    """
    folder = Path(folder)
    if label_names is not None and len(label_names) != model.num_classes:
        raise WeightsError(f"{len(label_names)} label names for a {model.num_classes}-class model")
    seq_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}
    # timm's own architecture where it builds this model; else our timm entry point with the whole config
    arch, args = timm_architecture(model) or (PREFIX + (getattr(model, "pretrained_name", "") or _any_preset(model)),
                                              seq_cfg)
    config = {"architecture": arch, "num_classes": model.num_classes, "num_features": model.num_features,
              "global_pool": "avg" if model.family != "vit" else "token",
              "pretrained_cfg": pretrained_cfg(model, data), "model_args": args,
              "seqvision": {"family": model.family, "config": seq_cfg, "name": getattr(model, "pretrained_name", "")}}
    if label_names is not None:
        config["label_names"] = list(label_names)
    save_model(model, folder / WEIGHTS, {"classes": json.dumps(label_names)} if label_names else None)
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return folder


def _any_preset(model: nn.Module) -> str:
    from .registry import list_models, get_entry

    return next((n for n in list_models() if get_entry(n).family == model.family), model.family)


def hub_folder(source: str, cache_dir: str | None = None) -> Path:
    """The local folder of "local-dir:DIR" or "hf-hub:ORG/NAME[@REVISION]" (downloaded, or from the cache)."""
    kind, _, where = source.partition(":")
    if kind == "local-dir":
        folder = Path(where)
        if not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"{source}: no {CONFIG} in {folder}")
        return folder
    if kind != "hf-hub":
        raise ValueError(f"{source!r}: expected local-dir:DIR or hf-hub:ORG/NAME")
    hf = require("huggingface_hub", "hub")
    repo, _, revision = where.partition("@")
    try:
        config = hf.hf_hub_download(repo, CONFIG, revision=revision or None, cache_dir=cache_dir)
        hf.hf_hub_download(repo, WEIGHTS, revision=revision or None, cache_dir=cache_dir)
    except Exception as e:  # offline without a cached copy, unknown repo, ...
        raise WeightsError(f"{source}: could not fetch {repo} ({type(e).__name__}: {e})") from None
    return Path(config).parent


def load_pretrained(source: str, cache_dir: str | None = None, **overrides) -> nn.Module:
    """The model of a hub folder, its weights loaded; `overrides` as for create_model (num_classes, ...)."""
    from .registry import config_from_dict, family_builder

    folder = hub_folder(source, cache_dir)
    try:
        config = json.loads((folder / CONFIG).read_text())
        seq = config["seqvision"]
        cfg = config_from_dict(seq["family"], {**seq["config"], **overrides})
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise WeightsError(f"{folder / CONFIG}: not a seqvision hub config ({msg})") from None
    model = family_builder(seq["family"])(cfg)
    load_state_dict(model, read_state_dict(folder / WEIGHTS), source=str(folder / WEIGHTS),
                    drop_head="num_classes" in overrides, adapt_in_chans="in_chans" in overrides)
    model.pretrained_name = seq.get("name", "")
    model.label_names = config.get("label_names")
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pretrained_cfg"].items()}  # JSON lists
    model.pretrained_cfg = {**pcfg, "num_classes": model.num_classes}
    return model
