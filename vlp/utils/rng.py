"""Random draws that a resumed run repeats exactly (DESIGN §7).

Lightning restores the model, optimizer, schedule, loops and the data position on resume, but not the global
torch / numpy / Python generators. Every model here draws from them during training: dropout, ITM hard negatives
(``torch.multinomial`` in ``vlp.losses.matching.sample_negatives``), BridgeTower's image swap
(``swap_images_for_itm``), any in-model masking. So instead of checkpointing generator states (which would also have
to follow every draw made between two checkpoints), :class:`StepSeeding` re-seeds all of them right before every
micro-batch of training from

    stable_hash(seed, global_step, rank, micro-batch index within the gradient-accumulation window)

which makes every draw of a training step a pure function of (seed, step, rank, micro-batch): the uninterrupted run
and a run resumed at any checkpoint make the same draws, whatever happened in the process before (validation, a
different number of earlier steps, another process). The data pipeline is already seeded per sample
(``vlp.data.collate``), so it does not depend on these generators.

It covers every model and task trained through ``vlp.train`` without any model doing anything: a model draws from
the global generators (or from a ``torch.Generator`` it was handed) and keeps no generator state of its own.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from vlp.data.stream import stable_hash

__all__ = ["step_seed", "seed_all", "StepSeeding"]

_TAG = "vlp-train-step/1"  # keeps these seeds apart from the data pipeline's stable_hash streams


def step_seed(seed: int, step: int, rank: int, micro_batch: int = 0) -> int:
    """The 63-bit seed of one training micro-batch: the same in every process and on every machine."""
    return stable_hash(_TAG, int(seed), int(step), int(rank), int(micro_batch))


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device: ``torch.manual_seed`` does both), numpy's and Python's global
    generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


class StepSeeding(L.Callback):
    """Before each training micro-batch, seed the global generators with :func:`step_seed` of (``seed``, the
    optimizer steps done, this process's global rank, the micro-batch's index in its accumulation window).

    ``on_train_batch_start`` runs after the batch was fetched and before ``training_step``; the draws of the forward
    and backward (dropout masks are drawn in the forward and replayed, with the saved generator state, by activation
    checkpointing) and of the optimizer step all follow it. Nothing needs saving: the seed is recomputed from the
    restored loop counters."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def micro_batch(self, trainer: L.Trainer, batch_idx: int) -> int:
        """Index of ``batch_idx`` in its accumulation window (Lightning steps after every
        ``accumulate_grad_batches`` batches of an epoch, and on an epoch's last batch)."""
        return batch_idx % max(1, int(trainer.accumulate_grad_batches))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed_all(step_seed(self.seed, trainer.global_step, trainer.global_rank, self.micro_batch(trainer, batch_idx)))
