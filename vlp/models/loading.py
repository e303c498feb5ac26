"""vlp checkpoints: ``load(path)`` rebuilds a trained (or converted) module, ``save(module, path)`` writes one.

A vlp checkpoint is a Lightning-style ``.ckpt``: ``{"state_dict": {...}, "hyper_parameters": {"model": <model config
as a dict>}, ...}``. Every pre-training module stores its config there (``save_hyperparameters({"model": ...})``),
so the Trainer's checkpoints (``<run>/checkpoints/last.ckpt``) and the converters' outputs (``vlp convert``) read
the same way. Files are read by ``vlp.utils.checkpoint.read_checkpoint`` (``torch.load(weights_only=True)``): a
checkpoint holding arbitrary pickled objects is refused with a ``CheckpointError`` naming the file, never executed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vlp.utils.checkpoint import CheckpointError, read_checkpoint  # re-exported: the one safe reader

__all__ = ["load", "save", "read_checkpoint", "CheckpointError"]

FORMAT = "vlp-checkpoint/1"


def _model_config(ckpt: dict, path) -> tuple[Any, type]:
    from vlp.config import build
    from vlp.models import MODELS, _import

    hp = ckpt.get("hyper_parameters") or {}
    tree = hp.get("model") if isinstance(hp, dict) else None
    if not isinstance(tree, dict):
        raise CheckpointError(path, "no model config in hyper_parameters['model']",
                              "a vlp checkpoint (from `vlp pretrain` or `vlp convert`)")
    name = tree.get("name")
    if name not in MODELS:
        raise CheckpointError(path, f"unknown model {name!r} in hyper_parameters['model']",
                              f"one of {', '.join(MODELS)}")
    cfg_cls, module_cls = _import(name)
    return build(cfg_cls, tree, prefix="model."), module_cls


def _offline(cfg):
    """The config with weight loading switched off in its sub-configs: the checkpoint brings every weight."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            sub = {k: v for k, v in (("pretrained", False), ("checkpoint", None))
                   if any(g.name == k for g in dataclasses.fields(value))}
            if sub:
                changes[f.name] = dataclasses.replace(value, **sub)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load(path: str | Path, map_location: str | torch.device = "cpu", strict: bool = True):
    """The module of a vlp checkpoint, weights loaded, in eval mode.

    ``strict``: every parameter and buffer of the module must be in the checkpoint and vice versa."""
    ckpt = read_checkpoint(path)
    cfg, module_cls = _model_config(ckpt, path)
    module = module_cls(_offline(cfg))
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"{path}: checkpoint does not fit {module_cls.__name__}: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    return module.to(map_location).eval()


def save(module, path: str | Path, **extra) -> Path:
    """Write ``module`` as a vlp checkpoint (atomically) that :func:`load` reads; ``extra`` entries are added to
    the dict (plain values only: the file must load with ``weights_only=True``)."""
    from vlp.utils.io import atomic_open

    hp = dict(getattr(module, "hparams", {}) or {})
    if not isinstance(hp.get("model"), dict):
        raise ValueError(f"{type(module).__name__} records no model config (save_hyperparameters({{'model': ...}}))")
    ckpt = {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "hyper_parameters": {"model": _plain(hp["model"])}, "format": FORMAT, **extra}
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)
    return path


def _plain(value):
    """Dicts/lists/tuples of plain values as built-in containers (``weights_only`` loads no subclasses)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
