"""The errors seqvision expects: each message names the file, flag, key or step at fault, so the command
line prints it as one line (`--debug` for the traceback) instead of a traceback."""
from __future__ import annotations

import importlib


class SeqvisionError(Exception):
    """Base of the expected failures."""


class ConfigError(SeqvisionError, ValueError):
    """Settings that cannot run together, or that a resumed run cannot honour."""


class MissingDependency(SeqvisionError, ImportError):
    """An optional package a command needs; the message names the extra that installs it."""


def require(module: str, extra: str):
    """Import an optional module, or fail naming `pip install 'seqvision[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{module} is not installed ({e}); install it with: "
                                f"pip install 'seqvision[{extra}]'") from None
