"""What every downstream task does the same way (``vlp.tasks.vqa``, ``vlp.tasks.retrieval``): start from a
pre-trained checkpoint (or, asked for, from scratch), freeze what the task's objective never reaches, and log the
learning rate."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vlp.config import ConfigError

__all__ = ["LoadReport", "load_pretrained", "init_from_checkpoint", "freeze_unreached", "log_learning_rate",
           "group_keys"]


# -- loading pre-trained weights --------------------------------------------------------------------------------------
def group_keys(keys: list[str], depth: int = 2) -> str:
    """``a.b.c.w, a.b.d.w, x.y`` -> ``a.b.* (2), x.y``: a compact listing of state-dict keys."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(g if n == 1 else f"{g} ({n})" for g, n in counts.items())


class LoadReport(NamedTuple):
    path: str
    loaded: list[str]  # module keys whose values came from the checkpoint
    new: list[str]  # module keys left at their initialisation: the task head
    missing: list[str]  # other module keys the checkpoint lacks (an error when strict)
    unexpected: list[str]  # checkpoint keys the module has no place for (pre-training heads): dropped
    step: int | None

    def summary(self) -> str:
        lines = [f"initialised from {self.path}" + (f" (step {self.step})" if self.step is not None else "")
                 + f": {len(self.loaded)} tensors loaded"]
        lines.append(f"  newly initialised: {group_keys(self.new) if self.new else 'nothing'}")
        if self.missing:
            lines.append(f"  MISSING from the checkpoint (left at random init): {group_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  not used by this task (dropped): {group_keys(self.unexpected)}")
        return "\n".join(lines)


def _config_diff(saved, built, prefix: str = "") -> list[str]:
    """Leaves of two config dicts that differ (``a.b: saved -> built``)."""
    out = []
    for key in sorted(set(saved) | set(built)):
        a, b = saved.get(key), built.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (checkpoint) vs {b!r} (config)")
    return out


def load_pretrained(model: torch.nn.Module, path: str | Path, *, strict: bool = True,
                    new_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Load a vlp checkpoint's ``state_dict`` into ``model`` (not strict: the task head is new).

    Keys under ``new_prefixes`` may be missing (they are the task's new weights); any other missing key raises
    ``KeyError`` when ``strict`` (else a warning). Checkpoint keys the model lacks are dropped and reported. A
    fine-tuning checkpoint (keys under ``model.``) is accepted too. Shapes must agree (``pos_embed`` excepted: the
    vision tower resamples it to the new image size); a mismatch raises naming the config fields that differ."""
    from vlp.models.loading import read_checkpoint

    ckpt = read_checkpoint(path)
    state = dict(ckpt["state_dict"])
    own = model.state_dict()
    if state and all(k.startswith("model.") for k in state) and not any(k.startswith("model.") for k in own):
        state = {k[len("model."):]: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        hint = ""
        saved = (ckpt.get("hyper_parameters") or {}).get("model")
        if isinstance(saved, dict) and hasattr(model, "resolved_config"):
            diff = [d for d in _config_diff(saved, dataclasses.asdict(model.resolved_config()))
                    if not d.startswith(("num_answers", "loss_weights"))]
            if diff:
                hint = "\nconfig fields that differ: " + "; ".join(diff[:12])
        raise RuntimeError(f"{path}: the checkpoint does not fit the model built from the config: "
                           f"{str(e).strip()[:2000]}{hint}") from None
    new = [k for k in missing if k.startswith(new_prefixes)]
    other = [k for k in missing if not k.startswith(new_prefixes)]
    report = LoadReport(str(path), [k for k in own if k not in set(missing)], new, other, list(unexpected),
                        ckpt.get("global_step"))
    if other:
        msg = (f"{path} lacks {len(other)} weights of the model besides the task head: {group_keys(other)}; they stay "
               "randomly initialised")
        if strict:
            raise KeyError(msg + " (finetune.strict=false to accept this)")
        warnings.warn(msg, stacklevel=2)
    return report


def init_from_checkpoint(model: torch.nn.Module, cfg, new_prefixes: tuple[str, ...] = ()) -> None:
    """``vlp finetune``'s start: the weights of ``cfg.ckpt`` (keys under ``new_prefixes`` are the task's new head),
    or random ones when ``finetune.from_scratch`` says so; anything else is a config error naming what to set."""
    if cfg.ckpt and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"ckpt={cfg.ckpt}: no such checkpoint (pre-train first, e.g. `make "
                          f"pretrain-{cfg.model.name}`, or point ckpt at a `vlp pretrain` last.ckpt / `vlp convert` "
                          "output)")
    if cfg.ckpt:
        print(load_pretrained(model, cfg.ckpt, strict=cfg.finetune.strict, new_prefixes=new_prefixes).summary())
    elif cfg.finetune.from_scratch:
        warnings.warn("vlp finetune: no ckpt given and finetune.from_scratch=true: fine-tuning from RANDOM "
                      "initialisation (a baseline, not a pre-trained model)", stacklevel=3)
    else:
        raise ConfigError("vlp finetune needs the pre-trained weights: ckpt=PATH (a `vlp pretrain` last.ckpt or "
                          "a `vlp convert` output); finetune.from_scratch=true trains from random init instead")


@torch.no_grad()
def freeze_unreached(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> list[str]:
    """Freeze (``requires_grad=False``) the parameters of ``model`` that the backward of ``loss_fn()`` (a scalar, in
    train mode) does not reach, and return their names: pre-training heads a task never uses, so that DDP needs no
    ``find_unused_parameters`` and the optimizer leaves them alone. Gradients already present are kept."""
    was_training = model.training
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = None
    model.train()
    try:
        with torch.enable_grad():
            loss_fn().float().backward()
        unused = [n for n, p in trainable.items() if p.grad is None]
    finally:
        for n, p in trainable.items():
            p.grad = grads[n]
        model.train(was_training)
    for n in unused:
        trainable[n].requires_grad_(False)
    return unused


def log_learning_rate(module) -> None:
    """``train/lr`` of the first parameter group (``on_train_batch_start`` of a task)."""
    if module.trainer is not None and module.trainer.optimizers:
        module.log("train/lr", module.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
