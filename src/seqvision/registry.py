"""Model registry: every preset of every family, built by name with typed overrides."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .errors import ConfigError
from .fields import checked_values


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    config: Any  # the family's frozen config dataclass
    build: Callable[[Any], nn.Module]
    hub_id: str | None = None  # where released weights live, e.g. "timm/sequencer2d_s.in1k"


_REGISTRY: dict[str, Entry] = {}
_FAMILIES: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {}


def register_family(family: str, config_cls: type, build: Callable[[Any], nn.Module],
                    presets: dict[str, Any], hub_ids: dict[str, str] | None = None) -> None:
    """Register a family's presets (name -> config instance) under one builder."""
    _FAMILIES[family] = (config_cls, build)
    for name, cfg in presets.items():
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = Entry(name, family, cfg, build, (hub_ids or {}).get(name))


def _closest(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


def get_entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}{_closest(name, _REGISTRY)} (see seqvision.list_models())")
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def make_config(name: str, **overrides):
    """The preset's config with overrides applied; unknown keys raise with the closest valid ones."""
    cfg = get_entry(name).config
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in fields:
            raise TypeError(f"{name}: unknown option {key!r}{_closest(key, fields)} "
                            f"(valid: {', '.join(sorted(fields))})")
    return dataclasses.replace(cfg, **overrides)


def config_from_dict(family: str, config: dict):
    """A family's config dataclass from a plain dict (as saved in weight-file metadata), every key known and
    every value of its default's type; raises ConfigError or KeyError naming what is wrong."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown model family {family!r}{_closest(family, _FAMILIES)}")
    config_cls = _FAMILIES[family][0]
    try:
        return config_cls(**checked_values(config_cls, config, lambda k: f"config key {k!r}"))
    except (TypeError, ValueError) as e:  # the dataclass's own checks (lengths, choices)
        raise ConfigError(f"{family} config: {e}") from None


def family_builder(family: str) -> Callable[[Any], nn.Module]:
    """The function that builds a model of `family` from its config dataclass."""
    return _FAMILIES[family][1]


def build_model(name: str, **overrides) -> nn.Module:
    """A registered model with the reference init (no weights); see `seqvision.create_model`."""
    model = get_entry(name).build(make_config(name, **overrides))
    model.pretrained_name = name
    return model
