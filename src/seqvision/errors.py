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


def message(e: BaseException) -> str:
    """What to print for an expected error: its message, without the traceback a DataLoader worker wraps
    around it ("Caught DataError in DataLoader worker process 0. Original Traceback ...")."""
    import re

    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if "Original Traceback" in text:
        last = re.findall(r"^[\w.]+: (.*)$", text.split("Original Traceback", 1)[1], flags=re.M)
        text = last[-1] if last else text.splitlines()[0]
    return text
