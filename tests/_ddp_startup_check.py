"""Repeated start-ups of a 2-rank CPU DDP pre-training run with loader workers (issue #14), in one launched pair of
processes (run by tests/test_ddp_startup.py; not collected by pytest).

    python tests/_ddp_startup_check.py --starts N [--out DIR] -- CONFIG key=value ...   (plus --no-eval)

Each start is ``vlp pretrain CONFIG key=value ... output_dir=DIR name=startI --no-eval`` through ``vlp.cli.main``
with the overrides asking for ``trainer.strategy=ddp`` and ``data.num_workers>0``: Lightning launches this script
again as rank 1 (once, with the same arguments, so both ranks run the same loop), and every start creates a fresh
process group (the previous one is destroyed, and the next one rendezvouses on a new port that rank 0 picks and
broadcasts) and fresh loader workers (a new loader per run). Each rank prints ``rank R start I ok SECONDS
worker_start=METHOD`` per finished start; exit status 0 when every start finished.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("pretrain_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    pretrain_args = [a for a in args.pretrain_args if a != "--"]

    import torch.distributed as dist

    from vlp.cli import main as vlp_main
    from vlp.utils.stalls import resolve_worker_start

    for i in range(args.starts):
        t0 = time.perf_counter()
        flags = [a for a in pretrain_args if a.startswith("--")]
        rc = vlp_main(["pretrain", *[a for a in pretrain_args if a not in flags], f"output_dir={args.out}",
                       f"name=start{i}", *flags])
        if rc != 0:
            print(f"start {i} failed with exit status {rc}", flush=True)
            return rc
        rank = dist.get_rank()
        method = resolve_worker_start(next((a.split("=", 1)[1] for a in reversed(pretrain_args)
                                            if a.startswith("data.worker_start=")), "auto"))
        print(f"rank {rank} start {i} ok {time.perf_counter() - t0:.2f} worker_start={method}", flush=True)
        # A fresh process group for the next start: a new rendezvous port, agreed through the current group.
        port = [free_port() if rank == 0 else None]
        dist.broadcast_object_list(port, src=0)
        dist.barrier()
        dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(port[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
