"""The training entry points behind ``vlp pretrain`` and ``vlp finetune``: config -> run directory -> Lightning
Trainer -> evaluation.

A run lives in ``<output_dir>/<name>/``: ``config.yaml`` (resolved; enough to reproduce the run), ``metrics.csv``,
``checkpoints/last.ckpt`` (plus periodic ones), ``results.json`` and ``loss.png``. Running the same command again
resumes from the newest checkpoint there (``last.ckpt`` or a SLURM ``hpc_ckpt_N.ckpt``): the optimizer, schedule,
momentum encoders, queues and the data-stream position come back, so nothing is lost or repeated.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch

from vlp import config as config_lib
from vlp.config import ExperimentConfig
from vlp.utils.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger("vlp")

RESUMABLE = "a Lightning training checkpoint of this run (state_dict, optimizer_states, global_step)"


def build_model(cfg: ExperimentConfig):
    from vlp.models import build

    return build(cfg.model, cfg.optim)


def build_datamodule(cfg: ExperimentConfig):
    """The data module, masking with the model's rule (``model.masking``: the paper's MLM rule)."""
    from vlp.data.datamodule import ShardDataModule

    return ShardDataModule(cfg.data, masking=getattr(cfg.model, "masking", None))


def data_for_model(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config whose data section decodes what the model reads (DESIGN §5): images only for a model that reads
    pixels, regions.npz for one that reads regions, concept tags and phrases for one that reads them (MVPTR)."""
    import dataclasses

    from vlp.models import model_class

    if cfg.model is None:
        return cfg
    reads = model_class(cfg.model.name).READS
    data = dataclasses.replace(cfg.data, images="pixels" in reads, regions=cfg.data.regions or "regions" in reads,
                               tags="tags" in reads,  # phrase_vocab_size 0: the "without phrases" ablation
                               phrases="phrases" in reads and getattr(cfg.model, "phrase_vocab_size", None) != 0)
    return dataclasses.replace(cfg, data=data)


def resolve(cfg: ExperimentConfig):
    """The datamodule, and the config with its data section matched to the model and its tokenizer-dependent
    ``null`` fields filled (vocabulary size), which is what gets saved as the run's config.yaml."""
    import dataclasses

    from vlp.models import bind_concepts, bind_tokenizer

    cfg = data_for_model(cfg)
    dm = build_datamodule(cfg)
    if cfg.model is not None:
        model = bind_concepts(bind_tokenizer(cfg.model, dm.tokenizer), dm.phrase_vocab, cfg.ckpt)
        cfg = dataclasses.replace(cfg, model=model)
    return cfg, dm


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run that loads (``vlp.resume.select_checkpoint``; damaged ones are passed over
    with a warning, here without moving them): ``checkpoints/*.ckpt`` or SLURM's ``hpc_ckpt_*.ckpt``."""
    from vlp.resume import select_checkpoint

    found = select_checkpoint(run_dir, set_aside_damaged=False, require=(),
                              expect="a vlp checkpoint (.ckpt of vlp pretrain, finetune or convert)")
    return found.path if found is not None else None


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
        # The row of the step being checkpointed reaches the logger only after this hook; keep it with the state:
        # exactly what this step logged (vlp.utils.step_metrics), as the logger will be handed it.
        from vlp.utils.step_metrics import logged_this_step

        row = {k: float(v) for k, v in logged_this_step(trainer, "log").items() if k.startswith(("train/", "data/"))}
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


def _tensorboard_logger(run_dir: Path):
    """Lightning's TensorBoardLogger writing ``<run>/tensorboard/`` (``trainer.logger: [csv, tensorboard]``)."""
    import importlib.util

    from lightning.pytorch.loggers import TensorBoardLogger

    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise config_lib.ConfigError("trainer.logger lists tensorboard, but neither the tensorboard nor the "
                                     "tensorboardX package is installed; pip install tensorboard, or set "
                                     "trainer.logger=[csv]")
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


class TrainingClock(L.Callback):
    """Training wall time summed over a run's segments: each checkpoint carries the seconds trained up to it, so a
    resumed run goes on counting instead of starting from zero (time after the newest checkpoint of a killed
    segment is not counted: those steps are trained again, and counted, by the resumed run)."""

    def __init__(self):
        self.before = 0.0  # seconds of the earlier segments (from the checkpoint resumed)
        self._start: float | None = None
        self._stop: float | None = None

    @property
    def seconds(self) -> float:
        if self._start is None:
            return self.before
        import time

        return self.before + ((self._stop if self._stop is not None else time.monotonic()) - self._start)

    def on_train_start(self, trainer, pl_module):
        import time

        self._start, self._stop = time.monotonic(), None

    def on_train_end(self, trainer, pl_module):
        import time

        self._stop = time.monotonic()

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


def _run_progress_bar():
    """Lightning's tqdm bar over the whole run (optimizer steps of ``module.total_steps``, from the resumed step)
    instead of one bar per epoch, so that its ETA is the run's."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

    class RunProgressBar(TQDMProgressBar):
        def on_train_start(self, *args):
            super().on_train_start(*args)
            self._sized = False

        def on_train_epoch_start(self, trainer, *_):
            if not self._sized:  # once per process: the bar spans the epochs, from the step resumed
                self._sized = True
                self.train_progress_bar.reset(total=getattr(trainer.lightning_module, "total_steps", None))
                self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description(f"train (epoch {trainer.current_epoch})")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if self._should_update(step, self.train_progress_bar.total or 0):
                _update_n(self.train_progress_bar, step)
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

        def on_train_epoch_end(self, trainer, pl_module):
            if not self.train_progress_bar.disable:
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    return RunProgressBar()


def _strategy(t):
    """``trainer.strategy``, built with the process group's timeout when it names a registered strategy that takes
    one (the DDP family, FSDP, DeepSpeed); other names go to Lightning unchanged. ``fsdp2`` is vlp's: FSDP2 over
    every rank through Lightning's ModelParallelStrategy, the model sharding itself in ``configure_model``
    (``vlp.utils.fsdp``; on CPU too, where Lightning's ``fsdp`` refuses). The group is created with
    ``trainer.rendezvous_timeout_s`` (all ranks must start and join within it); a callback then sets
    ``trainer.collective_timeout_s`` for every collective after it (``vlp.utils.stalls.trainer_callbacks``)."""
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    from vlp.utils import fsdp

    if t.strategy == fsdp.STRATEGY:
        return fsdp.fsdp2_strategy(_rendezvous_s(t))
    if not isinstance(t.strategy, str) or t.strategy not in StrategyRegistry:
        return t.strategy
    entry = StrategyRegistry[t.strategy]
    if "timeout" not in inspect.signature(entry["strategy"].__init__).parameters:
        return t.strategy
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=_rendezvous_s(t)))


def _rendezvous_s(t) -> float:
    return t.rendezvous_timeout_s if t.rendezvous_timeout_s is not None else t.collective_timeout_s


def _trainer(cfg: ExperimentConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    from vlp.utils.slurm import cluster_plugins
    from vlp.utils.stalls import prestart_worker_server, trainer_callbacks

    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t),
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
        # CSV first: trainer.logger (the first) is what FlushMetricsOnCheckpoint saves
        logger=[_csv_logger(run_dir), *([_tensorboard_logger(run_dir)] if "tensorboard" in t.logger else [])],
        callbacks=[*callbacks, *trainer_callbacks(t.collective_timeout_s), TrainingClock(),
                   *([_run_progress_bar()] if t.enable_progress_bar else [])],
        plugins=cluster_plugins(),  # under SLURM: its environment, requeue by vlp.utils.slurm.SlurmRequeue
    )
    from lightning.pytorch.strategies import DDPStrategy

    if t.strategy == "auto" and isinstance(trainer.strategy, DDPStrategy):
        # Lightning chose DDP itself (several devices): its process group has not been created yet, so the timeout
        # can still be set (the attribute DDPStrategy(timeout=...) stores).
        from datetime import timedelta

        trainer.strategy._timeout = timedelta(seconds=_rendezvous_s(t))
    start = getattr(cfg.data, "loader_start_timeout_s", 0)
    if trainer.world_size > 1 and getattr(cfg.data, "num_workers", 0) > 0 and start >= t.collective_timeout_s:
        log.warning("data.loader_start_timeout_s=%g >= trainer.collective_timeout_s=%g: a rank stuck on its loader "
                    "would be reported by the ranks waiting for it, not by itself", start, t.collective_timeout_s)
    prestart_worker_server(getattr(cfg.data, "worker_start", "auto"), getattr(cfg.data, "num_workers", 0),
                           distributed=trainer.world_size > 1)
    return trainer


def _fit_or_stall(cfg: ExperimentConfig, trainer: L.Trainer, *args, **kwargs) -> None:
    """``trainer.fit``; a collective that timed out or lost its peers becomes a ``StallError`` naming this rank, and
    a failing launcher rank stops the ranks it launched (they would otherwise wait for it until their own
    timeouts)."""
    from vlp.utils.stalls import StallError, collective_failure, ranks_failed_first

    try:
        trainer.fit(*args, **kwargs)
    except BaseException as e:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        t = cfg.trainer
        stall = collective_failure(e, t.collective_timeout_s, _rendezvous_s(t)) if isinstance(e, Exception) else None
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            import subprocess
            import time

            # A rank that failed first may still be exiting after its error; one that this rank timed out waiting
            # for is stuck.
            deadline = time.monotonic() + (0 if stall is not None and stall.kind == "collective" else 3)
            failed = {}
            for local_rank, proc in enumerate(launcher.procs, start=1):
                try:
                    code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                else:
                    if code:
                        failed[trainer.node_rank * (len(launcher.procs) + 1) + local_rank] = code
            if failed and stall is not None and stall.kind == "peer":
                stall = ranks_failed_first(failed)
            # Lightning's child-process observer watches this same list and SIGKILLs this process when a child
            # exited non-zero; the children were stopped on purpose, so this process reports the error and exits.
            launcher.procs.clear()
        if stall is not None:
            raise stall from None
        if isinstance(e, StallError):
            raise e from None
        raise


def enable_grad_checkpointing(model) -> int:
    """Switch on activation checkpointing in every block that supports it (vision and text towers, fusion stacks);
    returns how many blocks did."""
    n = 0
    for module in model.modules():
        if module is not model and hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
            n += 1
    if n == 0:
        raise ValueError(f"trainer.gradient_checkpointing=true but {type(model).__name__} has no block supporting it")
    return n


def start_run(cfg: ExperimentConfig):
    """Check the run directory, then create it and save the resolved config.yaml; returns the ``vlp.resume.Resume``
    to continue from, or None for a fresh start.

    Before anything is written: when the run has checkpoints and a config.yaml, the new config may differ from the
    saved one only in ``vlp.resume.RESUME_SAFE`` keys (else ``ResumeConfigError`` listing the changed keys). Then the
    newest checkpoint that loads is chosen (damaged ones are renamed ``<name>.corrupt``, with a warning). A resume
    with safe changes saves the new config.yaml and names the changes; a fresh start (no usable checkpoint) trims
    metrics.csv of an earlier attempt's rows. Only global rank 0 writes."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from vlp.resume import check_resume_config, scan_checkpoints, set_aside

    run_dir = cfg.run_dir
    saved_path = run_dir / "config.yaml"
    resume, damaged = scan_checkpoints(run_dir) if run_dir.is_dir() else (None, [])
    changed: list[str] = []
    if resume is not None and saved_path.exists():
        changed = check_resume_config(config_lib.load(saved_path), cfg, saved_path)
    set_aside(damaged)
    if getattr(rank_zero_only, "rank", 0) != 0:
        return resume
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None or not saved_path.exists() or changed:
        config_lib.save(cfg, saved_path)
    if resume is not None and changed:
        log.warning("resuming %s with changed %s (saved to its config.yaml)", run_dir, ", ".join(changed))
    if resume is None and (run_dir / "metrics.csv").exists():
        restore_metrics(run_dir / "metrics.csv", {"global_step": 0})
    return resume


def run_callbacks(cfg: ExperimentConfig) -> list:
    """Periodic checkpoints + ``last.ckpt`` in ``<run>/checkpoints`` (and the final step in both, whatever the
    cadence), metrics.csv flushed with each of them and holding each step's own values
    (``vlp.utils.step_metrics``); the per-step seeding of every random draw (``vlp.utils.rng.StepSeeding``), the
    non-finite loss policy (``vlp.utils.nonfinite_guard.NonFiniteGuard``), the console summary of skipped corrupt
    samples (``vlp.data.stream.corrupt_summary_callback``), and the signals: SIGUSR1 under SLURM requeues, SIGTERM
    saves and exits 143 (both at the end of the step: ``vlp.utils.graceful_stop``), Ctrl-C stops within a step
    (``vlp.utils.interrupt``)."""
    from vlp.resume import RunCheckpoint
    from vlp.utils.nonfinite_guard import NonFiniteGuard
    from vlp.utils.rng import StepSeeding
    from vlp.utils.step_metrics import FreshStepMetrics

    ckpt = RunCheckpoint(
        dirpath=str(cfg.run_dir / "checkpoints"), filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_last=True, save_top_k=-1,
    )
    callbacks = [StepSeeding(cfg.seed), FreshStepMetrics(), NonFiniteGuard(cfg.trainer.nonfinite), ckpt,
                 FlushMetricsOnCheckpoint()]
    from vlp.data.stream import corrupt_summary_callback  # skipped samples by reason, at each epoch's end

    callbacks.append(corrupt_summary_callback())
    from vlp.utils.slurm import requeue_callbacks  # SLURM pre-emption: save the step, requeue, exit

    callbacks += requeue_callbacks(cfg.trainer.slurm_requeue, ckpt)
    from vlp.utils.graceful_stop import TerminateSave  # SIGTERM: save the step reached, exit 143

    callbacks.append(TerminateSave(ckpt))
    from vlp.utils.interrupt import ctrl_c_guard  # a Ctrl-C that lands in a __del__ still stops training

    callbacks.append(ctrl_c_guard())
    if cfg.trainer.throughput:  # samples/s, tokens/s, MFU, peak memory in metrics.csv (vlp.utils.throughput)
        from vlp.utils.throughput import ThroughputMonitor

        callbacks.append(ThroughputMonitor())
    return callbacks


def _batches_per_rank(cfg: ExperimentConfig, trainer: L.Trainer, dm) -> int:
    """The training loader's length on one rank (known from index.json, for the trainer's world size)."""
    return len(type(dm)(cfg.data, tokenizer=dm.tokenizer, rank=0, world_size=trainer.world_size).build_train_stream())


def total_steps(cfg: ExperimentConfig, trainer: L.Trainer, dm) -> int:
    """Optimizer steps of the run, for the schedule: ``max_steps``, else epochs x the loader's length per rank /
    gradient accumulation."""
    t = cfg.trainer
    if t.max_steps > 0:
        return t.max_steps
    return max(1, _batches_per_rank(cfg, trainer, dm) * (t.max_epochs or 1) // t.accumulate_grad_batches)


def bind_schedule(cfg: ExperimentConfig, module: L.LightningModule, trainer: L.Trainer, dm) -> None:
    """Give the module what its lr schedule needs from the run: the total steps, and for the per-epoch
    ``tcl_official`` schedule the optimizer steps per epoch when ``optim.steps_per_epoch`` is 0 (Lightning steps
    the optimizer on an epoch's last batch too, hence the rounding up)."""
    import dataclasses
    import math

    module.total_steps = total_steps(cfg, trainer, dm)
    optim = module.optim_cfg
    if optim.schedule == "tcl_official" and optim.steps_per_epoch == 0:
        per_epoch = math.ceil(_batches_per_rank(cfg, trainer, dm) / cfg.trainer.accumulate_grad_batches)
        module.optim_cfg = dataclasses.replace(optim, steps_per_epoch=max(1, per_epoch))


def fit(cfg: ExperimentConfig, module: L.LightningModule, trainer: L.Trainer, dm, resume) -> None:
    """``trainer.fit`` (from ``resume``, a ``vlp.resume.Resume``, when given: metrics.csv trimmed to its step), then
    the loss plot. Ctrl-C ends it in ``vlp.utils.interrupt.RunInterrupted`` (the step reached and the newest
    checkpoint), before any evaluation."""
    from vlp.utils.interrupt import RunInterrupted, is_ctrl_c, newest_checkpoint_step

    if resume is not None:
        # The run directory's file was read by the safe reader when it was chosen (vlp.resume.select_checkpoint), so
        # a damaged or code-carrying checkpoint never reaches Lightning (which reads it with weights_only=True too).
        if trainer.is_global_zero:
            restore_metrics(cfg.run_dir / "metrics.csv", resume.as_checkpoint())
        print(f"resuming from {resume.path}")
    fit_module = torch.compile(module) if cfg.trainer.compile else module
    sigint = signal.getsignal(signal.SIGINT)
    try:
        _fit_or_stall(cfg, trainer, fit_module, datamodule=dm, ckpt_path=str(resume.path) if resume else None,
                      weights_only=True)
    except BaseException as e:
        if not is_ctrl_c(e) or isinstance(e, RunInterrupted):
            raise
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C from its first one on, for good
        saved = newest_checkpoint_step(cfg.run_dir) if trainer.is_global_zero else None  # only rank 0 says it
        raise RunInterrupted(trainer.global_step, saved, trainer.global_rank) from None
    if trainer.is_global_zero:
        from vlp.plots import plot_losses

        plot_losses(cfg.run_dir / "metrics.csv", cfg.run_dir / "loss.png", title=cfg.name)


def _finished(cfg: ExperimentConfig, resume, pending_eval: str | None = None) -> bool:
    """Whether this is a re-run of a finished run (its newest checkpoint reached ``max_steps`` / ``max_epochs``);
    then it says so and does nothing (no training, no file written). ``pending_eval``: a note to print instead of
    "nothing to do" when the final evaluation is still to be run (it was killed before writing results.json)."""
    from vlp.resume import is_finished

    if resume is None or not is_finished(resume, cfg.trainer):
        return False
    limit = (f"trainer.max_steps={cfg.trainer.max_steps}" if cfg.trainer.max_steps and cfg.trainer.max_steps > 0
             else f"trainer.max_epochs={cfg.trainer.max_epochs}")
    then = pending_eval or (f"nothing to do (raise {limit.split('=')[0]} to train on; `vlp evaluate` re-evaluates "
                            f"it)")
    print(f"{cfg.run_dir}: already finished ({resume.path.name} holds step {resume.global_step}, {limit}); {then}")
    return True


def _evaluated(run_dir: Path, step: int, section: str) -> bool:
    """Whether ``<run>/results.json`` holds ``section`` for ``step``."""
    from vlp.eval.results import read_results

    try:
        results = read_results(run_dir)
    except Exception:  # missing or unreadable: not evaluated
        return False
    return bool(results) and section in results and results.get("step") == step


def _record_training(cfg: ExperimentConfig, trainer: L.Trainer, module: L.LightningModule) -> None:
    """``results.json`` ``train`` (wall time over all segments, steps, trainable parameters, samples/s) and
    ``command``, written by global rank 0 after training and before any evaluation."""
    from vlp.eval.results import run_command, training_record, write_results

    if not trainer.is_global_zero:
        return
    clock = next(cb for cb in trainer.callbacks if isinstance(cb, TrainingClock))
    per_step = getattr(cfg.data, "batch_size", 0) * cfg.trainer.accumulate_grad_batches * trainer.world_size
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    update: dict = {"train": training_record(clock.seconds, trainer.global_step, trainable, per_step)}
    command = run_command()
    if command is not None:
        update["command"] = command
    write_results(cfg.run_dir, update)


def _print_summary(cfg: ExperimentConfig) -> None:
    """The short block at the end of ``vlp pretrain`` / ``vlp finetune`` (global rank 0)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from vlp.eval.results import run_summary

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(run_summary(cfg.run_dir, cfg.name), flush=True)


def pretrain(cfg: ExperimentConfig, evaluate_after: bool = True) -> Path:
    cfg, dm = resolve(cfg)
    resume = start_run(cfg)
    wants_eval = evaluate_after and bool(getattr(cfg.data, cfg.eval.split, None))
    eval_pending = wants_eval and resume is not None and not _evaluated(cfg.run_dir, resume.global_step, "retrieval")
    if _finished(cfg, resume, "evaluating its final checkpoint" if eval_pending else None):
        if eval_pending:  # a run killed during its final evaluation: only that is left to do
            from vlp.eval.run import evaluate_retrieval_run

            model = build_model(cfg)
            model.load_state_dict(read_checkpoint(resume.path, expect=RESUMABLE)["state_dict"])
            evaluate_retrieval_run(cfg, model.eval(), dm, None, step=resume.global_step)
        _print_summary(cfg)
        return cfg.run_dir
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    if cfg.trainer.gradient_checkpointing:
        enable_grad_checkpointing(model)
    trainer = _trainer(cfg, cfg.run_dir, run_callbacks(cfg))
    bind_schedule(cfg, model, trainer, dm)
    fit(cfg, model, trainer, dm, resume)
    _record_training(cfg, trainer, model)
    if evaluate_after and getattr(cfg.data, cfg.eval.split, None):
        from vlp.eval.run import evaluate_retrieval_run

        evaluate_retrieval_run(cfg, model, dm, trainer)
    _print_summary(cfg)
    return cfg.run_dir


def finetune(cfg: ExperimentConfig, evaluate_after: bool = True) -> Path:
    """``vlp finetune CONFIG [ckpt=PATH]``: train the downstream task ``data.task`` (``vlp.tasks``) from the
    pre-trained weights in ``ckpt``, in the same run directory layout as ``pretrain`` (and resuming the same way: a
    resumed run takes its weights from its own checkpoint, not from ``ckpt``); then evaluate on ``eval.split``."""
    from vlp.tasks import get_task

    task_lib = get_task(cfg.data.task)
    cfg, dm = resolve(cfg)
    cfg = task_lib.prepare(cfg, dm)
    resume = start_run(cfg)
    if _finished(cfg, resume):
        _print_summary(cfg)
        return cfg.run_dir
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = task_lib.build(cfg, dm, init=resume is None)
    if cfg.trainer.gradient_checkpointing:
        enable_grad_checkpointing(task.model)
    trainer = _trainer(cfg, cfg.run_dir, run_callbacks(cfg))
    bind_schedule(cfg, task, trainer, dm)
    fit(cfg, task, trainer, dm, resume)
    _record_training(cfg, trainer, task)
    if evaluate_after:
        task_lib.evaluate_run(cfg, task, dm, trainer)
    _print_summary(cfg)
    return cfg.run_dir


def evaluate(cfg: ExperimentConfig) -> dict:
    """``vlp evaluate CONFIG ckpt=PATH``: load weights from ``ckpt`` (or the run's last.ckpt) and evaluate."""
    from vlp.eval.run import evaluate_retrieval_run

    ckpt = Path(cfg.ckpt) if cfg.ckpt else find_resume_checkpoint(cfg.run_dir)
    if ckpt is None:
        raise CheckpointError(cfg.run_dir / "checkpoints", "no checkpoint to evaluate (ckpt=null and none in the run)",
                              "ckpt=PATH or a run directory with checkpoints/*.ckpt")
    state = read_checkpoint(ckpt)  # before building anything: a bad file fails fast, naming itself
    cfg, dm = resolve(cfg)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: state_dict does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    model.eval()
    os.makedirs(cfg.run_dir, exist_ok=True)
    return evaluate_retrieval_run(cfg, model, dm, None, step=int(state.get("global_step", 0)))
