"""Helpers for tests that run ``vlp pretrain`` end to end on the session's shapes world with a registered model's
``tiny()`` config: the experiment file, the subprocess environment, and exact comparisons of two runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from vlp.utils.throughput import THROUGHPUT_KEYS  # wall-clock rates: the only columns two equal runs may differ in

ROOT = Path(__file__).resolve().parents[1]


def tiny_experiment(name: str, out_dir: Path, shards: Path, task: str = "pretrain", queue_size: int | None = 32,
                    **trainer) -> Path:
    """An experiment file with model ``name``'s ``tiny()`` config (vocabulary and pad id from the world's tokenizer;
    a region model's feature width and classes from the world's region spec; ``queue_size`` where the model has a
    feature queue) and a seconds-sized data / optim / trainer setup: pre-training on ``coco/`` or, with
    ``task="vqa"``, VQA fine-tuning on ``vqa/`` (``num_answers`` from the data). ``trainer`` entries override the
    trainer section; the run is ``<out_dir>/<name>`` (``<name>-vqa`` for VQA)."""
    from vlp.models import _import

    cfg_cls, cls = _import(name)
    model = dataclasses.asdict(cfg_cls.tiny())
    if isinstance(model.get("text"), dict):
        model["text"].update(vocab_size=None, pad_token_id=None)
    if "regions" in cls.READS:  # the feature width and detector classes of the world's regions.npz
        spec = json.loads((shards / "coco/train/index.json").read_text())["regions"]
        model["region_dim"] = spec["dim"]
        if "region_classes" in model:
            model["region_classes"] = spec["num_classes"]
    if "phrase_vocab_size" in model:  # from the world's phrase vocabulary
        model["phrase_vocab_size"] = None
    if "queue_size" in model and queue_size is not None:
        model["queue_size"] = queue_size
    size = model["vision"]["img_size"] if isinstance(model.get("vision"), dict) else 32
    source = {"pretrain": "coco", "vqa": "vqa"}[task]
    data = {"train": [{"path": str(shards / source / "train")}], "test": str(shards / source / "test"),
            "batch_size": 8, "eval_batch_size": 16, "num_workers": 0, "image_size": size}
    if task == "vqa":
        model["num_answers"] = 0
        data["task"] = "vqa"
    run = name if task == "pretrain" else f"{name}-{task}"
    exp = {"name": run, "output_dir": str(out_dir), "model": model, "data": data,
           "optim": {"lr": 1e-3, "warmup_steps": 2},
           "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 12, "log_every_n_steps": 1,
                       "checkpoint_every_n_steps": 3, "enable_progress_bar": False,
                       "throughput": False,  # FLOP counting and the CPU peak probe: tests/test_throughput.py's business
                       **trainer},
           "eval": {"k_test": 4, "captions": "first", "progress": False}}
    path = out_dir / f"{run}.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(exp))
    return path


def subprocess_env(threads: int = 1) -> dict:
    """The environment of a ``python -m vlp`` child: no launcher variables leaked from this process (a child would
    think it is a DDP rank already), no network, and a fixed thread count (bitwise comparisons need the same one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PL_", "SLURM_", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE",
                               "RANK", "MASTER_", "TORCHELASTIC_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def vlp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlp", *args]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics_rows(run: Path) -> dict[int, dict]:
    """metrics.csv as {step: {column: text}} (empty cells dropped); a repeated step fails."""
    rows: dict[int, dict] = {}
    with (run / "metrics.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if not r.get("step"):
                continue
            step = int(float(r["step"]))
            assert step not in rows, f"step {step} logged twice in {run / 'metrics.csv'}"
            rows[step] = {k: v for k, v in r.items() if v not in ("", None)}
    return rows


def _tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor in a nested structure, and (path, value) of every other leaf."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def max_abs_diff(a, b) -> tuple[float, int, list[str]]:
    """Compare two nested structures of tensors and plain values exactly: (max |a - b| over float tensors, the number
    of tensors compared, the paths that differ at all)."""
    la, lb = list(_tensors(a)), list(_tensors(b))
    assert [p for p, _ in la] == [p for p, _ in lb], "different structure"
    worst, n, differ = 0.0, 0, []
    for (path, x), (_, y) in zip(la, lb):
        if isinstance(x, torch.Tensor):
            n += 1
            assert isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype, path
            if not torch.equal(x, y):
                differ.append(path)
                if x.is_floating_point():
                    worst = max(worst, float((x.double() - y.double()).abs().nan_to_num(float("inf")).max()))
                else:
                    worst = max(worst, float("inf"))
        elif x != y:
            differ.append(path)
    return worst, n, differ


def compare_runs(a: Path, b: Path) -> dict:
    """Final state of two run directories: every tensor of last.ckpt's state_dict, optimizer and scheduler states,
    and every logged value of metrics.csv. Returns the figures; the caller asserts on them."""
    ca, cb = load(a / "checkpoints" / "last.ckpt"), load(b / "checkpoints" / "last.ckpt")
    out = {"steps": (ca["global_step"], cb["global_step"])}
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        out[key] = max_abs_diff(ca[key], cb[key])
    ra, rb = metrics_rows(a), metrics_rows(b)
    out["metrics_steps"] = (sorted(ra), sorted(rb))
    out["metrics_differ"] = [(s, k) for s in sorted(set(ra) | set(rb))
                             for k in sorted(set(ra.get(s, {})) | set(rb.get(s, {})))
                             if k not in THROUGHPUT_KEYS and ra.get(s, {}).get(k) != rb.get(s, {}).get(k)]
    return out
