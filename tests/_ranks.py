"""Two-process gloo tests without a launcher: the test starts ``python WORKER RANK WORLD STORE OUT`` once per rank
(``launch``), each rank joins the group through a FileStore in OUT (``gloo_group``), saves ``OUT/rank{RANK}.pt``
and the test compares what the ranks saved. Lightning is not involved, so a test sees exactly what DDP or FSDP does
with the model."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


def launch(worker: Path, out: Path, world: int = 2, timeout: float = 240) -> list[dict]:
    """Run ``world`` ranks of ``worker`` (a clean environment: no launcher variables, one thread) and return what
    each saved; a rank that fails fails the test with its output."""
    import torch

    from _tiny_runs import subprocess_env

    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(out / "store"), str(out)],
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [f"rank {r} (exit {p.returncode}):\n{log[-4000:]}" for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def rank_args() -> tuple[int, int, str, Path]:
    """A worker's ``RANK WORLD STORE OUT`` arguments."""
    rank, world, store, out = sys.argv[1:5]
    return int(rank), int(world), store, Path(out)


@contextmanager
def gloo_group(rank: int, world: int, store: str):
    """The process group for the body; the ranks leave it together (a rank that finished first does not tear down
    the store under one still saving)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def one_task_per_step(cls):
    """UNITER as a Trainer runs it, outside a Trainer: the optimizer step is ``position`` (set by the test loop)
    and tasks are sampled in training, one per step, the unused heads touched with a zero weight."""
    class Sampled(cls):
        position = 0

        @property
        def global_step(self) -> int:
            return self.position

        def sampling(self) -> bool:
            return self.training

    return Sampled
