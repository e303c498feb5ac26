"""What every pre-training LightningModule shares: parameter groups, the learning-rate schedule, loss weighting and
logging. A paper's module implements ``compute_losses(batch) -> {name: loss}`` and the retrieval interface
(``embed_images``, ``embed_texts``, ``match_logits``); everything else lives here once.
"""

from __future__ import annotations

import math
from typing import Iterable

import lightning as L
import torch
from torch import nn

from vlp.config import OptimConfig


def param_groups(module: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: weight decay except on 1-d tensors and biases (the ALBEF/TCL rule), and per-name lr multipliers.

    ``optim.lr_mult`` maps a name substring to a multiplier (BridgeTower: ``cross_modal: 5``); the first matching
    substring wins, in the order written. Frozen parameters (momentum twins) are left out.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = optim.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias"))
        wd = 0.0 if no_decay else optim.weight_decay
        mult = next((m for key, m in optim.lr_mult.items() if key in name), 1.0)
        groups.setdefault((wd, mult), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr": optim.lr * mult, "lr_mult": mult}
        for (wd, mult), ps in sorted(groups.items())
    ]


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Step -> multiplier of the peak lr: linear warm-up from ``warmup_start_lr``, then cosine/linear to ``min_lr``."""
    warmup = optim.warmup_steps or int(round(optim.warmup_ratio * total_steps))
    start = optim.warmup_start_lr / optim.lr
    floor = optim.min_lr / optim.lr

    def fn(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / max(1, warmup)
        if optim.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if optim.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}; expected cosine, linear or constant")

    return fn


def configure_adamw(module: L.LightningModule, optim: OptimConfig, total_steps: int | None) -> dict:
    """AdamW over ``param_groups`` with the warm-up + decay schedule stepped per optimizer step (Lightning's
    ``configure_optimizers`` return value); ``total_steps`` falls back to ``trainer.max_steps``."""
    opt = torch.optim.AdamW(param_groups(module, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    total = total_steps or max(1, module.trainer.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PretrainModule(L.LightningModule):
    """Base of the paper modules. ``loss_weights`` scales the named losses; a weight of 0 switches a loss off."""

    def __init__(self, optim: OptimConfig | None = None, loss_weights: dict[str, float] | None = None):
        super().__init__()
        self.optim_cfg = optim or OptimConfig()
        self.loss_weights = dict(loss_weights or {})
        self.total_steps: int | None = None  # set by the trainer entry point from max_steps or the loader length

    # -- to implement -------------------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weight(self, name: str) -> float:
        return float(self.loss_weights.get(name, 1.0))

    def enabled(self, name: str) -> bool:
        return self.weight(name) != 0.0

    # -- Lightning ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        total = sum(self.weight(k) * v for k, v in losses.items() if self.enabled(k))
        bs = batch["input_ids"].shape[0] if "input_ids" in batch else None
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        if "n_corrupt" in batch:  # the data pipeline counts skipped corrupt samples
            self.log("data/corrupt", float(batch["n_corrupt"]), reduce_fx="max", batch_size=bs)
        return total

    def configure_optimizers(self):
        return configure_adamw(self, self.optim_cfg, self.total_steps)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    # -- retrieval interface (DESIGN §5), used by vlp.eval ------------------------------------------------------------
    def embed_images(self, images: torch.Tensor):
        """-> (normalised embeddings [B, E], per-image states kept for matching)."""
        raise NotImplementedError

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (normalised embeddings [B, E], per-text states kept for matching)."""
        raise NotImplementedError

    def match_states(self, image_states, text_states, attention_mask) -> torch.Tensor:
        """ITM logits [B, 2] of aligned pairs, from the states ``embed_images`` / ``embed_texts`` returned (retrieval
        re-ranking caches them once per image and text)."""
        raise NotImplementedError

    def match_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (index 1 = matched) of images [B, 3, S, S] and token ids [B, T]."""
        _, image_states = self.embed_images(pixel_values)
        _, text_states = self.embed_texts(input_ids, attention_mask)
        return self.match_states(image_states, text_states, attention_mask)


def count_parameters(modules: Iterable[nn.Module] | nn.Module, trainable_only: bool = True) -> int:
    if isinstance(modules, nn.Module):
        modules = [modules]
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)
