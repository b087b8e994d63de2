"""`create_model`: a registered model, optionally with weights."""
from __future__ import annotations

from torch import nn

from .registry import build_model, get_entry
from .weights import load_weights, resolve_pretrained


def create_model(name: str, pretrained: bool | str | None = None, **overrides) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: a name from `list_models()`.
        pretrained: None/False for the reference init; True for the released weights of the preset
            (downloaded from its hub id); or a path to a `.safetensors` / torch weights file in
            seqvision, timm or the authors' key format.
        **overrides: fields of the family's config, e.g. `num_classes=10, in_chans=1, drop_path_rate=0.1`.
            When `num_classes` or `in_chans` is given and differs from the weights, the head is dropped
            (re-initialised) or the stem adapted instead of failing.
    """
    model = build_model(name, **overrides)
    if pretrained:
        path = resolve_pretrained(get_entry(name), pretrained)
        load_weights(model, path, drop_head="num_classes" in overrides, adapt_in_chans="in_chans" in overrides)
    return model
