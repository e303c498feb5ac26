"""The training entry point behind ``vlp pretrain``: config -> run directory -> Lightning Trainer -> evaluation.

A run lives in ``<output_dir>/<name>/``: ``config.yaml`` (resolved; enough to reproduce the run), ``metrics.csv``,
``checkpoints/last.ckpt`` (plus periodic ones), ``results.json`` and ``loss.png``. Running the same command again
resumes from the newest checkpoint there (``last.ckpt`` or a SLURM ``hpc_ckpt_N.ckpt``): the optimizer, schedule,
momentum encoders, queues and the data-stream position come back, so nothing is lost or repeated.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import lightning as L
import torch

from vlp import config as config_lib
from vlp.config import ExperimentConfig

log = logging.getLogger("vlp")


def build_model(cfg: ExperimentConfig):
    from vlp.models import build

    return build(cfg.model, cfg.optim)


def build_datamodule(cfg: ExperimentConfig):
    from vlp.data.datamodule import ShardDataModule

    return ShardDataModule(cfg.data)


def resolve(cfg: ExperimentConfig):
    """The datamodule, and the config with its tokenizer-dependent ``null`` fields filled (vocabulary size,
    special ids), which is what gets saved as the run's config.yaml."""
    import dataclasses

    from vlp.models import bind_tokenizer

    dm = build_datamodule(cfg)
    if cfg.model is not None:
        cfg = dataclasses.replace(cfg, model=bind_tokenizer(cfg.model, dm.tokenizer))
    return cfg, dm


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt`` (written on pre-emption)."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def trim_metrics(metrics_csv: Path, step: int) -> None:
    """Drop rows logged after ``step`` so a resumed run does not repeat them in metrics.csv."""
    if not metrics_csv.exists():
        return
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys()) if rows else None
    if not fields or "step" not in fields:
        return
    kept = [r for r in rows if r["step"] == "" or int(float(r["step"])) < step]
    if len(kept) == len(rows):
        return
    from vlp.utils.io import atomic_open

    with atomic_open(metrics_csv, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


def _trainer(cfg: ExperimentConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        max_time=t.max_time,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches is not None else 0,
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=str(run_dir),
        logger=CSVLogger(save_dir=str(run_dir), name="", version=""),
        callbacks=callbacks,
    )


def pretrain(cfg: ExperimentConfig, evaluate_after: bool = True) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg, dm = resolve(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = find_resume_checkpoint(run_dir)
    if resume is None or not (run_dir / "config.yaml").exists():
        config_lib.save(cfg, run_dir / "config.yaml")
    else:
        saved = config_lib.load(run_dir / "config.yaml")
        if saved != cfg:
            config_lib.save(cfg, run_dir / "config.yaml")
            log.warning("resuming %s with a config that differs from its saved config.yaml", run_dir)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    model.total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else None

    ckpt = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_last=True, save_top_k=-1,
    )
    trainer = _trainer(cfg, run_dir, [ckpt])
    if model.total_steps is None:  # epochs given: the loader's length is known from index.json
        dm.setup("fit")
        model.total_steps = max(1, len(dm.train_dataloader()) * (cfg.trainer.max_epochs or 1)
                                // cfg.trainer.accumulate_grad_batches)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        trim_metrics(run_dir / "metrics.csv", int(state.get("global_step", 0)))
        del state
        print(f"resuming from {resume}")
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume else None)

    if trainer.is_global_zero:
        from vlp.plots import plot_losses

        plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", title=cfg.name)
    if evaluate_after and cfg.data.test:
        from vlp.eval.run import evaluate_retrieval_run

        evaluate_retrieval_run(cfg, model, dm, trainer)
    return run_dir


def evaluate(cfg: ExperimentConfig) -> dict:
    """``vlp evaluate CONFIG ckpt=PATH``: load weights from ``ckpt`` (or the run's last.ckpt) and evaluate."""
    from vlp.eval.run import evaluate_retrieval_run

    ckpt = Path(cfg.ckpt) if cfg.ckpt else find_resume_checkpoint(cfg.run_dir)
    if ckpt is None or not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint to evaluate: ckpt={cfg.ckpt!r} and none in {cfg.run_dir}/checkpoints")
    cfg, dm = resolve(cfg)
    model = build_model(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: state_dict does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    model.eval()
    os.makedirs(cfg.run_dir, exist_ok=True)
    return evaluate_retrieval_run(cfg, model, dm, None, step=int(state.get("global_step", 0)))
