"""Model families; importing this package registers every preset."""
from . import sequencer  # noqa: F401
