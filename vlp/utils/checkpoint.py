"""The one way vlp reads a checkpoint, a state dict or any other tensor file a user or a run directory supplies.

Unpickling runs code: a ``.ckpt``/``.pth``/``.bin`` can name any Python callable and ``torch.load`` would call it.
Every such file is therefore read here, with ``torch.load(map_location="cpu", weights_only=True)`` (tensors and plain
containers only; nothing in the file is executed) or with safetensors (no code at all), and every way of failing
becomes a :class:`CheckpointError` whose one-line message names the file and says what was expected, instead of
torch's multi-paragraph internals ("failed finding central directory", "Unsupported global: GLOBAL ...").

* :func:`load_file` -- any torch file (or ``.safetensors``), whatever its layout: for converters of foreign layouts.
* :func:`read_weights` -- a state dict file (``.safetensors``, a transformers ``pytorch_model.bin``, a ``.pth``).
* :func:`read_checkpoint` -- a vlp / Lightning checkpoint: a dict with a ``state_dict`` (and other required keys).

Lightning's own resume read (``trainer.fit(ckpt_path=...)``) is made safe by the caller passing
``weights_only=True`` after the file was validated here (``vlp.train.fit``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["CheckpointError", "load_file", "read_weights", "read_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or of the wrong layout. ``str(e)`` is one line that
    names the file and what was expected; ``e.path`` is the file."""

    def __init__(self, path: str | Path, problem: str, expected: str):
        self.path = Path(path)
        self.problem = problem
        self.expected = expected
        super().__init__(f"{path}: {problem}; expected {expected}")


# Where torch names the callable it refused: "Unsupported global: GLOBAL __main__.Obj was not an allowed global"
# (a class outside the allow-list) and "unsupported GLOBAL posix.system whose module posix is blocked" (a function).
_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")
_OPCODE = re.compile(r"Unsupported operand (\d+)")


def _is_refusal(path: Path, error: Exception) -> bool:
    """Whether the safe unpickler refused content (a global; or an opcode of a real pickle stream, which starts
    with the PROTO opcode 0x80) rather than tripped over bytes that are no pickle at all (junk also "has" opcodes)."""
    text = str(error)
    if _GLOBAL.search(text):
        return True
    if _OPCODE.search(text):
        with path.open("rb") as f:
            return f.read(1) == b"\x80"
    return False


def _refused(path: Path, error: Exception, what: str) -> CheckpointError:
    """The safe unpickler met something other than tensors and plain containers: name it, never load it."""
    text = str(error)
    found = _GLOBAL.search(text)
    if found:
        culprit = f"it references the Python global {found.group(1)}"
    else:
        opcode = _OPCODE.search(text)
        culprit = (f"it is a pickle (opcode {opcode.group(1)}) that only a full, code-running unpickler reads"
                   if opcode else "it holds Python objects other than tensors and plain containers")
    return CheckpointError(path, f"refused to load: {culprit}, so loading it could run code (vlp reads files only with "
                                 f"torch.load(weights_only=True); re-save just its tensors if you trust it)", what)


def _damaged(path: Path, error: Exception, what: str) -> CheckpointError:
    """The bytes are not a complete torch file: truncated (an interrupted copy), empty, or another format."""
    text = str(error)
    if isinstance(error, (EOFError, OSError)) or "central directory" in text or "zip archive" in text:
        problem = "truncated or corrupt (not a complete torch.save file)" if path.stat().st_size else "empty file"
    else:
        problem = f"not a torch file torch.load can read ({type(error).__name__})"
    return CheckpointError(path, problem, what)


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file", what)
    if not path.is_file():
        raise CheckpointError(path, "not a file", what)
    return path


def _load_safetensors(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, "not a readable safetensors file (truncated or corrupt)", what) from e


def load_file(path: str | Path, *, what: str = "a checkpoint") -> Any:
    """The object in ``path`` (``torch.save`` output, or a ``.safetensors`` file), read on the CPU without running
    any code from it. ``what`` describes the expected content for the error message, e.g. ``"an official TCL
    checkpoint ({'model': state_dict})"``. Raises :class:`CheckpointError`."""
    import pickle
    import struct

    import torch

    path = _existing_file(path, what)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, what)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a foreign pickle, refused just below anyway
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _is_refusal(path, e):
            raise _refused(path, e, what) from e
        raise _damaged(path, e, what) from e
    except PermissionError as e:
        raise CheckpointError(path, "not readable (permission denied)", what) from e
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AttributeError, TypeError, IndexError,
            struct.error) as e:
        # What torch raises on bytes that are not (or no longer) one of its files: a zip without its central
        # directory (or an OSError from its reader), an empty file, a legacy stream cut short, another format.
        raise _damaged(path, e, what) from e


def read_weights(path: str | Path, *, what: str = "a state dict of tensors") -> dict:
    """A state-dict file as a dict: ``.safetensors``, a transformers ``pytorch_model.bin``, a ``.pth``/``.pt``.
    Its values are usually tensors; wrappers (``{"model": {...}}``) are left for the caller to unwrap."""
    obj = load_file(path, what=what)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict", what)
    return obj


def read_checkpoint(path: str | Path, *, expect: str = "a vlp checkpoint (.ckpt of vlp pretrain, finetune or convert)",
                    require: Iterable[str] = ()) -> dict:
    """A vlp / Lightning checkpoint: a dict with a ``state_dict`` dict and every key in ``require`` besides (a
    resume needs ``optimizer_states``). Raises :class:`CheckpointError` naming the file."""
    ckpt = load_file(path, what=expect)
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict", expect)
    missing = [k for k in ("state_dict", *require) if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"no {', '.join(repr(k) for k in missing)} in the file (keys: "
                                    f"{', '.join(map(str, list(ckpt)[:6]))})", expect)
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(path, f"'state_dict' is a {type(ckpt['state_dict']).__name__}, not a dict", expect)
    return ckpt
