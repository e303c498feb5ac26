"""Issue #14: a 2-rank CPU DDP run with loader workers starts every time (no worker inherits a lock held by another
thread of its rank), and a rank that stalls ends the run with one error naming it, after which the same command
resumes from the last checkpoint."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pretrain_cli import TINY, _env, read_steps

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments/tcl/tiny.yaml")
STARTS = 5


def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout every process of the run (ranks, forkservers,
    loader workers) is killed, not only the launching rank."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{(out + err)[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ddp_args(shards: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.train=[{{path: {shards}/coco/train}}]", "data.test=null", "data.num_workers=2",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", *extra]


def test_ddp_run_with_workers_starts_every_time(shapes_shards, tmp_path):
    """STARTS start-ups, each a fresh process group and fresh loader workers (forkserver under ``auto``), inside
    one launched pair of ranks; a start that hangs fails within the short timeouts instead of blocking."""
    cmd = [sys.executable, str(ROOT / "tests/_ddp_startup_check.py"), "--starts", str(STARTS), "--out", str(tmp_path),
           "--", CONFIG, *ddp_args(shapes_shards, "trainer.max_steps=1", "trainer.collective_timeout_s=60",
                                   "trainer.rendezvous_timeout_s=120",
                                   "data.loader_start_timeout_s=30", "data.loader_timeout_s=30"), "--no-eval"]
    out = run(cmd, _env(), timeout=120 + 20 * STARTS)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for rank in (0, 1):
        done = [line for line in out.stdout.splitlines() if line.startswith(f"rank {rank} start ")]
        assert len(done) == STARTS and all(line.endswith("worker_start=forkserver") for line in done), log[-4000:]


def run_cli(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "vlp", "pretrain", CONFIG, *args, "--no-eval"], env, timeout)


def test_a_stalled_rank_ends_in_its_timeout_error_and_the_same_command_resumes(shapes_shards, tmp_path):
    """Rank 1's loader workers hang at start (as after a deadlocked fork): rank 1 names its loader; then rank 1
    hangs before step 2: rank 0 names the collective; then the same command resumes from step 2 and finishes."""
    args = ddp_args(shapes_shards, f"output_dir={tmp_path}", "name=stalled", "trainer.max_steps=3",
                    "trainer.checkpoint_every_n_steps=1", "trainer.rendezvous_timeout_s=120",
                    "data.loader_start_timeout_s=3", "data.loader_timeout_s=3")
    ckpts = tmp_path / "stalled" / "checkpoints"
    for stall, timeout, expect in [
        ("loader@1", 60, "error: rank 1: the training loader (2 worker processes, started with 'forkserver') "
                         "produced no batch within 3 s (the first batch of a fresh loader: "
                         "data.loader_start_timeout_s)"),
        ("step@1:2", 12, "error: rank 0: waited more than 12 s (trainer.collective_timeout_s) for the other ranks in "
                         "a collective"),
    ]:
        out = run_cli([*args, f"trainer.collective_timeout_s={timeout}"], {**_env(), "VLP_DEBUG_STALL": stall})
        log = out.stdout + out.stderr
        assert out.returncode != 0 and expect in out.stderr, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert all(line.endswith("The same command resumes the run from its last checkpoint.") for line in errors)
        found = sorted(p.name for p in ckpts.glob("step*.ckpt")) if ckpts.is_dir() else []
        assert (found == []) if stall.startswith("loader") else ("step0000002.ckpt" in found), found
    again = run_cli([*args, "trainer.collective_timeout_s=12"], _env())
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming from" in again.stdout
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    assert read_steps(tmp_path / "stalled" / "metrics.csv") == [0, 1, 2]


# -- one process: the start methods and the loader timeout -----------------------------------------------------------
def loader_cfg(shards: Path, **kw):
    from vlp.data.config import ShardsDataConfig, SourceConfig

    return ShardsDataConfig(train=[SourceConfig(f"{shards}/coco/train")], batch_size=8, image_size=32, num_workers=2,
                            **kw)


def test_forkserver_workers_give_the_batches_of_fork_workers_and_resume_exactly(shapes_shards):
    """Everything a worker needs pickles (stream, processor, collator, tokenizer), and the batches and the resumed
    position do not depend on how the workers started."""
    from vlp.data.datamodule import ShardDataModule

    def batches(method, start=0):
        dm = ShardDataModule(loader_cfg(shapes_shards, worker_start=method))
        loader = dm.train_dataloader()
        if start:
            dm.load_state_dict({"version": 1, "epoch": 0, "batches": start})
        assert loader.worker_start == method
        return [(b["keys"], b["image"], b["input_ids"]) for b in loader]

    forked = batches("fork")
    served = batches("forkserver")
    assert len(forked) > 3 and [k for k, _, _ in served] == [k for k, _, _ in forked]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(forked, served))
    resumed = batches("forkserver", start=3)
    assert [k for k, _, _ in resumed] == [k for k, _, _ in forked[3:]]


def test_auto_start_is_forkserver_once_threads_exist():
    import threading

    from vlp.utils.stalls import resolve_worker_start, thread_count

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert thread_count() > 1 and resolve_worker_start("auto") == "forkserver"
    finally:
        stop.set()
        t.join()
    assert resolve_worker_start("spawn") == "spawn"
    with pytest.raises(ValueError, match="worker_start must be one of"):
        resolve_worker_start("thread")


def test_a_stuck_worker_ends_in_the_loader_timeout(shapes_shards, monkeypatch):
    from vlp.data.datamodule import ShardDataModule
    from vlp.utils.stalls import StallError

    monkeypatch.setenv("VLP_DEBUG_STALL", "loader@0")
    dm = ShardDataModule(loader_cfg(shapes_shards, worker_start="fork", loader_start_timeout_s=1))
    with pytest.raises(StallError, match=r"^rank 0: the training loader \(2 worker processes, started with 'fork'\) "
                                         r"produced no batch within 1 s \(the first batch .*use "
                                         r"data.worker_start=forkserver or spawn"):
        next(iter(dm.train_dataloader()))


def test_stall_spec_is_checked():
    from vlp.utils.stalls import requested_stalls

    assert requested_stalls("loader@1, step@0:2") == [("loader", 1, None), ("step", 0, 2)]
    with pytest.raises(ValueError, match="VLP_DEBUG_STALL"):
        requested_stalls("step@1")
