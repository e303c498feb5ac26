"""What every converter shares: reading the source files safely, renaming keys by prefix tables, counting layers
from key names, and reporting keys that found no home or modules that found no weights.

Each paper's key map and config inference stay in its own converter (``tcl.py``, ``bridgetower.py``); only the
mechanics live here, so that every converter reads files the same safe way (``vlp.utils.checkpoint``: nothing in a
source file is executed) and words its errors the same way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from vlp.utils.checkpoint import CheckpointError, load_file, read_weights

log = logging.getLogger("vlp.convert")

__all__ = ["CheckpointError", "load_file", "read_weights", "read_hf_weights", "tensor_dict", "rename_by_prefix",
           "layer_indices", "preview", "unknown_keys_error", "report_skipped", "check_fit"]


# --------------------------------------------------------------------------------------------------- reading ---
def read_hf_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a transformers ``save_pretrained`` directory: ``model.safetensors`` or
    ``pytorch_model.bin``, sharded (``*.index.json``) or not; ``.bin`` files are read with ``weights_only=True``."""
    src = Path(src)
    what = "a transformers weights file (state dict of tensors)"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(index, "not a shard index (no 'weight_map')", "a transformers index.json") \
                    from e
            sd: dict[str, torch.Tensor] = {}
            for name in files:
                sd.update(read_weights(src / name, what=what))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return read_weights(src / name, what=what)
    raise CheckpointError(src, "no model.safetensors or pytorch_model.bin", "a transformers save_pretrained directory")


def tensor_dict(obj, path, what: str) -> dict[str, torch.Tensor]:
    """``obj`` when it is a non-empty dict of tensors, else a ``CheckpointError`` naming ``path`` and ``what``."""
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, "no state dict found", what)
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"values that are not tensors under {preview(bad, 4)}", what)
    return obj


# --------------------------------------------------------------------------------------------------- renaming ---
def rename_by_prefix(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    """``key`` with the first matching ``(old_prefix, new_prefix)`` of ``table`` swapped; None when none matches."""
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def layer_indices(sd: Iterable[str], prefix: str) -> list[int]:
    """The sorted layer numbers N of keys ``<prefix>N.*``: how deep a stack is, read from the names alone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pattern.match(k)] if m})


# -------------------------------------------------------------------------------------------------- reporting ---
def preview(keys: Sequence[str], n: int = 8) -> str:
    """The first ``n`` keys, and ``...`` when there are more: error messages stay one readable line."""
    keys = list(keys)
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def unknown_keys_error(unknown: Sequence[str], source: str) -> KeyError:
    """Source keys that no rule maps: converting would silently drop weights, so it is an error."""
    return KeyError(f"{source}: no vlp home for keys {preview(unknown)}")


def report_skipped(skipped: Sequence[str], source: str) -> None:
    """Warn once about source keys dropped on purpose (heads vlp does not implement), grouped by top module."""
    if skipped:
        heads = sorted({k.split(".")[0] for k in skipped})
        log.warning("%s: not converted (no vlp counterpart): %s", source, ", ".join(heads))


def check_fit(module, state_dict: dict[str, torch.Tensor], what: str,
              optional: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Load ``state_dict`` into ``module`` (not strict) and raise unless every converted tensor found its place and
    every module key is covered, except the keys ``optional`` accepts (returned: they stay as initialised)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    hard = [k for k in missing if not optional(k)]
    if hard or unexpected:
        raise KeyError(f"converted {what} checkpoint does not fit the model: missing {hard[:8]}, unexpected "
                       f"{unexpected[:8]}")
    return [k for k in missing if optional(k)]


def load_official_state_dict(path, what: str) -> dict[str, torch.Tensor]:
    """The state dict of an official file (bare, or under ``model`` / ``state_dict``), read ``weights_only``."""
    ckpt = load_file(path, what=what)
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    return tensor_dict(ckpt, path, what)


def load_converted(model, converted: dict[str, torch.Tensor], source: str, tied: Iterable[str] = ()) -> list[str]:
    """Load converted tensors into a built model, checking every key and shape. Keys in ``tied`` (views of other
    tensors) may be absent. Returns the module keys the file did not cover (warned about: they keep their init)."""
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{source} does not fit the model's shapes: {bad[:6]}")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise KeyError(f"{source}: no place in the model for {unexpected[:8]}")
    tied = set(tied)
    absent = [k for k in missing if k not in tied]
    if absent:
        log.warning("%s has no weights for %s: they keep their initialisation", source,
                                                 ", ".join(sorted({k.split(".")[0] for k in absent})))
    return absent
