"""Model families; importing this package registers every preset."""
from . import cnn, mixer, sequencer, vit  # noqa: F401
