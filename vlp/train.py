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
    """The newest complete checkpoint of the run: ``checkpoints/*.ckpt`` (``last.ckpt`` is written right after the
    periodic one, so a kill in between leaves the periodic one newest) or SLURM's ``hpc_ckpt_*.ckpt`` (written on
    pre-emption). Checkpoints are written atomically, so whatever exists is whole."""
    candidates = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def restore_metrics(metrics_csv: Path, checkpoint: dict) -> None:
    """Make metrics.csv hold exactly the rows of the steps a resumed checkpoint covers.

    Rows logged after the checkpoint's step are dropped (the resumed run logs them again). Lightning hands a step's
    metrics to the logger only after the checkpoint callbacks of that step ran, so the checkpoint carries its own
    step's row (``vlp_metrics_row``) and it is appended here when a kill lost it.
    """
    step = int(checkpoint.get("global_step", 0))
    rows, fields = [], []
    if metrics_csv.exists():
        with metrics_csv.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < step]
    pending = checkpoint.get("vlp_metrics_row")
    if pending and not any(r.get("step") and int(float(r["step"])) == pending["step"] for r in kept):
        kept.append({k: v for k, v in pending.items()})
        fields = sorted(set(fields) | set(pending))
    if len(kept) == len(rows) or not fields:
        return
    from vlp.utils.io import atomic_open

    with atomic_open(metrics_csv, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)


class FlushMetricsOnCheckpoint(L.Callback):
    """Write pending metrics.csv rows whenever a checkpoint is saved, so a killed run loses no logged step that
    its checkpoint covers (rows logged after the checkpoint are trimmed on resume instead of repeated)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.logger is not None:
            trainer.logger.save()
        # The row of the step being checkpointed reaches the logger only after this hook; keep it with the state.
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "data/"))}
        if row:
            checkpoint["vlp_metrics_row"] = {**row, "step": trainer.global_step - 1, "epoch": trainer.current_epoch}


def _csv_logger(run_dir: Path):
    """Lightning's CSVLogger writing ``<run>/metrics.csv``, except that it continues an existing file (trimmed to the
    resumed step by ``restore_metrics``) instead of deleting it, as the stock writer does when its directory is not
    empty."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class ContinuingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    header = next(csv.reader(f), [])
                self.metrics_keys = sorted(header)

    class ContinuingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ContinuingWriter(log_dir=self.log_dir)
            return self._experiment

    return ContinuingCSVLogger(save_dir=str(run_dir), name="", version="")


def _trainer(cfg: ExperimentConfig, run_dir: Path, callbacks: list) -> L.Trainer:
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
        logger=_csv_logger(run_dir),
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
    trainer = _trainer(cfg, run_dir, [ckpt, FlushMetricsOnCheckpoint()])
    if model.total_steps is None:  # epochs given: the loader's length is known from index.json
        dm.setup("fit")
        model.total_steps = max(1, len(dm.train_dataloader()) * (cfg.trainer.max_epochs or 1)
                                // cfg.trainer.accumulate_grad_batches)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        restore_metrics(run_dir / "metrics.csv", state)
        del state
        print(f"resuming from {resume}")
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume else None)

    if trainer.is_global_zero:
        from vlp.plots import plot_losses

        plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", title=cfg.name)
    if evaluate_after and getattr(cfg.data, cfg.eval.split, None):
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
