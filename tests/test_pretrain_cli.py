"""End to end through the CLI on a small shapes world: TCL and its ALBEF ablation pre-train, evaluate and leave a
complete run directory; a run killed with SIGKILL and restarted with the same command continues from last.ckpt."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlp.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = [  # a model small enough for seconds of training
    "model.vision.img_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
    "model.vision.heads=2", "model.text.hidden=32", "model.text.layers=2", "model.text.heads=2",
    "model.text.intermediate=64", "model.text.fusion_layers=1", "model.text.encoder_width=32", "model.embed_dim=16",
    "model.queue_size=64", "model.alpha_warmup_steps=2", "data.image_size=32", "data.batch_size=8",
    "data.eval_batch_size=32", "data.num_workers=0", "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
    "eval.k_test=4", "trainer.enable_progress_bar=false",
    "trainer.throughput=false",  # FLOP counting costs seconds per start; tests/test_throughput.py covers it
]


@pytest.fixture(scope="module")
def shards(shapes_shards):
    return shapes_shards


def data_args(shards: Path) -> list[str]:
    return [f"data.train=[{{path: {shards}/coco/train}}]", f"data.test={shards}/coco/test"]


def read_steps(metrics_csv: Path) -> list[int]:
    with metrics_csv.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("config,name,parts", [
    ("experiments/tcl/tiny.yaml", "tcl", {"train/ita_lmi_text", "train/ita_i2i"}),
    ("experiments/tcl/ablations/albef.yaml", "albef", set()),
])
def test_pretrain_writes_a_complete_run(shards, tmp_path, config, name, parts):
    args = ["pretrain", str(ROOT / config), *TINY, *data_args(shards), f"output_dir={tmp_path}",
            f"name={name}", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3"]
    assert main(args) == 0
    run = tmp_path / name
    for f in ("config.yaml", "metrics.csv", "loss.png", "checkpoints/last.ckpt", "results.json"):
        assert (run / f).is_file(), f
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "tcl" and results["step"] == 6
    assert set(results["retrieval"]) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert results["retrieval_protocol"] == "contrastive+itm"  # TCL's: ITC top-k re-ranked by ITM
    # `vlp evaluate` on the saved last.ckpt reproduces the numbers evaluated in memory after training: the weights
    # that were evaluated are the ones saved, and evaluation is deterministic.
    again = tmp_path / "again"
    assert main(["evaluate", str(ROOT / config), *TINY, *data_args(shards), f"output_dir={again}", f"name={name}",
                 f"ckpt={run / 'checkpoints' / 'last.ckpt'}"]) == 0
    evaluated = json.loads((again / name / "results.json").read_text())
    assert evaluated["retrieval"] == results["retrieval"] and evaluated["step"] == 6
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert parts <= set(header)
    if not parts:  # ALBEF: no intra-modal or local-MI terms at all
        assert not any(h.startswith(("train/ita_i2i", "train/ita_lmi")) for h in header)
    assert read_steps(run / "metrics.csv") == list(range(6))
    # The saved config reproduces the run: it loads and carries the tokenizer-resolved vocabulary size.
    from vlp import config as config_lib

    saved = config_lib.load(run / "config.yaml")
    assert saved.model.text.vocab_size is not None and saved.trainer.max_steps == 6


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PL_", "SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_"))}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_sigkill_then_same_command_resumes_from_last_checkpoint(shards, tmp_path):
    cmd = [sys.executable, "-m", "vlp", "pretrain", str(ROOT / "experiments/tcl/tiny.yaml"), *TINY,
           *data_args(shards), f"output_dir={tmp_path}", "name=killed", "trainer.max_steps=40",
           "trainer.checkpoint_every_n_steps=4", "--no-eval"]
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step0000008.ckpt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    killed_at = torch.load(newest, map_location="cpu", weights_only=True)["global_step"]
    assert 8 <= killed_at < 40

    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from {newest}" in out.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 40
    steps = read_steps(run / "metrics.csv")
    assert steps == list(range(40)), "a logged step was lost or repeated"
