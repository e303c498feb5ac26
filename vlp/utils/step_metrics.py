"""Each metrics.csv row holds what was logged at that step, nothing older.

Lightning keeps the last value of every ``self.log(..., on_step=True)`` key for the whole epoch and hands it to the
logger at every later step, whether the key was logged again or not. A model whose logged keys vary from step to
step (UNITER samples one pre-training task per step, so each step logs only that task's losses) would then write
stale values of the other tasks into every row -- values a resumed run does not have, so its metrics.csv would
differ from the uninterrupted run's (DESIGN §7). :class:`FreshStepMetrics` forgets the step-level values at the start
of each optimizer step (its first micro-batch), so a row is exactly that step's logging; epoch-level aggregation is
untouched. :func:`logged_this_step` reads the same values (what the checkpoint of a step records as its row, and what
the non-finite check inspects).

Both reach into Lightning's result collection (``trainer._results``, Lightning 2.6); if it is not there they do
nothing / fall back to ``trainer.callback_metrics``.
"""

from __future__ import annotations

import lightning as L
import torch

__all__ = ["FreshStepMetrics", "logged_this_step"]


def _results(trainer: L.Trainer):
    return getattr(trainer, "_results", None)


def logged_this_step(trainer: L.Trainer, kind: str = "log") -> dict[str, torch.Tensor]:
    """The step-level values logged in the current optimizer step: ``kind`` ``log`` (what the logger is handed,
    forked names) or ``callback`` (plain names)."""
    results = _results(trainer)
    if results is None:
        return dict(trainer.callback_metrics)
    try:
        return dict(results.metrics(on_step=True)[kind])
    except Exception:  # another Lightning's internals: the public, possibly stale view
        return dict(trainer.callback_metrics)


class FreshStepMetrics(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return  # within an accumulation window the row is the window's last values, as Lightning logs them
        results = _results(trainer)
        for item in (results.values() if results is not None else ()):
            meta = getattr(item, "meta", None)
            if meta is not None and getattr(meta, "on_step", False) and hasattr(item, "_forward_cache"):
                item._forward_cache = None
