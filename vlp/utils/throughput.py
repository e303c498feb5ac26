"""Throughput and MFU of every training run, logged to metrics.csv beside the losses (``trainer.throughput``).

:class:`ThroughputMonitor` logs, at each measured optimizer step (below: not the warm-up, not a step whose FLOPs are
being counted; the CSV logger writes them at the ``trainer.log_every_n_steps`` cadence, like every other per-step
value):

=====================  ==============================================================================================
train/samples_per_s    global samples / s: per-rank batch x accumulation x world size, over the wall time of the
                       steps in the window
train/tokens_per_s     global tokens / s, tokens as defined by :func:`batch_tokens` (this rank's count x world size)
train/tflops_per_s     achieved model TFLOP/s of one device (FLOPs counted per step by ``FlopCounterMode``)
train/mfu              train/tflops_per_s / the device's dense peak for the trainer's precision
                       (``vlp.utils.flops.peak_flops``; not logged, with one warning, where no peak is known)
train/peak_mem_gb      CUDA only: ``torch.cuda.max_memory_allocated`` since training started, in GiB (2^30 bytes)
=====================  ==============================================================================================

Timing. A step's duration is the wall time (``time.perf_counter``) between the ends of two consecutive optimizer
steps, so it includes data loading, logging and checkpoint writes (what the run really pays), but not validation
(the clock restarts after it). The rates are over a window of the last ``window`` measured steps (default: the
logging cadence, so a metrics.csv row covers the steps since the previous row). The first ``warmup_steps`` steps after
training starts (or resumes) are not measured (allocator, cuDNN / oneDNN autotuning, first batch), nor are the steps
whose FLOPs are being counted (the counter's Python dispatch slows them down). Nothing is synchronised with the
device: over a window, the host's step rate is the device's.

FLOPs. Counted on the real training step -- forward, backward and optimizer step of every micro-batch of the first
optimizer step, under ``FlopCounterMode`` (``vlp.utils.flops.FlopCount``), which only records shapes: no extra pass,
no RNG draw, no state change, so a run with the monitor is bitwise the run without it (tested). They are counted
once per *kind* of step and reused: a model that samples one task per optimizer step (UNITER, ``task_of_step``)
has one kind per task, counted at the first step that samples it, so every measured step is charged its own task's
FLOPs and MFU over a window is exact for the task mix that window drew. Elsewhere there is one kind, counted at the
first step. The count is of that step's batch shapes: with text padded to the batch's longest caption later
batches may differ by a few tokens. With ``trainer.gradient_checkpointing`` the recomputed forward is counted too
(hardware FLOPs, slightly above model FLOPs). MFU is per device (this rank's FLOPs over one device's peak).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import NamedTuple, Optional

import lightning as L
import torch

from vlp.utils.flops import FlopCount, PeakFlops, peak_flops

log = logging.getLogger(__name__)

__all__ = ["THROUGHPUT_KEYS", "ThroughputMonitor", "attainable_peak", "batch_samples", "batch_tokens", "rates"]

# Wall-clock figures: they differ between any two runs, so exact run comparisons (bitwise resume) must leave them out.
THROUGHPUT_KEYS = ("train/samples_per_s", "train/tokens_per_s", "train/tflops_per_s", "train/mfu",
                   "train/peak_mem_gb")


# -- what a batch holds ------------------------------------------------------------------------------------------------
def batch_samples(batch: dict) -> int:
    """Samples (image-text pairs, VQA questions) in one micro-batch: the rows of ``input_ids``, else of the first
    tensor."""
    if "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 0


def _patch_grid(pl_module: torch.nn.Module) -> Optional[tuple[int, int]]:
    """(kh, kw) of the model's patch embedding: the first Conv2d over 3 channels whose stride equals its kernel
    (timm's ViT ``patch_embed.proj``, CLIP's ``conv1``); None for a model without one."""
    for m in pl_module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 and tuple(m.kernel_size) == tuple(m.stride):
            return tuple(m.kernel_size)
    return None


def batch_tokens(batch: dict, pl_module: torch.nn.Module, patch: Optional[tuple[int, int]] = None
                 ) -> Optional[torch.Tensor]:
    """Tokens one micro-batch feeds the model (a 0-d tensor on the batch's device: no host sync), None when it has
    neither text nor images:

    * text: the real (unpadded) tokens, ``attention_mask.sum()``;
    * visual: the model's own ``visual_tokens(batch)`` when it defines one; else, for region models, the real
      regions (``region_mask.sum()``, per question row when ``question_image`` maps questions to images); for pixel
      models, the image patches ``(H / kh) (W / kw)`` of one view (``image``; a second augmented view is not
      counted) per sample, ``patch`` = (kh, kw) of the model's patch embedding (found by :func:`_patch_grid`). The
      [CLS] token and padding are not counted."""
    parts = []
    if "attention_mask" in batch:
        parts.append(batch["attention_mask"].sum())
    own = getattr(pl_module, "visual_tokens", None)
    if callable(own):
        parts.append(torch.as_tensor(own(batch)))
    elif "region_mask" in batch:
        mask = batch["region_mask"]
        rows = batch.get("question_image")
        parts.append((mask if rows is None else mask.index_select(0, rows.to(mask.device))).sum())
    elif "image" in batch:
        patch = patch or _patch_grid(pl_module)
        if patch is not None:
            h, w = batch["image"].shape[-2:]
            parts.append(torch.tensor((h // patch[0]) * (w // patch[1]) * batch_samples(batch)))
    if not parts:
        return None
    device = parts[0].device
    return sum(p.to(device) for p in parts)


def step_kind(pl_module: L.LightningModule, step: int):
    """What fixes a step's FLOPs beyond the batch shapes: the task a task-sampling model draws for optimizer step
    ``step`` (UNITER's ``task_of_step`` while it ``sampling()``), else None (every step alike)."""
    task_of_step = getattr(pl_module, "task_of_step", None)
    sampling = getattr(pl_module, "sampling", None)
    if callable(task_of_step) and (not callable(sampling) or sampling()):
        return task_of_step(int(step))
    return None


# -- the arithmetic ----------------------------------------------------------------------------------------------------
class StepRecord(NamedTuple):
    """One measured optimizer step: wall seconds, global samples, this rank's tokens (tensor or None), this rank's
    FLOPs (None when not counted)."""

    seconds: float
    samples: int
    tokens: Optional[torch.Tensor]
    flops: Optional[int]


def attainable_peak(peak: PeakFlops, achieved: float) -> PeakFlops:
    """The peak to use after a window achieved ``achieved`` FLOP/s above ``peak``. A measured (CPU) peak is a timing:
    taken while the machine was busy it reads low, and what training achieved is attainable, so it becomes the peak
    (said once). A datasheet peak stays: beating it means the FLOPs are miscounted, which MFU > 1 shows."""
    if not peak.measured or achieved <= peak.flops:
        return peak
    note = ", raised to an achieved rate"
    if not peak.source.endswith(note):
        log.warning("train/mfu: the measured %s peak (%.3g FLOP/s) is below what training achieved (%.3g): the "
                    "machine was busy when it was measured; using the achieved rate as the peak", peak.source,
                    peak.flops, achieved)
    return peak._replace(flops=achieved, source=peak.source.removesuffix(note) + note)


def rates(records: list[StepRecord], world_size: int = 1, peak: Optional[float] = None) -> dict:
    """The logged figures of a window of steps: totals over total wall time (not a mean of per-step rates, which
    would overweight fast steps). ``tokens_per_s`` only when every step has a token count; ``tflops_per_s`` and
    ``mfu`` only when every step has FLOPs (``mfu`` also needs the ``peak`` FLOP/s)."""
    seconds = sum(r.seconds for r in records)
    if not records or seconds <= 0:
        return {}
    out = {"train/samples_per_s": sum(r.samples for r in records) / seconds}
    if all(r.tokens is not None for r in records):
        tokens = sum(r.tokens.to(records[0].tokens.device) for r in records)
        out["train/tokens_per_s"] = tokens.float() * world_size / seconds
    if all(r.flops is not None for r in records):
        achieved = sum(r.flops for r in records) / seconds
        out["train/tflops_per_s"] = achieved / 1e12
        if peak:
            out["train/mfu"] = achieved / peak
    return out


# -- the callback ------------------------------------------------------------------------------------------------------
class ThroughputMonitor(L.Callback):
    """Logs samples/s, tokens/s, achieved TFLOP/s, MFU and peak CUDA memory during training (module docstring).

    ``warmup_steps``: optimizer steps after (re)start that are not measured; ``window``: measured steps per rate
    (None: ``trainer.log_every_n_steps``); ``count_flops``: whether to count FLOPs at all (False: no tflops/mfu)."""

    def __init__(self, warmup_steps: int = 2, window: Optional[int] = None, count_flops: bool = True):
        self.warmup_steps = int(warmup_steps)
        self.window = window
        self.count_flops = count_flops
        self.flops: dict = {}  # step kind -> FLOPs of one optimizer step on this rank
        self.peak: Optional[PeakFlops] = None
        self._counter = FlopCount()
        self._patch: Optional[tuple[int, int]] = None
        self._reset(window or 1)

    def _reset(self, window: int) -> None:
        self._records: deque[StepRecord] = deque(maxlen=max(1, window))
        self._last_end: Optional[float] = None
        self._done = 0  # optimizer steps finished since training (re)started
        self._open: Optional[int] = None  # global_step of the optimizer step whose micro-batches are running
        self._samples, self._tokens, self._kind, self._counting = 0, None, None, False

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(self.window or int(trainer.log_every_n_steps or 1))
        self.flops = {}  # counted again on every (re)start: cheap, and never another model's
        self._patch = _patch_grid(pl_module)
        if self.count_flops and self.peak is None:
            self.peak = peak_flops(pl_module.device, trainer.precision)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_end is not None:  # the next step's clock starts after validation
            self._last_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counter.cancel()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._counter.cancel()  # never leave the dispatch mode on after a failed step

    # -- per batch -----------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._open is None:  # first micro-batch of an optimizer step
            self._open = trainer.global_step
            self._samples, self._tokens = 0, None
            self._kind = step_kind(pl_module, trainer.global_step)
            self._counting = self.count_flops and self._kind not in self.flops
            if self._counting:
                self._counter.start()
        self._samples += batch_samples(batch)
        tokens = batch_tokens(batch, pl_module, self._patch)
        if tokens is not None:
            self._tokens = tokens if self._tokens is None else self._tokens + tokens

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._open is None or trainer.global_step == self._open:
            return  # inside an accumulation window: the optimizer has not stepped yet
        self._open = None
        now = time.perf_counter()
        if self._counting:
            self.flops[self._kind] = self._counter.stop()
        previous, self._last_end = self._last_end, now
        self._done += 1
        if previous is None or self._done <= self.warmup_steps or self._counting:
            return  # not measured; nor logged, so that every logged window ends with its own step
        self._records.append(StepRecord(now - previous, self._samples * trainer.world_size, self._tokens,
                                        self.flops.get(self._kind)))
        self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = rates(list(self._records), trainer.world_size, self.peak.flops if self.peak else None)
        achieved = values.get("train/tflops_per_s", 0.0) * 1e12
        if self.peak is not None and achieved > self.peak.flops:
            self.peak = attainable_peak(self.peak, achieved)
            values["train/mfu"] = achieved / self.peak.flops
        if pl_module.device.type == "cuda":
            values["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2 ** 30
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
