"""Stopping on a signal without losing the step: save at the end of the optimizer step the signal arrived in, exit.

A signal handler runs wherever the main thread is (in the forward, between the optimizer and the scheduler step,
inside an accumulation window, inside a periodic save), so saving from it would write a state that does not resume
exactly. :class:`SaveAtStepEnd` only records the signal; at the end of the next optimizer step -- where
``RunCheckpoint`` writes its periodic checkpoints, with the same state -- the ranks agree (one all-reduce, so a
signal that reached them on either side of a step boundary stops all of them at the same step), the step is saved
as a periodic checkpoint + ``last.ckpt``, and every rank exits. Subclasses say what happens then:

* :class:`TerminateSave` -- SIGTERM (``kill``, ``scancel``, ``docker stop``, a Kubernetes eviction, SLURM at the
  time limit): ``terminated (SIGTERM) at step N: saved in ...; the same command resumes from it`` and exit status 143
  (128 + SIGTERM, what a shell reports for a process ended by it). Lightning's own SIGTERM answer ends the process
  with status 0 after the batch, saving nothing, so a killed job reads as a finished one;
* ``vlp.utils.slurm.SlurmRequeue`` -- SIGUSR1 under SLURM: requeue the job, exit 0.

After training (``on_train_end``: the final checkpoint is written) there is nothing to save: the signal acts at once
(``after_training``). Once ``fit`` is over SIGTERM gets its previous handler back (by default it ends the process,
which is right during the final evaluation); SIGUSR1 keeps vlp's, which requeues.
"""

from __future__ import annotations

import signal
import threading

from lightning.pytorch.callbacks import Checkpoint

__all__ = ["SaveAtStepEnd", "Terminated", "TerminateSave"]

TERMINATED = 143  # 128 + SIGTERM


class SaveAtStepEnd(Checkpoint):
    """Record ``signum``; at the next optimizer step end save that step with ``checkpoint`` (the run's
    ``vlp.resume.RunCheckpoint``) and call :meth:`stop` (which raises). A ``Checkpoint`` subclass only for its
    place: Lightning runs checkpoint callbacks after all others, in list order, so this one sees the step's final
    callback state and the periodic save ``checkpoint`` may just have made of the same step (then nothing is saved
    twice). The handler is installed in ``setup`` and again in ``on_train_start`` (Lightning's signal connector
    replaces SIGTERM's between the two); ``keep_after_fit``: whether it stays installed after ``fit``."""

    keep_after_fit = False

    def __init__(self, checkpoint, signum: int):
        self.checkpoint, self.signum = checkpoint, signum
        self.requested = False  # the signal arrived (on this rank)
        self._step = None  # global_step at the last batch end seen: an optimizer step ends when it changes
        self._trained = False  # fit is over: nothing left to save
        self._global_zero = False
        self._previous = None  # the handler before the first install

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(self.signum, self._on_signal)
            if self._previous is None:
                self._previous = previous

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if (stage == "fit" and not self.keep_after_fit and self._previous is not None
                and threading.current_thread() is threading.main_thread()):
            signal.signal(self.signum, self._previous)
            self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._global_zero = trainer.is_global_zero
        if stage == "fit":
            self._install()

    def _on_signal(self, signum, frame) -> None:
        """Only record it: saving from here would save whatever half-done step the main thread is in."""
        self.requested = True
        if self._trained:
            self.after_training()

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # inside an accumulation window: no optimizer step yet
            return
        self._step = trainer.global_step
        # Every rank reaches every step end, so this collective is matched; any rank's signal stops them all.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.checkpoint._save_final(trainer)  # this step as a periodic checkpoint + last.ckpt (unless just saved)
            self.stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        """Training ended without a step end seeing the signal: if it came since, act now (no collective: the
        ranks may disagree here; the final checkpoint is written)."""
        self._trained = True
        if self.requested:
            self.after_training()

    def stop(self, trainer) -> None:
        """The step is saved: say so and end this rank (raise)."""
        raise NotImplementedError

    def after_training(self) -> None:
        """The signal came after training (the final checkpoint is written)."""


class Terminated(SystemExit):
    """Raised on every rank once the SIGTERM checkpoint is written: a ``SystemExit`` with status 143, so it passes
    ``except Exception`` handlers, skips the final evaluation and ends the process as a terminated one."""

    def __init__(self):
        super().__init__(TERMINATED)


class TerminateSave(SaveAtStepEnd):
    """SIGTERM: save the step reached, exit 143 (module docstring)."""

    def __init__(self, checkpoint):
        super().__init__(checkpoint, signal.SIGTERM)

    def _on_signal(self, signum, frame) -> None:
        super()._on_signal(signum, frame)
        launcher = getattr(self, "_launcher", None)
        if launcher is not None:  # ranks this process launched (Lightning's DDP launcher): they stop at the same step
            for proc in getattr(launcher, "procs", ()):
                if proc.poll() is None:
                    proc.send_signal(signum)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._launcher = getattr(trainer.strategy, "launcher", None)

    def stop(self, trainer) -> None:
        if trainer.is_global_zero:
            print(f"terminated (SIGTERM) at step {trainer.global_step}: saved in {self.checkpoint.dirpath}; the same "
                  "command resumes from it", flush=True)
        raise Terminated()

    def after_training(self) -> None:
        raise Terminated()
