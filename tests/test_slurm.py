"""SLURM pre-emption (``vlp.utils.slurm``, ``slurm/README.md``) without SLURM: a fake ``scontrol`` on PATH and the
``SLURM_*`` variables of a one-task batch job.

* end to end: a ``vlp pretrain`` subprocess gets SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@90`` sends) after a few
  optimizer steps; it saves the step it reached, runs ``scontrol requeue <job>`` and exits 0; the same command run
  again (the requeued job) resumes from that checkpoint and ends bitwise equal to an uninterrupted run -- every
  tensor of the final state_dict and optimizer state, every logged value. With gradient accumulation, so that the
  signal lands in the middle of a step and often of an accumulation window, where Lightning's own handler would save
  a checkpoint that does not resume exactly;
* the trainer built in a SLURM job has Lightning's SLURM environment without its mid-step handler, and vlp's
  ``SlurmRequeue`` last among the callbacks (``trainer.slurm_requeue``; none outside SLURM or in an interactive job);
* ``SlurmRequeue`` acts only at the end of an optimizer step, requeues from rank 0, and says when requeueing failed;
* SIGTERM (``vlp.utils.graceful_stop.TerminateSave``, every run): the step reached is saved, the run exits 143 and
  the same command resumes it.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from _tiny_runs import ROOT, compare_runs, load, subprocess_env, tiny_experiment, vlp_command

pytestmark = pytest.mark.usefixtures("one_thread")

JOB = "4242"
MAX_STEPS, EVERY, ACCUMULATE = 12, 4, 2


def fake_scontrol(tmp_path: Path, status: int = 0) -> tuple[Path, Path]:
    """A ``scontrol`` that appends its arguments to a log and exits with ``status``; (its directory, the log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit {status}\n')
    script.chmod(0o755)
    return bin_dir, log


def slurm_vars(bin_dir: Path, job_name: str = "vlp-pretrain") -> dict:
    """What ``srun`` sets for the one task of a one-node batch job (and PATH with the fake scontrol first)."""
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": JOB, "SLURM_JOB_NAME": job_name,
            "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NODELIST": "node001", "SLURM_JOB_NODELIST": "node001", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0"}


def _wait_for_rows(proc: subprocess.Popen, run: Path, rows: int, out: Path, timeout: float = 120) -> int:
    """Poll metrics.csv (flushed with each checkpoint) until it holds ``rows`` steps; returns how many it holds."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"the run ended before it was signalled:\n{out.read_text()[-3000:]}"
        assert time.time() < deadline, "no metrics appeared in time"
        try:
            with (run / "metrics.csv").open(newline="") as f:
                n = sum(1 for r in csv.DictReader(f) if r.get("step"))
        except FileNotFoundError:
            n = 0
        if n >= rows:
            return n
        time.sleep(0.02)


def _signal_after_first_checkpoint(cmd: list, env: dict, run: Path, out: Path, signum: int) -> tuple[int, int, str]:
    """Run ``cmd``, send it ``signum`` once the first checkpoint's rows are in metrics.csv; (exit status, rows
    logged when signalled, output)."""
    with out.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rows = _wait_for_rows(proc, run, EVERY - 1, out)
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, rows, out.read_text()


# -- end to end -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigusr1_saves_requeues_exits_and_the_requeued_job_resumes_bitwise(shapes_shards, tmp_path, monkeypatch,
                                                                           capsys):
    from vlp.cli import main

    exp = tiny_experiment("tcl", tmp_path, shapes_shards, max_steps=MAX_STEPS, checkpoint_every_n_steps=EVERY,
                          accumulate_grad_batches=ACCUMULATE, throughput=False)  # no wall-clock columns
    bin_dir, log = fake_scontrol(tmp_path)
    env = {**subprocess_env(), **slurm_vars(bin_dir)}
    run, out = tmp_path / "run", tmp_path / "job.out"
    args = ["pretrain", str(exp), "name=run", "--no-eval"]
    cmd = vlp_command(*args)

    # The job: SIGUSR1 once the first checkpoint's rows are in metrics.csv (EVERY steps done, rows 0..EVERY-2).
    code, rows, text = _signal_after_first_checkpoint(cmd, env, run, out, signal.SIGUSR1)
    assert code == 0, text[-3000:]
    said = re.search(r"pre-empted \(signal \d+\): step (\d+) saved", text)
    assert said, f"no pre-emption message:\n{text[-3000:]}"
    step = int(said.group(1))
    assert rows + 1 <= step < MAX_STEPS, (rows, step)  # the step reached, not an earlier periodic one; not finished
    assert log.read_text() == f"requeue {JOB}\n"
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == step
    assert load(run / "checkpoints" / f"step{step:07d}.ckpt")["global_step"] == step
    assert not list(run.glob("hpc_ckpt_*.ckpt")), "Lightning's mid-step handler saved a checkpoint"

    # The requeued job: the same command in the same environment, here in this process (its environment and
    # SIGUSR1 handler are restored afterwards).
    before = signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as m:
        for k, v in slurm_vars(bin_dir).items():
            m.setenv(k, v)
        try:
            assert main(args) == 0
        finally:
            signal.signal(signal.SIGUSR1, before)
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert log.read_text() == f"requeue {JOB}\n", "requeued again without a signal"
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS

    # An uninterrupted run of the same config (in this process, on one thread as the children).
    assert main([a if a != "name=run" else "name=ref" for a in args]) == 0
    res = compare_runs(tmp_path / "ref", run)
    assert res["steps"] == (MAX_STEPS, MAX_STEPS)
    for part in ("state_dict", "optimizer_states", "lr_schedulers"):
        diff, n, differ = res[part]
        assert not differ, f"{part}: {len(differ)} of {n} entries differ (max |diff| {diff:g}), e.g. {differ[:5]}"
    assert res["metrics_steps"] == (list(range(MAX_STEPS)),) * 2
    assert not res["metrics_differ"], res["metrics_differ"][:10]
    print(f"pre-empted at step {step} (signal after {rows} logged steps), resumed bitwise over "
          f"{res['state_dict'][1] + res['optimizer_states'][1]} tensors")


# -- the trainer in a SLURM job ---------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, **trainer):
    from vlp.config import ExperimentConfig, TrainerConfig

    return ExperimentConfig(output_dir=str(tmp_path), trainer=TrainerConfig(
        accelerator="cpu", devices=1, enable_progress_bar=False, throughput=False, **trainer))


@pytest.mark.parametrize("where, knob", [("batch", True), ("batch", False), ("interactive", True), ("none", True)])
def test_the_trainer_in_a_slurm_job_has_its_environment_and_vlps_requeue(where, knob, tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from vlp.resume import RunCheckpoint
    from vlp.train import _trainer, run_callbacks
    from vlp.utils.graceful_stop import SaveAtStepEnd, TerminateSave
    from vlp.utils.slurm import SlurmRequeue

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    if where != "none":
        for k, v in slurm_vars(tmp_path, job_name="interactive" if where == "interactive" else "vlp").items():
            monkeypatch.setenv(k, v)
    cfg = _cfg(tmp_path, slurm_requeue=knob)
    trainer = _trainer(cfg, cfg.run_dir, run_callbacks(cfg))
    env = trainer._accelerator_connector.cluster_environment
    requeue = [c for c in trainer.callbacks if isinstance(c, SlurmRequeue)]
    if where == "batch":
        assert isinstance(env, SLURMEnvironment) and env.global_rank() == 0 and env.world_size() == 1
        assert env.auto_requeue is False, "Lightning's handler saves mid-step; vlp's SlurmRequeue requeues instead"
        if knob:
            # after the RunCheckpoint (Lightning runs checkpoint callbacks last, in order): it sees the step's save
            ckpt = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, RunCheckpoint)]
            after = trainer.callbacks[ckpt[0] + 1:]
            assert len(ckpt) == 1 and requeue[0] in after and all(isinstance(c, SaveAtStepEnd) for c in after)
            assert requeue[0].checkpoint is trainer.callbacks[ckpt[0]]
            assert [type(c) for c in after] == [SlurmRequeue, TerminateSave]
        else:
            assert not requeue
    else:  # an interactive allocation (srun --pty bash) or no SLURM: as on a workstation
        assert not isinstance(env, SLURMEnvironment) and not requeue


# -- SlurmRequeue at step ends ----------------------------------------------------------------------------------------
class _Checkpoint:
    dirpath = "run/checkpoints"

    def __init__(self):
        self.saved = []

    def _save_final(self, trainer) -> None:
        self.saved.append(trainer.global_step)


def _trainer_stub(step: int, zero: bool = True):
    return SimpleNamespace(global_step=step, is_global_zero=zero,
                           strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision))


@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    """The fake scontrol's log; SIGUSR1's handler is restored afterwards."""
    bin_dir, log = fake_scontrol(tmp_path)
    for k, v in slurm_vars(bin_dir).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    yield log
    signal.signal(signal.SIGUSR1, before)


def test_requeue_waits_for_the_end_of_the_optimizer_step(slurm_job):
    from vlp.utils.slurm import Preempted, SlurmRequeue

    ckpt = _Checkpoint()
    cb, trainer = SlurmRequeue(ckpt), _trainer_stub(4)
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    cb.on_train_batch_end(trainer, None, None, None, 0)  # no signal: nothing
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives during the first micro-batch of step 4
    assert cb.requested and ckpt.saved == [] and not slurm_job.exists(), "the handler itself must not save"
    cb.on_train_batch_end(trainer, None, None, None, 0)  # micro-batch end, no optimizer step yet: nothing
    assert ckpt.saved == [] and not slurm_job.exists()
    trainer.global_step = 5  # the window's last micro-batch stepped the optimizer
    with pytest.raises(Preempted) as e:
        cb.on_train_batch_end(trainer, None, None, None, 1)
    assert e.value.code == 0 and ckpt.saved == [5] and slurm_job.read_text() == f"requeue {JOB}\n"


def test_requeue_from_rank_zero_only_and_a_failed_requeue_says_so(tmp_path, slurm_job, monkeypatch, capsys):
    from vlp.utils.slurm import Preempted, SlurmRequeue

    cb, trainer = SlurmRequeue(_Checkpoint()), _trainer_stub(3, zero=False)
    cb.on_train_start(trainer, None)
    cb.requested, trainer.global_step = True, 4
    with pytest.raises(Preempted) as e:
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert e.value.code == 0 and not slurm_job.exists()  # another rank: saves (collectively) and exits

    failing, _ = fake_scontrol(tmp_path / "failing", status=1)
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    cb, trainer = SlurmRequeue(_Checkpoint()), _trainer_stub(3)
    cb.on_train_start(trainer, None)
    cb.requested, trainer.global_step = True, 4
    with pytest.raises(Preempted) as e:
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert e.value.code == 1 and "scontrol requeue 77_3` failed" in capsys.readouterr().out
    assert (tmp_path / "failing" / "scontrol.log").read_text() == "requeue 77_3\n"


def test_a_signal_after_training_requeues_at_once(slurm_job):
    """During the final evaluation there is nothing to save: the job is requeued and that evaluation is redone."""
    from vlp.utils.slurm import SlurmRequeue

    cb, trainer = SlurmRequeue(_Checkpoint()), _trainer_stub(12)
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    cb.on_train_end(trainer, None)
    assert not slurm_job.exists()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert slurm_job.read_text() == f"requeue {JOB}\n"


# -- SIGTERM (kill, scancel, docker stop, SLURM's time limit): save the step reached, exit 143 ---------------------
def test_sigterm_saves_the_step_reached_exits_143_and_the_same_command_resumes(shapes_shards, tmp_path, capsys):
    """A real ``vlp pretrain`` (no SLURM) gets SIGTERM after its first checkpoint: it saves the step it was in at
    that step's end (not the earlier periodic one, and nothing mid-step), says so, and exits 143 (Lightning alone
    would exit 0 and save nothing); the same command then resumes from that step and finishes."""
    from vlp.cli import main

    exp = tiny_experiment("tcl", tmp_path, shapes_shards, max_steps=MAX_STEPS, checkpoint_every_n_steps=EVERY,
                          accumulate_grad_batches=ACCUMULATE, throughput=False)
    run, out = tmp_path / "run", tmp_path / "out.txt"
    args = ["pretrain", str(exp), "name=run", "--no-eval"]
    code, rows, text = _signal_after_first_checkpoint(vlp_command(*args), subprocess_env(), run, out, signal.SIGTERM)
    assert code == 143, text[-3000:]
    said = re.search(r"terminated \(SIGTERM\) at step (\d+): saved in (\S+); the same command resumes from it", text)
    assert said, text[-3000:]
    step = int(said.group(1))
    assert rows + 1 <= step < MAX_STEPS and said.group(2) == str(run / "checkpoints")
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == step
    assert load(run / "checkpoints" / f"step{step:07d}.ckpt")["global_step"] == step
    assert "Traceback" not in text and not (run / "results.json").exists()
    assert main(args) == 0
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS


def test_sigterm_waits_for_the_step_end_reaches_the_launched_ranks_and_after_training_exits_at_once():
    from vlp.utils.graceful_stop import Terminated, TerminateSave

    class Rank:  # a rank Lightning's DDP launcher started
        def __init__(self, alive=True):
            self.alive, self.got = alive, []

        def poll(self):
            return None if self.alive else 0

        def send_signal(self, signum):
            self.got.append(signum)

    ranks = [Rank(), Rank(alive=False)]
    ckpt, trainer = _Checkpoint(), _trainer_stub(4)
    trainer.strategy.launcher = SimpleNamespace(procs=ranks)
    cb = TerminateSave(ckpt)
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 5
    assert cb.requested and ckpt.saved == [] and ranks[0].got == [signal.SIGTERM] and ranks[1].got == []
    cb.on_train_batch_end(trainer, None, None, None, 0)  # no optimizer step yet: nothing
    assert ckpt.saved == []
    trainer.global_step = 5
    with pytest.raises(Terminated) as e:
        cb.on_train_batch_end(trainer, None, None, None, 1)
    assert e.value.code == 143 and ckpt.saved == [5]

    def before_fit(signum, frame):
        pass

    signal.signal(signal.SIGTERM, before_fit)
    cb, trainer = TerminateSave(_Checkpoint()), _trainer_stub(12)
    cb.setup(trainer, None, "fit")
    cb.on_train_start(trainer, None)
    cb.on_train_end(trainer, None)
    with pytest.raises(Terminated):  # training is over: nothing to save, stop now
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    cb.teardown(trainer, None, "fit")  # after fit: the handler from before (by default: end the process)
    assert signal.getsignal(signal.SIGTERM) is before_fit
