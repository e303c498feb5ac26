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

Python raises a Ctrl-C's ``KeyboardInterrupt`` wherever the main thread is when its handler runs; inside a
``__del__`` or a garbage-collector callback it is printed as "Exception ignored" and lost, and training would go on.
:func:`ctrl_c_guard` (a callback of every training run) remembers the signal as well and raises it again at the next
batch boundary, so a Ctrl-C stops training within one step whatever it interrupted.
"""

from __future__ import annotations

import signal
import threading
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


def ctrl_c_guard():
    """A Lightning callback: during ``fit`` SIGINT raises ``KeyboardInterrupt`` as Python's own handler does, and
    one that got lost where it landed is raised again at the next batch start or end (module docstring)."""
    import lightning as L

    class CtrlCGuard(L.Callback):
        def __init__(self):
            self.pending = False
            self._previous = None

        def _on_sigint(self, signum, frame):
            self.pending = True
            raise KeyboardInterrupt

        def setup(self, trainer, pl_module, stage: str) -> None:
            # only over Python's own handler: a user's (or a debugger's) is left alone
            if (stage == "fit" and threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
                self._previous = signal.signal(signal.SIGINT, self._on_sigint)

        def teardown(self, trainer, pl_module, stage: str) -> None:
            if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self._previous)
            self._previous = None

        def _check(self) -> None:
            if self.pending:
                raise KeyboardInterrupt

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._check()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._check()

    return CtrlCGuard()


__all__ = ["RunInterrupted", "ctrl_c_guard", "is_ctrl_c", "newest_checkpoint_step"]
