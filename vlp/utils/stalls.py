"""Start-up without inherited locks, and hangs turned into errors (issue #14).

**How loader workers start** (``data.worker_start``). ``fork`` copies the parent process as it is, including every
lock that one of its other threads held at that instant; a thread that exists only in the parent never releases it,
so the child can block forever just after ``os.fork`` (a futex wait). A training rank runs such threads: gloo's
communication threads, a DataLoader's queue feeder and pin-memory threads, OpenMP's pool, the tokenizer's pool.
``forkserver`` forks every worker from a small single-threaded server process instead (started once per process,
with ``torch`` and the data pipeline imported in it, so a worker is ready in a fraction of a second); ``spawn`` starts
a fresh interpreter per worker (always safe, slowest: every worker imports torch again, at every epoch). ``auto``
picks ``forkserver`` when a process group is initialised or the process runs more than one thread (counted from
``/proc/self/task``, so native threads count too), else ``fork``, which is then safe and the cheapest. With
``forkserver``/``spawn`` a worker receives the dataset pickled (``ShardStream``: sources, processor, collator,
tokenizer) and re-imports the main module if it is a script (guard it with ``if __name__ == "__main__"``).

**Timeouts** (``data.loader_timeout_s``, ``data.loader_start_timeout_s``, ``trainer.collective_timeout_s``,
``trainer.rendezvous_timeout_s``). A rank whose loader produces no batch within the timeout (the first batch of a
fresh loader gets the longer start timeout) raises :class:`StallError` naming the rank and the loader; a rank that
waits in a collective longer than the process group's timeout (or for the other ranks to join the group longer than
the rendezvous timeout) gets gloo's/NCCL's/the store's timeout error, which :func:`collective_failure` turns into a
:class:`StallError` naming the rank; a launching rank that fails stops the ranks it launched. ``vlp`` prints the
message as one line (no traceback); the same command then resumes the run from its last checkpoint. The loader
timeouts should stay below the collective timeout, so that the stuck rank reports its own cause before the others
time out waiting for it.

**Forcing a stall** (tests, demonstrations): ``VLP_DEBUG_STALL`` holds comma-separated ``loader@RANK`` (every loader
worker of rank RANK sleeps as soon as it starts, as a worker deadlocked after fork would) and ``step@RANK:STEP``
(rank RANK's main process sleeps before training step STEP, so the other ranks wait for it in a collective).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from typing import Optional

WORKER_STARTS = ("auto", "fork", "forkserver", "spawn")
# Imported once in the forkserver process, so that each worker forked from it starts with them loaded.
FORKSERVER_PRELOAD = ["torch", "vlp.data.datamodule"]
STALL_ENV = "VLP_DEBUG_STALL"
RESUME_HINT = "The same command resumes the run from its last checkpoint."


class StallError(RuntimeError):
    """A rank waited longer than its timeout for a batch or for the other ranks, or lost the ranks it waited for; the
    message names the rank, what it waited for and the config value that bounds the wait. ``kind``: ``"loader"``,
    ``"collective"`` (timed out) or ``"peer"`` (another rank left)."""

    def __init__(self, message: str, kind: str = "loader"):
        super().__init__(message)
        self.kind = kind


# -- worker start method -------------------------------------------------------------------------------------------
def thread_count() -> int:
    """Threads of this process, native ones included (Linux: ``/proc/self/task``; elsewhere Python's threads)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def distributed_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def resolve_worker_start(method: str) -> str:
    """The start method for ``data.worker_start`` (see the module docstring for ``auto``)."""
    if method not in WORKER_STARTS:
        raise ValueError(f"worker_start must be one of {', '.join(WORKER_STARTS)}, got {method!r}")
    available = multiprocessing.get_all_start_methods()
    if method == "auto":
        if "fork" not in available:
            return "spawn"
        if distributed_initialized() or thread_count() > 1:
            return "forkserver" if "forkserver" in available else "spawn"
        return "fork"
    if method not in available:
        raise ValueError(f"data.worker_start={method!r} is not available on this platform (available: "
                         f"{', '.join(available)})")
    return method


def worker_context(method: str, num_workers: int):
    """The multiprocessing context for a DataLoader's ``num_workers`` workers (None without workers)."""
    if num_workers <= 0:
        return None
    ctx = multiprocessing.get_context(resolve_worker_start(method))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server starts (once per process)
    return ctx


def prestart_worker_server(method: str, num_workers: int, distributed: bool) -> bool:
    """Start the forkserver now when the loaders will use it (``forkserver``, or ``auto`` in a run of several ranks
    or a process that already runs other threads), so that importing torch and the pipeline in it overlaps with the
    rest of the start-up instead of delaying the first batch. Returns whether it did."""
    if num_workers <= 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if not (method == "forkserver" or (method == "auto" and (distributed or thread_count() > 1))):
        return False
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    forkserver.ensure_running()  # spawns the server (fork+exec, thread-safe) and returns; it imports in the background
    return True


# -- who is waiting ------------------------------------------------------------------------------------------------
def rank_name(rank: Optional[int] = None) -> str:
    """``"rank R"`` of this process: the process group's, else Lightning's (set before the group exists), else the
    launcher's ``RANK``, else 0."""
    if rank is None and distributed_initialized():
        import torch.distributed as dist

        rank = dist.get_rank()
    if rank is None and "lightning.fabric.utilities.rank_zero" in sys.modules:
        rank = getattr(sys.modules["lightning.fabric.utilities.rank_zero"].rank_zero_only, "rank", None)
    if rank is None and os.environ.get("RANK", "").isdigit():
        rank = int(os.environ["RANK"])
    return f"rank {rank if rank is not None else 0}"


# Gloo / NCCL / c10d store messages of a collective that waited past the process group's timeout, and of one whose
# peer went away (closed its connections by exiting, normally because it failed first).
_TIMEOUT = re.compile(r"timed out|timeout|watchdog caught collective operation", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|"
                        r"socket closed|connection refused|NCCL communicator was aborted", re.IGNORECASE)


def collective_failure(exc: BaseException, timeout_s: Optional[float],
                       rendezvous_s: Optional[float] = None) -> Optional[StallError]:
    """A :class:`StallError` for ``exc`` when it is a collective that timed out or lost its peers, or a rendezvous
    that timed out, else None.

    Only errors of the distributed backend (``torch.distributed.DistError`` and the ``RuntimeError``s gloo raises)
    are considered: the store's timeout before the process group exists, the others in a process that has one."""
    if isinstance(exc, StallError):
        return None
    if not distributed_initialized():
        if type(exc).__name__ == "DistStoreError" and _TIMEOUT.search(str(exc)):  # the rendezvous
            limit = rendezvous_s if rendezvous_s is not None else timeout_s
            limit = f"{limit:g} s" if limit else "the process group's timeout"
            return StallError(f"{rank_name()}: the ranks did not all join the process group within {limit} "
                              f"(trainer.rendezvous_timeout_s; {str(exc).strip()[:200]}): a rank failed to start or "
                              f"is stuck before it. {RESUME_HINT}", kind="collective")
        return None
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    if not isinstance(exc, (RuntimeError, dist_error) if dist_error else RuntimeError):
        return None
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    who = rank_name()
    if _PEER_GONE.search(text):
        return StallError(f"{who}: another rank left the process group while this one waited for it in a collective "
                          f"({first[:200]}); that rank's own error says why. {RESUME_HINT}", kind="peer")
    if _TIMEOUT.search(text):
        limit = f"{timeout_s:g} s" if timeout_s else "the process group's timeout"
        return StallError(f"{who}: waited more than {limit} (trainer.collective_timeout_s) for the other ranks in a "
                          f"collective: another rank is stuck or far behind ({first[:200]}). "
                          f"{RESUME_HINT}", kind="collective")
    return None


def ranks_failed_first(failed: dict[int, int]) -> StallError:
    """This rank's error when the ranks it launched failed first (``failed``: rank -> exit status)."""
    who = ", ".join(f"rank {r} (exit status {c})" for r, c in sorted(failed.items()))
    return StallError(f"{rank_name()}: stopped because {who} failed while this rank waited for it in a collective; "
                      f"its error is above. {RESUME_HINT}", kind="peer")


def loader_stall(what: str, timeout_s: float, first: bool, method: Optional[str], num_workers: int) -> StallError:
    """The error of a loader (``what``: "the training loader", ...) that produced no batch within ``timeout_s``."""
    which = ("the first batch of a fresh loader: data.loader_start_timeout_s" if first
             else "a later batch: data.loader_timeout_s")
    start = f", started with {method!r}" if method else ""
    hint = (" (a worker forked from a multi-threaded process can deadlock just after fork: use "
            "data.worker_start=forkserver or spawn)" if method == "fork" else "")
    workers = f"{num_workers} worker process{'es' if num_workers != 1 else ''}"
    return StallError(f"{rank_name()}: {what} ({workers}{start}) produced no batch within "
                      f"{timeout_s:g} s ({which}): a worker is stuck or reading far too slowly{hint}. {RESUME_HINT}")


# -- forced stalls (VLP_DEBUG_STALL) -------------------------------------------------------------------------------
def requested_stalls(env: Optional[str] = None) -> list[tuple[str, int, Optional[int]]]:
    """``VLP_DEBUG_STALL`` parsed: ``[(kind, rank, step or None), ...]``."""
    spec = os.environ.get(STALL_ENV, "") if env is None else env
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(loader|step)@(\d+)(?::(\d+))?", part)
        if not m or (m[1] == "step") != (m[3] is not None):
            raise ValueError(f"{STALL_ENV}={spec!r}: expected comma-separated loader@RANK or step@RANK:STEP")
        out.append((m[1], int(m[2]), int(m[3]) if m[3] is not None else None))
    return out


def _parent_sentinel():
    """A handle that becomes ready when the process that started this one ends: multiprocessing's parent sentinel
    in a worker (valid for forkserver workers too, whose OS parent is the server), else None."""
    parent = multiprocessing.parent_process()
    return parent.sentinel if parent is not None else None


def _sleep_while_parent_lives() -> None:
    """Sleep "forever", but end with the process that started this one (so a forced stall leaves no orphan)."""
    sentinel, parent = _parent_sentinel(), os.getppid()
    if sentinel is not None:
        from multiprocessing.connection import wait

        wait([sentinel])
    else:
        while os.getppid() == parent:
            time.sleep(0.5)
    os._exit(1)


def _exit_when_ready(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])
    os._exit(0)


class WorkerInit:
    """The ``worker_init_fn`` of vlp's loaders (picklable, for forkserver/spawn). In each worker:

    * SIGUSR1 and SIGINT are ignored: they are for the rank (SLURM's pre-emption notice, Ctrl-C);
    * a worker whose OS parent is not the process that started it (a forkserver worker) gets a daemon thread that
      ends it when that process ends: torch's worker only checks ``os.getppid()``, which is the server, so a rank
      killed hard (SIGKILL, OOM) would otherwise leave its workers, and the server they keep alive, behind forever;
    * ``stall``: the worker sleeps (``VLP_DEBUG_STALL=loader@RANK``) as a worker deadlocked after fork would;
    * then the loader's own ``worker_init_fn`` runs (``inner``: e.g. Lightning's per-worker seeding)."""

    def __init__(self, inner=None, stall: bool = False):
        self.inner, self.stall = inner, stall

    def __call__(self, worker_id: int) -> None:
        # SLURM signals every process of a job step: SIGUSR1 (pre-emption notice) is the rank's to handle
        # (vlp.utils.slurm); its default action would kill a forkserver-started worker under the rank's feet.
        # Likewise a terminal's Ctrl-C reaches every process of the group: the rank stops its workers itself
        # (vlp.utils.interrupt); a worker ended by SIGINT would add "DataLoader worker exited unexpectedly".
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid != os.getppid():
            threading.Thread(target=_exit_when_ready, args=(parent.sentinel,), daemon=True,
                             name="vlp-parent-watch").start()
        if self.stall:
            _sleep_while_parent_lives()
        if self.inner is not None:
            self.inner(worker_id)


def stall_requested(kind: str, rank: int) -> bool:
    """Whether ``VLP_DEBUG_STALL`` asks ``rank`` to stall in ``kind`` (``loader``)."""
    return any(k == kind and r == rank for k, r, _ in requested_stalls())


def trainer_callbacks(collective_timeout_s: float) -> list:
    """Lightning callbacks: ``CollectiveTimeout`` (the process group was created with the rendezvous timeout,
    ``trainer.rendezvous_timeout_s``, which bounds the start; from ``setup`` on every collective gets
    ``trainer.collective_timeout_s``) and the ``step@RANK:STEP`` stalls of ``VLP_DEBUG_STALL``."""
    import lightning as L

    class CollectiveTimeout(L.Callback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            if distributed_initialized():
                from datetime import timedelta

                import torch.distributed as dist

                dist.set_timeout(timedelta(seconds=collective_timeout_s))

    callbacks = [CollectiveTimeout()]
    steps = [(r, s) for k, r, s in requested_stalls() if k == "step"]
    if steps:
        class StallStep(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if (trainer.global_rank, trainer.global_step) in steps:
                    print(f"{STALL_ENV}: rank {trainer.global_rank} stalls before step {trainer.global_step}",
                          flush=True)
                    _sleep_while_parent_lives()

        callbacks.append(StallStep())
    return callbacks


__all__ = ["StallError", "WORKER_STARTS", "resolve_worker_start", "worker_context", "prestart_worker_server",
           "collective_failure", "ranks_failed_first", "loader_stall", "requested_stalls", "stall_requested",
           "WorkerInit", "trainer_callbacks", "rank_name", "thread_count"]
