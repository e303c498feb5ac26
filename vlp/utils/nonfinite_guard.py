"""The Lightning callback behind ``trainer.nonfinite`` (the policy is described in ``vlp.utils.nonfinite``)."""

from __future__ import annotations

import math

import lightning as L
import torch

from vlp.utils.nonfinite import NONFINITE_POLICIES, NonFiniteError

__all__ = ["NonFiniteGuard"]


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.4g}"


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class NonFiniteGuard(L.Callback):
    def __init__(self, policy: str = "stop"):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped = 0

    # -- checkpointed state: the running count of skipped steps ------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    # -- the check -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _logged(trainer: L.Trainer) -> dict[str, torch.Tensor]:
        """This step's one-element values logged under ``train/`` (the total, its terms, metrics)."""
        from vlp.utils.step_metrics import logged_this_step

        return {k: v for k, v in logged_this_step(trainer, "callback").items()
                if k.startswith("train/") and k != "train/skipped_nonfinite" and isinstance(v, torch.Tensor)
                and v.numel() == 1}

    @staticmethod
    def _grads(pl_module: L.LightningModule) -> tuple[list[str], torch.Tensor | None]:
        """Names of the parameters with gradients, and a bool vector (on their device, no host sync): finite?"""
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        # Under FSDP2 the gradients are shards (DTensors): each rank checks its own (the flags are summed over the
        # ranks), and a rank may hold no element of a small one.
        local = [(n, g.to_local() if hasattr(g, "to_local") else g) for n, g in named]
        local = [(n, g.detach()) for n, g in local if g.numel()]
        if not local:
            return [], None
        # max |g| per tensor: inf/NaN propagate, and unlike a 2-norm it cannot overflow on large finite gradients
        norms = torch._foreach_norm([g for _, g in local], float("inf"))
        return [n for n, _ in local], torch.isfinite(torch.stack([x.float() for x in norms]))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step, device = trainer.global_step, pl_module.device
        logged = self._logged(trainer)
        # The total decides (a term with weight 0 may be anything); the terms are named in the message.
        deciding = [logged["train/loss"]] if "train/loss" in logged else list(logged.values())
        loss_bad = torch.zeros((), device=device)
        for v in deciding:
            loss_bad = loss_bad + (~torch.isfinite(v.detach().to(device))).float().sum()
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None  # a scaler skips inf steps itself
        names, finite = self._grads(pl_module) if check_grads else ([], None)
        grads_bad = (~finite).float().sum().to(device) if finite is not None else torch.zeros((), device=device)
        flags = torch.stack([loss_bad.clamp(max=1), grads_bad.clamp(max=1)])
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        any_loss, any_grads = (bool(x > 0) for x in flags.tolist())  # the step's one host sync
        if not (any_loss or any_grads):
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
            return
        if self.policy == "stop":
            values = {k: float(v) for k, v in logged.items()}
            bad_terms = [k for k, v in values.items() if not math.isfinite(v)]
            bad_grads = [n for n, ok in zip(names, finite.tolist()) if not ok] if finite is not None else []
            here = bool(loss_bad > 0)  # this rank's total (or, without one, its terms) is non-finite
            raise NonFiniteError(self._message(step, values, bad_terms if here else [], bad_grads, any_loss), step)
        for p in pl_module.parameters():
            p.grad = None
        self.skipped += 1
        self._stop_if_state_is_poisoned(trainer, pl_module, step)
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    @staticmethod
    def _nonfinite_state(pl_module: L.LightningModule) -> list[str]:
        """Buffers and frozen parameters (EMA twins, feature queues, norm statistics) holding NaN/inf."""
        named = [*pl_module.named_buffers(), *((n, p) for n, p in pl_module.named_parameters() if not p.requires_grad)]
        return [n for n, t in named if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]

    def _stop_if_state_is_poisoned(self, trainer, pl_module, step: int) -> None:
        """A skipped step drops the optimizer update, not what its forward wrote (a feature queue fed NaN features,
        an EMA): if that is non-finite now, every later step would be too -- stop, naming it."""
        bad = self._nonfinite_state(pl_module)
        flag = torch.tensor(float(bool(bad)), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if bool(flag > 0):
            raise NonFiniteError(
                f"step {step}: non-finite loss, update skipped (trainer.nonfinite=skip), but its forward left "
                f"non-finite values in {_names(bad) if bad else 'state on another rank'}, which a skip cannot undo; "
                f"stopped, no checkpoint written (lower optim.lr)", step)

    @staticmethod
    def _message(step, logged, bad_terms, bad_grads, any_rank_loss) -> str:
        if bad_terms:
            what = "non-finite loss: " + ", ".join(f"{k}={_fmt(logged[k])}" for k in bad_terms)
        elif any_rank_loss:
            what = "non-finite loss on another rank"
        elif bad_grads:
            what = f"finite loss {_fmt(logged.get('train/loss', float('nan')))} but non-finite gradients of " + \
                   _names(bad_grads)
        else:
            what = "non-finite gradients on another rank"
        return (f"step {step}: {what} (trainer.nonfinite=stop: stopped before the optimizer step, no checkpoint "
                f"written; lower optim.lr, or set trainer.nonfinite=skip to drop such steps)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = []
        for name, t in checkpoint.get("state_dict", {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                local = t.to_local() if hasattr(t, "to_local") else t
                if local.numel() and not bool(torch.isfinite(local).all()):
                    bad.append(name)
        flag = torch.tensor(float(bool(bad)), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if bool(flag > 0):
            step = trainer.global_step
            raise NonFiniteError(f"step {step}: refusing to write a checkpoint with non-finite weights "
                                 f"({_names(bad) if bad else 'on another rank'}); the last checkpoint written is the "
                                 f"newest finite one", step)
