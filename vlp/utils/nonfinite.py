"""Non-finite losses and gradients during training: ``trainer.nonfinite: stop | skip`` (default stop).

``vlp.utils.nonfinite_guard.NonFiniteGuard``, a Lightning callback that ``vlp.train`` adds to every run, acts after
the backward of every optimizer step and before the optimizer uses the gradients (Lightning's
``on_before_optimizer_step``; with gradient accumulation once per optimizer step, after its last micro-batch). A step
is *bad* when the loss logged as ``train/loss`` this step is NaN/inf on any rank (the message names every non-finite
``train/`` term besides), or any gradient is (under DDP the gradients are already all-reduced, so every rank sees the
same ones). The loss flag is summed over ranks, so all ranks take the same decision at the same point and none waits
in a collective the others skipped.

* ``stop``: raise :class:`NonFiniteError` on every rank before the optimizer step, naming the step and the
  non-finite terms; the weights are untouched and no checkpoint is written (the CLI prints its one line and exits 1).
* ``skip``: drop the update. Every gradient is set to ``None``, so AdamW leaves each parameter and its moments
  exactly as they were (not even weight decay is applied); the step still counts (``global_step``, the lr schedule and
  the data stream move on, so ``max_steps`` is reached as planned). State that a forward changes by itself is not
  rolled back: TCL's momentum encoders and queue advance as on any step; if that state itself became non-finite
  (a queue fed NaN features), every later step would be bad too, so the run stops with a :class:`NonFiniteError`
  naming those buffers. The running count is logged every step as ``train/skipped_nonfinite`` and kept in the
  checkpoint (this callback's state), so it continues across resumes.

This needs nothing from ``training_step`` beyond logging its losses (``PretrainModule`` and ``VQATask`` log
``train/loss`` and every term), and it does not return ``None`` from ``training_step``: under DDP one rank skipping
its backward while the others run theirs would hang the gradient all-reduce.

Independently of the policy, a checkpoint is never written with non-finite weights: ``on_save_checkpoint`` checks the
state dict and raises :class:`NonFiniteError` (naming the tensors) before Lightning writes the file.

Mixed precision with a gradient scaler (``16-mixed``) skips inf/NaN steps itself while it calibrates; there only
the losses are checked.
"""

from __future__ import annotations

# This module imports nothing heavy: the CLI imports NonFiniteError at start-up.

__all__ = ["NONFINITE_POLICIES", "NonFiniteError"]

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or weight. ``str(e)`` is one line naming the step and what went
    non-finite; ``e.step`` is the step (0-based, as in metrics.csv)."""

    def __init__(self, message: str, step: int):
        self.step = step
        super().__init__(message)
