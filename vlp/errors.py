"""Error types shared by the layers, and the one line ``vlp`` prints for an error a user can fix.

An *expected* error is bad input or a bad environment: a config key, a shard directory, a checkpoint, a trainer
setting Lightning refuses, a recipe's raw files, a run that stalled or met a non-finite loss. ``vlp`` prints it as
one ``error: ...`` line naming the file or key and what was expected, and exits non-zero; ``vlp --debug`` (or
``VLP_DEBUG=1``) shows the full traceback instead. Anything else is a bug and keeps its traceback.

DataLoader workers re-raise their errors in the main process wrapped in a text that holds the worker's whole
traceback (``torch._utils.ExceptionWrapper``); :func:`user_error` gives the original message, once.
"""

from __future__ import annotations

import os
import re
from typing import Optional

DEBUG_ENV = "VLP_DEBUG"


class DataError(ValueError):
    """The data a run was pointed at is not what the data layer expects (a shard directory, its ``index.json``, a
    shard's members, the tokenizer, the answer vocabulary); the message names the file or key and what was
    expected. A ``ValueError``, because callers have long caught that."""


def debug_enabled() -> bool:
    """Whether errors should show their full traceback (``vlp --debug`` sets ``VLP_DEBUG=1`` for the whole run,
    DDP ranks and recipe workers included)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# torch's text for an exception re-raised from a loader worker: "Caught <Type> in DataLoader worker process N.\n
# Original Traceback (most recent call last):\n ... <module>.<Type>: <message>"
_WORKER = re.compile(r"^Caught (\w+) in (DataLoader worker process \d+)\.\nOriginal Traceback", re.DOTALL)


def original_message(exc: BaseException) -> str:
    """``str(exc)``, or for an exception re-raised from a DataLoader worker the message it was raised with there."""
    text = str(exc)
    if not _WORKER.match(text):
        return text
    t = type(exc)
    for name in (f"{t.__module__}.{t.__qualname__}", t.__qualname__):
        at = text.rfind(f"\n{name}: ")
        if at >= 0:
            return text[at + len(name) + 3:].rstrip("\n")
    return text


# Lightning validates trainer.accelerator / devices / strategy / precision / num_nodes in these modules and raises
# ValueError or MisconfigurationException naming the argument.
_LIGHTNING_CHECKS = (os.path.join("lightning", "pytorch", "trainer", "connectors", ""),
                     os.path.join("lightning", "fabric", "connector.py"),
                     os.path.join("lightning", "fabric", "utilities", "device_parser.py"))


def _raised_in(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def _lightning_refused(exc: BaseException) -> bool:
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - lightning is a dependency
        return False
    if isinstance(exc, MisconfigurationException):
        return True
    return isinstance(exc, ValueError) and any(part in _raised_in(exc) for part in _LIGHTNING_CHECKS)


def user_error(exc: BaseException) -> Optional[tuple[str, int]]:
    """``(line, exit status)`` for an expected error, None for a bug (which keeps its traceback)."""
    from vlp.config import ConfigError
    from vlp.utils.checkpoint import CheckpointError
    from vlp.utils.nonfinite import NonFiniteError
    from vlp.utils.stalls import StallError

    message = original_message(exc)
    if isinstance(exc, ConfigError):
        return f"config error: {message}", 2
    if isinstance(exc, (CheckpointError, DataError)):
        return f"error: {message}", 2
    if isinstance(exc, NonFiniteError):  # the step and the loss terms (trainer.nonfinite=stop)
        return f"error: {message}", 1
    if isinstance(exc, StallError):  # the rank and what it waited for (vlp.utils.stalls)
        return f"error: {message}", 3
    if type(exc).__name__ == "RecipeError" and type(exc).__module__ == "data_recipes._common":
        return f"error: {message}", 2
    if _lightning_refused(exc):
        return (f"error: Lightning refused the trainer settings (trainer.accelerator, devices, strategy, precision, "
                f"num_nodes): {' '.join(message.split())}"), 2
    return None


__all__ = ["DataError", "DEBUG_ENV", "debug_enabled", "original_message", "user_error"]
