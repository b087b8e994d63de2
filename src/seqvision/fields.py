"""Settings from untrusted places (YAML recipes, run.json, weight-file metadata) checked against the types of
a config dataclass's defaults before anything is built from them."""
from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError


def checked_values(cls, values: dict, label=str) -> dict:
    """`values` with each field's type matching its default in `cls`: an int is taken for a float and a list
    for a tuple (converted), nothing else. Unknown keys and other types raise ConfigError naming
    `label(key)`, the value and the type expected."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {', '.join(map(label, unknown))}")
    out = {}
    for key, v in values.items():
        like = defaults[key]
        if isinstance(like, tuple):
            kind = type(like[0]) if like else object
            ok = isinstance(v, (list, tuple)) and all(_fits(x, kind) for x in v)
            out[key] = tuple(float(x) if kind is float else x for x in v) if ok else v
            want = f"a list of {kind.__name__}"
        else:
            ok = _fits(v, type(like))
            out[key] = float(v) if ok and isinstance(like, float) else v
            want = type(like).__name__
        if not ok:
            raise ConfigError(f"{label(key)} must be {want}, got {v!r} ({type(v).__name__})")
    return out


def _fits(v, kind: type) -> bool:
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, kind)
