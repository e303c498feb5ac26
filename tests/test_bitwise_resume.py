"""Bitwise resume (DESIGN §7): for every registered model, a ``vlp pretrain`` killed with SIGKILL after a checkpoint
and restarted with the same command ends exactly where the uninterrupted run ends -- every tensor of the final
state_dict, optimizer and schedule state, and every value logged to metrics.csv -- with 0 and 2 loader workers, and
on 2 gloo ranks.

What makes it hold is ``vlp.utils.rng.StepSeeding``: every random draw of a training step (dropout, ITM negatives,
BridgeTower's image swap) is a pure function of (seed, step, rank, micro-batch), so nothing depends on the generator
state a killed process took with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _tiny_runs import ROOT, compare_runs, load, subprocess_env, tiny_experiment, vlp_command
from vlp.models import MODELS
from vlp.resume import select_checkpoint

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY, KILL_AFTER = 12, 3, 6


def _run(cmd: list[str], timeout: float = 300) -> None:
    out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _kill_after_checkpoint(cmd: list[str], run: Path, step: int, group: bool = False) -> int:
    """Start ``cmd``, SIGKILL it (its whole process group with ``group``: DDP ranks) as soon as the checkpoint of
    ``step`` exists; returns the step of the newest checkpoint left behind."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=group)
    target = run / "checkpoints" / f"step{step:07d}.ckpt"
    deadline = time.time() + 240
    try:
        while not target.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared in time"
            time.sleep(0.01)
    finally:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    found = select_checkpoint(run, set_aside_damaged=False)
    assert found is not None
    return found.global_step


def _check(ref: Path, run: Path, key) -> None:
    res = compare_runs(ref, run)
    assert res["steps"] == (MAX_STEPS, MAX_STEPS)
    worst = 0.0
    for part in ("state_dict", "optimizer_states", "lr_schedulers"):
        diff, n, differ = res[part]
        assert not differ, f"{part}: {len(differ)} of {n} entries differ (max |diff| {diff:g}), e.g. {differ[:5]}"
        worst = max(worst, diff)
    assert res["metrics_steps"] == (list(range(MAX_STEPS)),) * 2
    assert not res["metrics_differ"], res["metrics_differ"][:10]
    n = res["state_dict"][1] + res["optimizer_states"][1] + res["lr_schedulers"][1]
    print(f"bitwise resume {key}: max |diff| {worst:g} over {n} tensors, {len(res['metrics_steps'][0])} metric rows")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sigkill_and_restart_is_bitwise_equal_to_an_uninterrupted_run(model, workers, shapes_shards, tmp_path,
                                                                      one_thread):
    """The killed run is a real ``python -m vlp`` process; the uninterrupted run and the restart run the same
    command in this process (``vlp.cli.main``: nothing of the killed process, and global generators in whatever
    state this process left them), on one thread as the child (bitwise equality needs the same kernels)."""
    from vlp.cli import main

    exp = tiny_experiment(model, tmp_path, shapes_shards, max_steps=MAX_STEPS, checkpoint_every_n_steps=EVERY)
    args = ["pretrain", str(exp), f"data.num_workers={workers}", "name=run", "--no-eval"]
    killed_at = _kill_after_checkpoint(vlp_command(*args), tmp_path / "run", KILL_AFTER)
    assert KILL_AFTER <= killed_at < MAX_STEPS, f"the run was not interrupted (newest checkpoint: step {killed_at})"
    assert main(args) == 0
    assert main([a if a != "name=run" else "name=ref" for a in args]) == 0
    _check(tmp_path / "ref", tmp_path / "run", (model, workers))


def test_ddp_two_gloo_ranks_sigkill_and_restart_is_bitwise_equal(shapes_shards, tmp_path):
    exp = tiny_experiment("tcl", tmp_path, shapes_shards, max_steps=MAX_STEPS, checkpoint_every_n_steps=EVERY,
                          devices=2, strategy="ddp")
    args = ["pretrain", str(exp), "data.num_workers=0"]
    _run(vlp_command(*args, "name=ref", "--no-eval"), timeout=400)
    cmd = vlp_command(*args, "name=run", "--no-eval")
    killed_at = _kill_after_checkpoint(cmd, tmp_path / "run", KILL_AFTER, group=True)
    assert KILL_AFTER <= killed_at < MAX_STEPS, f"the run was not interrupted (newest checkpoint: step {killed_at})"
    _run(cmd, timeout=400)
    _check(tmp_path / "ref", tmp_path / "run", ("tcl", "ddp2"))
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
