"""seqvision: Sequencer (deep LSTMs for image classification) and its baselines, with timm's API."""
from . import models  # noqa: F401  (registers every family)
from .factory import create_model
from .registry import list_models
from .weights import load_model, load_weights, save_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model", "load_weights", "save_model", "__version__"]
