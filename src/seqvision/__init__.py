"""seqvision: Sequencer (deep LSTMs for image classification) and its baselines, with timm's API."""
from importlib.metadata import PackageNotFoundError, version as _version

from . import models  # noqa: F401  (registers every family)
from .factory import create_model
from .hub import save_pretrained
from .registry import list_models
from .timm_compat import register_with_timm
from .weights import load_model, load_weights, save_model

register_with_timm()  # timm.create_model("seqvision_<name>") for every preset

try:  # one version, pyproject.toml's
    __version__ = _version("seqvision")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
__all__ = ["create_model", "list_models", "load_model", "load_weights", "save_model", "save_pretrained",
           "__version__"]
