"""What a run directory's checkpoints and config.yaml must satisfy before ``vlp pretrain`` / ``vlp finetune`` resume
from them (DESIGN §7), and the checkpoint callback that always leaves the final step in ``last.ckpt``.

* :func:`scan_checkpoints` / :func:`select_checkpoint` -- the newest checkpoint that loads. A damaged one
  (truncated, empty, not a torch file, not a training checkpoint) is renamed ``<name>.corrupt`` with a warning
  naming it, and the next newest is tried. A file the safe reader *refuses* (it would run code when unpickled) is
  never skipped: that is an error.
* :func:`check_resume_config` -- a resume whose config differs from the run's saved ``config.yaml`` in anything but
  the keys of :data:`RESUME_SAFE` fails before anything is written, listing every changed key
  (:class:`ResumeConfigError`). The safe keys change how long, where and how visibly the run trains, how it is
  evaluated, and the data loader's resources; never what the model is, what it reads, the optimizer, or the
  numerics of a step.
* :func:`is_finished` -- whether a checkpoint already reached the config's ``max_steps`` / ``max_epochs``: a
  re-run of a finished run says so and does nothing.
* :class:`RunCheckpoint` -- ModelCheckpoint that also saves the step a run ends on (Lightning saves nothing at the
  end of a run whose ``max_steps`` is not a multiple of ``every_n_train_steps``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

from lightning.pytorch.callbacks import ModelCheckpoint

from vlp.config import ConfigError
from vlp.utils.checkpoint import CheckpointError, read_checkpoint

__all__ = ["RESUMABLE", "RESUME_SAFE", "Resume", "ResumeConfigError", "RunCheckpoint", "candidates", "changed_keys",
           "check_resume_config", "is_finished", "scan_checkpoints", "select_checkpoint", "set_aside"]

log = logging.getLogger("vlp")

RESUMABLE = "a Lightning training checkpoint of this run (state_dict, optimizer_states, global_step)"

# Config keys a resume may change (dotted; a key ending in "." covers its whole section). Everything else — seed,
# model.*, the rest of data.* (sources, batch size, augmentation, tokenizer, masking ...), optim.*, the step's
# numerics (trainer.precision, accumulate_grad_batches, gradient_clip_val) — must equal the saved config.yaml.
RESUME_SAFE = (
    # how long: more (or fewer) steps / epochs / time; a run whose checkpoint reached the new limit is finished
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time",
    # where: devices, nodes and strategy (the data stream resumes at the same fraction on another world size, with
    # a warning; bitwise equality with an uninterrupted run holds only on the same world size and worker count)
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.collective_timeout_s",
    "trainer.rendezvous_timeout_s",
    # numerically neutral execution choices
    "trainer.gradient_checkpointing", "trainer.compile", "trainer.deterministic",
    # what is written and shown, fault policy
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.checkpoint_every_n_steps",
    "trainer.nonfinite", "trainer.slurm_requeue", "trainer.throughput", "trainer.logger",
    # validation and evaluation
    "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.num_sanity_val_steps", "eval.",
    "data.val", "data.test", "data.eval_batch_size", "data.eval_max_text_len",
    # the loader's resources and fault tolerance (not the samples: the order is restored from the checkpoint)
    "data.num_workers", "data.worker_start", "data.loader_timeout_s", "data.loader_start_timeout_s",
    "data.max_corrupt_ratio", "data.corrupt_min_samples",
    # the run's location (the run directory holding config.yaml is the same one by construction); the init
    # checkpoint of vlp finetune and how it is read (a resumed run takes its weights from its own checkpoint)
    "name", "output_dir", "ckpt", "finetune.from_scratch", "finetune.strict", "finetune.predictions",
)


class ResumeConfigError(ConfigError):
    """The config of a resume changes keys that are not in :data:`RESUME_SAFE`; ``e.keys`` lists them."""

    def __init__(self, message: str, keys: list[str]):
        self.keys = keys
        super().__init__(message)


class Resume(NamedTuple):
    """The checkpoint a run resumes from, and the little of it the entry points need before Lightning reads it."""

    path: Path
    global_step: int
    epochs_done: int
    metrics_row: Optional[dict]

    def as_checkpoint(self) -> dict:
        """What ``vlp.train.restore_metrics`` reads."""
        return {"global_step": self.global_step, "vlp_metrics_row": self.metrics_row}


# -- which checkpoint -------------------------------------------------------------------------------------------------
def candidates(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: ``checkpoints/*.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt`` (written on
    pre-emption). ``last.ckpt`` is written right after the periodic one of the same step, so a kill in between leaves
    the periodic one newest; on equal times ``last.ckpt`` comes first."""
    files = [p for p in (*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt.{n}")
        n += 1
    os.replace(path, target)
    return target


def scan_checkpoints(run_dir: Path, *, require=("optimizer_states", "global_step"),
                     expect: str = RESUMABLE) -> tuple[Optional[Resume], list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that loads (read with the safe reader), or None; and the damaged ones
    newer than it, with what is wrong with each. Reads only; a file the reader *refuses* because loading it could run
    code raises its :class:`CheckpointError`: it was put there, it did not break."""
    damaged = []
    for path in candidates(run_dir):
        try:
            state = read_checkpoint(path, expect=expect, require=require)
        except CheckpointError as e:
            if e.problem.startswith("refused to load"):
                raise
            damaged.append((path, e.problem))
            continue
        resume = Resume(path, int(state.get("global_step", 0)), _epochs_done(state), state.get("vlp_metrics_row"))
        del state
        return resume, damaged
    return None, damaged


def set_aside(damaged: list[tuple[Path, str]], move: bool = True) -> None:
    """Rename each damaged checkpoint ``<name>.corrupt`` (``move``; only on global rank 0, so ranks started at once
    do not race), with a warning naming it and what is wrong; without ``move`` just warn."""
    for path, problem in damaged:
        if move and _is_rank_zero() and path.exists():
            moved = _set_aside(path)
            log.warning("checkpoint %s is unusable (%s): moved aside to %s; resuming from the next newest one",
                        path, problem, moved.name)
        else:
            log.warning("checkpoint %s is unusable (%s): passed over for the next newest one", path, problem)


def select_checkpoint(run_dir: Path, *, set_aside_damaged: bool = True,
                      require=("optimizer_states", "global_step"), expect: str = RESUMABLE) -> Optional[Resume]:
    """:func:`scan_checkpoints`, then :func:`set_aside` of the damaged ones (just a warning without
    ``set_aside_damaged``)."""
    found, damaged = scan_checkpoints(run_dir, require=require, expect=expect)
    set_aside(damaged, move=set_aside_damaged)
    return found


def _epochs_done(state: dict) -> int:
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError, ValueError):
        return 0


def is_finished(resume: Resume, trainer_cfg) -> bool:
    """Whether ``resume`` already reached the run's end under ``trainer_cfg`` (Lightning's rule: ``max_steps`` when
    positive, and ``max_epochs``, 1000 when neither is set); ``max_time`` is left to Lightning."""
    t = trainer_cfg
    if t.max_steps is not None and t.max_steps > 0 and resume.global_step >= t.max_steps:
        return True
    max_epochs = t.max_epochs if t.max_epochs is not None else (1000 if (t.max_steps or -1) < 0 else None)
    return max_epochs is not None and max_epochs >= 0 and resume.epochs_done >= max_epochs


# -- may the config change? -------------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE)


def changed_keys(saved, new) -> list[str]:
    """Dotted keys whose values differ between two configs (dataclasses or dicts)."""
    from vlp.config import to_dict

    a = _flatten(saved if isinstance(saved, dict) else to_dict(saved))
    b = _flatten(new if isinstance(new, dict) else to_dict(new))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(saved, new, config_path: Path) -> list[str]:
    """The changed keys when every one of them is in :data:`RESUME_SAFE`; else :class:`ResumeConfigError`
    listing the others with their saved and new values."""
    from vlp.config import to_dict

    changed = changed_keys(saved, new)
    refused = [k for k in changed if not _safe(k)]
    if refused:
        a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
        diffs = "; ".join(f"{k}: {_show(a.get(k))} -> {_show(b.get(k))}" for k in refused[:12])
        more = f" (and {len(refused) - 12} more)" if len(refused) > 12 else ""
        raise ResumeConfigError(
            f"{config_path}: this run has checkpoints, and resuming it with this config would change "
            f"{', '.join(refused)}{more} ({diffs}). Nothing was written. Restore those values, start a new run "
            f"(another name= or output_dir=), or edit {config_path.name} if the change is really intended "
            f"(changes a resume may make: trainer.max_steps/max_epochs/max_time, devices and strategy, logging and "
            f"checkpoint cadence, trainer.nonfinite, eval.*, data.val/test and the loader's workers and timeouts)",
            refused)
    return changed


# -- the final step in last.ckpt --------------------------------------------------------------------------------------
class RunCheckpoint(ModelCheckpoint):
    """Periodic checkpoints and ``last.ckpt``, plus the step the run ends on.

    With ``max_steps`` the final step is saved from ``on_train_batch_end``, exactly like a periodic checkpoint (the
    same loop state, so a later resume with a larger ``max_steps`` continues as a periodic one would); a run ending
    otherwise (``max_epochs``, ``max_time``) is saved from ``on_train_end``."""

    _saved_epochs: Optional[int] = None  # epochs completed when the last checkpoint was written

    @staticmethod
    def _epochs(trainer) -> int:
        return int(trainer.fit_loop.epoch_progress.current.completed)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_epochs = self._epochs(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if (trainer.global_step > 0 and self._last_global_step_saved == trainer.global_step
                and self._saved_epochs is not None and self._saved_epochs != self._epochs(trainer)
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            # The final step was saved from its batch, before Lightning counted the epoch complete (a run ending
            # with max_epochs on a checkpoint step): last.ckpt gets the finished loop state, so a re-run sees it.
            # (A run stopped by max_steps mid-epoch is counted complete by Lightning too, but its batch-end state
            # is the one a longer run continues from.)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            self._save_final(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_final(self, trainer) -> None:
        if trainer.global_step == 0 or self._should_skip_saving_checkpoint(trainer):
            return
        candidates_ = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates_)
        self._save_last_checkpoint(trainer, candidates_)
