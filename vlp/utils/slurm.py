"""SLURM pre-emption that resumes bitwise: near the time limit, save the step reached, requeue the job, exit.

With ``#SBATCH --signal=SIGUSR1@90 --requeue`` SLURM sends SIGUSR1 to every task 90 s before the time limit.
Lightning's own answer (``SLURMEnvironment(auto_requeue=True)``, what a plain ``Trainer`` picks under SLURM) saves
``hpc_ckpt_N.ckpt`` from inside the signal handler, i.e. wherever the main thread happens to be: in the forward,
between the optimizer step and the lr-scheduler step, inside an accumulation window, inside a periodic save.
Lightning resumes loop counters exactly only from checkpoints written at a batch end, so such a file does not resume
bitwise (after an optimizer step it holds the stepped weights and ``global_step`` while the batch is replayed and
the schedule is a step behind: a measured run diverged in every weight), and under DDP each rank would enter the
save's barrier from a different point of its step.

So under SLURM the trainer gets ``SLURMEnvironment(auto_requeue=False)`` (ranks, world size, main address and port
still come from ``SLURM_*``; Lightning installs no SIGUSR1 handler) and :class:`SlurmRequeue`, whose handler only
records the signal. At the end of the next optimizer step -- where ``RunCheckpoint`` writes its periodic
checkpoints, with the same state -- the ranks agree (one all-reduce, so a signal that reached them on either side
of a step boundary stops all of them at the same step), the step is saved as a periodic checkpoint
(``checkpoints/stepNNNNNNN.ckpt`` and ``last.ckpt``), global rank 0 runs ``scontrol requeue <job>``, and every rank
exits (:class:`Preempted`). The requeued job runs the same command in the same directory, so ``vlp.train.start_run``
finds that checkpoint as the newest one and resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess

from vlp.utils.graceful_stop import SaveAtStepEnd

__all__ = ["Preempted", "SlurmRequeue", "cluster_plugins", "job_id", "requeue", "requeue_callbacks", "under_slurm"]


def under_slurm() -> bool:
    """Whether this process is a task of a SLURM job as Lightning detects it: ``SLURM_NTASKS`` set and a job name
    other than ``bash`` / ``interactive`` (an interactive allocation runs as on a workstation, and is not requeued)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def cluster_plugins() -> list:
    """``Trainer(plugins=...)``: under SLURM its environment without Lightning's mid-step requeue handler (see the
    module docstring; :class:`SlurmRequeue` does the requeue); elsewhere nothing (Lightning's own detection)."""
    if not under_slurm():
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def requeue_callbacks(enabled: bool, checkpoint) -> list:
    """``[SlurmRequeue(checkpoint)]`` in a SLURM job with ``trainer.slurm_requeue`` on, else ``[]``. Put it after
    ``checkpoint`` (the run's ``vlp.resume.RunCheckpoint``) in the callback list."""
    return [SlurmRequeue(checkpoint)] if enabled and under_slurm() else []


def job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue(job: str) -> int:
    """Run ``scontrol requeue <job>``; its exit status (127 when there is no ``scontrol`` to run)."""
    try:
        return subprocess.call(["scontrol", "requeue", job])
    except OSError:
        return 127


class Preempted(SystemExit):
    """Raised on every rank once the pre-emption checkpoint is written: a ``SystemExit`` (like Lightning's own
    ``SIGTERMException``), so it passes ``except Exception`` handlers, skips the final evaluation and ends the
    process. ``code`` is 0 when the job was requeued, 1 when ``scontrol requeue`` failed (submit the job again: it
    resumes from the same checkpoint)."""


class SlurmRequeue(SaveAtStepEnd):
    """On SIGUSR1 (SLURM's ``--signal``): at the end of the next optimizer step save it with ``checkpoint`` (the
    run's ``RunCheckpoint``), requeue the job from global rank 0, and exit every rank with :class:`Preempted`
    (``vlp.utils.graceful_stop.SaveAtStepEnd``: why at the step end, and how the ranks agree). Put it after the
    checkpoint callback. A signal during the final evaluation requeues at once (a requeued ``vlp pretrain`` does
    only that evaluation)."""

    keep_after_fit = True

    def __init__(self, checkpoint, signum: int = signal.SIGUSR1):
        super().__init__(checkpoint, signum)

    def after_training(self) -> None:
        if self._global_zero:
            requeue(job_id())

    def stop(self, trainer) -> None:
        code = 0
        if trainer.is_global_zero:
            job, step = job_id(), trainer.global_step
            saved = f"step {step} saved in {self.checkpoint.dirpath}"
            if requeue(job) == 0:
                print(f"pre-empted (signal {int(self.signum)}): {saved}; requeued SLURM job {job} (`scontrol requeue "
                      f"{job}`), which resumes from it", flush=True)
            else:
                code = 1
                print(f"pre-empted (signal {int(self.signum)}): {saved}, but `scontrol requeue {job}` failed: submit "
                      f"the same job again to resume from it", flush=True)
        raise Preempted(code)
