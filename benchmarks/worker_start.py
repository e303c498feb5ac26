"""Benchmark: what starting the loader workers costs with each ``data.worker_start`` (fork, forkserver, spawn).

For each start method, a fresh Python process builds the training loader of ``ShardDataModule`` (``--workers``
workers, batches of ``--batch-size`` at ``--image-size`` px) over ``--data`` (default: the shapes world's COCO train
shards, ``make shapes``) and iterates it ``--loaders`` times, as the epochs of a run do (``persistent_workers=False``:
every epoch starts fresh workers). Reported per method: seconds from ``iter(loader)`` to the first batch for the
first loader of the process (``forkserver``: includes starting the server, once per process) and the median of the
later ones, and the seconds for the next ``--batches`` batches (the steady state, which the start method must not
change). ``--threads`` starts idle Python threads first, as a training rank has (the fork hazard; it does not change
the timings). Results go to ``benchmarks/results/worker_start.json``.

    python benchmarks/worker_start.py [--data DIR] [--workers 2] [--loaders 4] [--methods fork forkserver spawn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine, write_json


def measure(args) -> dict:
    """In this process: build the loader with ``args.method`` and time ``args.loaders`` fresh iterations."""
    import threading

    import torch

    from vlp.data.config import ShardsDataConfig, SourceConfig
    from vlp.data.datamodule import ShardDataModule

    torch.set_num_threads(1)
    stop = threading.Event()
    for _ in range(args.threads):
        threading.Thread(target=stop.wait, daemon=True).start()
    cfg = ShardsDataConfig(train=[SourceConfig(str(args.data))], batch_size=args.batch_size,
                           image_size=args.image_size, num_workers=args.workers, worker_start=args.method)
    dm = ShardDataModule(cfg)
    dm.tokenizer  # noqa: B018 - loaded before timing, as a run does
    first, rest = [], []
    loader = dm.train_dataloader()
    for _ in range(args.loaders):
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rest.append(time.perf_counter() - t0)
        del it
    stop.set()
    return {"method": loader.worker_start or "in-process", "first_batch_first_loader_s": round(first[0], 3),
            "first_batch_later_loaders_s": round(statistics.median(first[1:]), 3) if len(first) > 1 else None,
            f"next_{args.batches}_batches_s": round(statistics.median(rest), 3), "all_first_batch_s":
            [round(x, 3) for x in first]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "shards" / "shapes" / "coco" / "train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--loaders", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["fork", "forkserver", "spawn"])
    ap.add_argument("--method", help=argparse.SUPPRESS)  # the measuring child process
    ap.add_argument("--out", type=Path, default=RESULTS / "worker_start.json")
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(measure(args)))
        return {}
    if not (args.data / "index.json").is_file():
        raise SystemExit(f"{args.data}/index.json not found: run `make shapes` or pass --data DIR")
    info = machine("cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--method", method, "--data", str(args.data), "--workers", str(args.workers),
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--loaders",
               str(args.loaders), "--batches", str(args.batches), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    result = {"machine": info,
              "data": str(args.data), "workers": args.workers, "batch_size": args.batch_size,
              "image_size": args.image_size, "results": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
