"""`create_model`: a registered model or a hub folder, optionally with weights, optionally as a backbone."""
from __future__ import annotations

from torch import nn

from .registry import build_model, get_entry
from .timm_compat import pretrained_cfg
from .weights import load_weights, resolve_pretrained

SOURCES = ("hf-hub:", "local-dir:")


def create_model(name: str, pretrained: bool | str | None = None, features_only: bool = False,
                 out_indices: int | list[int] | None = None, output_fmt: str = "NCHW", **overrides) -> nn.Module:
    """Build a registered model, optionally with weights, as timm's create_model does.

    Args:
        name: a name from `list_models()`, or a hub folder: "local-dir:DIR" or "hf-hub:ORG/NAME".
        pretrained: None/False for the reference init; True for the released weights of the preset
            (downloaded from its hub id); or a path to a `.safetensors` / torch weights file in
            seqvision, timm or the authors' key format. Hub folders always load their weights.
        features_only: return a backbone whose forward gives the feature maps of `out_indices` (timm's
            FeatureGetterNet over `forward_intermediates`, with `feature_info` channels and reductions).
        out_indices: which stages (Sequencer) or blocks (ViT, Mixer) to return: None for all, an int n
            for the last n, or a list of (possibly negative) indices.
        output_fmt: "NCHW" or "NHWC" feature maps.
        **overrides: fields of the family's config, e.g. `num_classes=10, in_chans=1, drop_path_rate=0.1`.
            When `num_classes` or `in_chans` is given and differs from the weights, the head is dropped
            (re-initialised) or the stem adapted instead of failing.
    """
    if name.startswith(SOURCES):
        from .hub import load_pretrained
        model = load_pretrained(name, **overrides)
    else:
        model = build_model(name, **overrides)
        if pretrained:
            path = resolve_pretrained(get_entry(name), pretrained)
            load_weights(model, path, drop_head="num_classes" in overrides, adapt_in_chans="in_chans" in overrides)
        model.pretrained_cfg = pretrained_cfg(model)
    model.default_cfg = model.pretrained_cfg  # timm's older name
    if not features_only:
        return model
    from timm.models._features import FeatureGetterNet

    n = len(model.feature_info)
    return FeatureGetterNet(model, out_indices=list(range(n)) if out_indices is None else out_indices,
                            output_fmt=output_fmt)
