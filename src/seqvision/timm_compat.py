"""timm's conventions for seqvision models: `pretrained_cfg` (so `timm.data.resolve_data_config` gives the
right transform), and every preset registered with `timm.create_model` as `seqvision_<name>`.

A Sequencer2D of the shape timm's own `Sequencer2d` class builds (2-D LSTM mixer, no position grid) is also
described by timm's architecture and arguments (`timm_architecture`), so hub folders saved from it load in
plain timm.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from .fields import checked_values
from .registry import get_entry, list_models

PREFIX = "seqvision_"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def data_cfg(in_chans: int, size: int, data: dict | None = None) -> dict:
    """The preprocessing part of a pretrained_cfg: seqvision's own for `size`, or a run's `data` settings."""
    data = data or {}
    small = size < 64  # seqvision's small-image transform: resize and centre-crop to the size itself
    return {"input_size": (in_chans, size, size), "mean": tuple(data.get("mean", IMAGENET_MEAN))[:in_chans],
            "std": tuple(data.get("std", IMAGENET_STD))[:in_chans], "crop_mode": "center",
            "crop_pct": 1.0 if small else data.get("crop_pct", 0.875),
            "interpolation": "bilinear" if small else "bicubic"}


def pretrained_cfg(model: nn.Module, data: dict | None = None) -> dict:
    """timm's pretrained_cfg for a model: input size, mean/std, crop, interpolation, classes, layer names.

    Args:
        model: a seqvision model.
        data: a run's data settings (weights metadata "data": img_size, mean, std, crop_pct) to describe
            the preprocessing it was trained with; default: seqvision's for the model's input size.
    """
    from .weights import classifier_key

    head = classifier_key(model)
    size = (data or {}).get("img_size") or model.cfg.img_size[0]
    return {**data_cfg(model.cfg.in_chans, size, data), "num_classes": model.num_classes,
            "fixed_input_size": getattr(model.cfg, "fixed_size", False), "first_conv": model.first_conv,
            "classifier": head.removesuffix(".weight") if head else "", "license": "apache-2.0"}


def timm_architecture(model: nn.Module) -> tuple[str, dict] | None:
    """(timm's architecture name, its model_args) where timm's own Sequencer2d class builds this model with
    the same state-dict keys and function; None otherwise (other families, GRU/RNN cells, 1-D mixers,
    position grids)."""
    cfg = model.cfg
    if model.family != "sequencer" or cfg.mixer != "2d" or cfg.cell != "lstm" or cfg.pos_embed:
        return None
    n = len(cfg.layers)
    return "sequencer2d_s", {
        "layers": list(cfg.layers), "patch_sizes": list(cfg.patch_sizes), "embed_dims": list(cfg.embed_dims),
        "hidden_sizes": list(cfg.hidden_sizes), "mlp_ratios": [cfg.mlp_ratio] * n, "bidirectional": cfg.bidirectional,
        "union": cfg.union, "with_fc": cfg.with_fc, "in_chans": cfg.in_chans, "num_classes": model.num_classes,
    }


def register_with_timm() -> None:
    """Make every seqvision preset a timm model, `timm.create_model("seqvision_<name>", **kwargs)`."""
    import sys

    from timm.models import register_model

    module = sys.modules[__name__]
    for name in list_models():
        fn = _entrypoint(name)
        module.default_cfgs[fn.__name__] = _preset_cfg(name)
        register_model(fn)


default_cfgs: dict[str, dict] = {}  # timm reads a registering module's default_cfgs


def _preset_cfg(name: str) -> dict:
    cfg = get_entry(name).config
    return {**data_cfg(cfg.in_chans, cfg.img_size[0]), "num_classes": cfg.num_classes,
            "fixed_input_size": getattr(cfg, "fixed_size", False)}


def _weights_file(pretrained_cfg) -> str | bool:
    """The weights a timm pretrained_cfg points at (a hub folder, local or on the hub), else True (the preset's)."""
    from .hub import WEIGHTS, hub_folder

    cfg = dataclasses.asdict(pretrained_cfg) if dataclasses.is_dataclass(pretrained_cfg) else dict(pretrained_cfg)
    if cfg.get("source") == "local-dir" and cfg.get("file"):
        return str(hub_folder(f"local-dir:{cfg['file']}") / WEIGHTS)
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        return str(hub_folder(f"hf-hub:{cfg['hf_hub_id']}") / WEIGHTS)
    return True


def _entrypoint(name: str):
    fields = {f.name for f in dataclasses.fields(get_entry(name).config)}

    def build(pretrained: bool = False, **kwargs):
        from .factory import create_model

        source = kwargs.pop("pretrained_cfg", None)  # timm's factory passes these to every entrypoint
        for key in ("pretrained_cfg_overlay", "cache_dir", "pretrained_model_args"):
            kwargs.pop(key, None)
        if pretrained and source is not None:  # timm.create_model("local-dir:..." or "hf-hub:...", pretrained=True)
            pretrained = _weights_file(source)
        if isinstance(kwargs.get("img_size"), int):
            kwargs["img_size"] = (kwargs["img_size"],) * 2
        backbone = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "output_fmt") if k in kwargs}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{PREFIX}{name}: unknown arguments {unknown} (valid: {', '.join(sorted(fields))})")
        config = checked_values(type(get_entry(name).config), kwargs)  # JSON lists (hub model_args) to tuples
        return create_model(name, pretrained=pretrained or None, **config, **backbone)

    build.__name__ = build.__qualname__ = PREFIX + name
    build.__module__ = __name__
    build.__doc__ = f"seqvision's {name} (see seqvision.list_models())."
    return build
