"""Model families; importing this package registers every preset."""
from . import mixer, sequencer, vit  # noqa: F401
