"""Ctrl-C during training: where the run stopped, and where the same command will resume it.

Lightning catches the ``KeyboardInterrupt`` inside ``trainer.fit``, tears the trainer down (loader workers, DDP
ranks it launched) and ends with ``sys.exit(1)``, which would read like a failure with no word on the state of the
run. :func:`is_ctrl_c` recognises that ending (and a bare ``KeyboardInterrupt``), and :class:`RunInterrupted` says
at which optimizer step the run stopped and which checkpoint a re-run continues from; ``vlp`` prints it and exits
with 130. Nothing more happens after it: no evaluation and no final checkpoint (``on_train_end`` never runs), so
the run directory stays a resumable, unfinished run.

Loader workers ignore SIGINT (``vlp.utils.stalls.WorkerInit``): a terminal sends Ctrl-C to the whole process group,
and a worker ended by it makes torch report "DataLoader worker exited unexpectedly" on top of the interrupt; the
main process stops them itself.
"""

from __future__ import annotations

from typing import Optional


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C at optimizer step ``step``; ``saved``: the step of the newest checkpoint the
    same command resumes from (None: there is none, the run starts again); ``rank``: the global rank raising it
    (a terminal interrupts every rank; only rank 0 needs to say so)."""

    def __init__(self, step: int, saved: Optional[int], rank: int = 0):
        self.step, self.saved, self.rank = int(step), saved, int(rank)
        if saved is None:
            then = "no checkpoint was written yet, so the same command starts the run again"
        else:
            then = f"the same command resumes the run from its last checkpoint (step {saved})"
        super().__init__(f"stopped by Ctrl-C at step {self.step}; {then}")


def is_ctrl_c(exc: BaseException) -> bool:
    """A ``KeyboardInterrupt``, or the ``SystemExit`` Lightning raises while handling one."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)


def newest_checkpoint_step(run_dir) -> Optional[int]:
    """The step of the checkpoint a re-run of the same command resumes from (the one ``vlp.resume`` picks: the
    newest that loads), None when there is none. Read from disk, not from the checkpoint callback's memory: a
    Ctrl-C can land after a checkpoint file is complete but before the callback has recorded it."""
    from pathlib import Path

    from vlp.resume import scan_checkpoints

    found, _ = scan_checkpoints(Path(run_dir))
    return found.global_step if found is not None else None


__all__ = ["RunInterrupted", "is_ctrl_c", "newest_checkpoint_step"]
