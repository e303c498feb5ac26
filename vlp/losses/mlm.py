"""Masked language modelling: the (distilled) MLM loss.

:func:`mlm_loss` is ALBEF's ``BertForMaskedLM`` loss with momentum distillation. The masking itself (BERT 80/10/10 by
a paper's rule) is ``vlp.data.masking.Masker``, configured by the model's ``MaskingConfig``: the data collator masks
with it, and so can a model that masks in its forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mlm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def mlm_loss(
    logits: Tensor,
    labels: Tensor,
    soft_logits: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """MLM cross-entropy with optional momentum distillation (ALBEF ``BertForMaskedLM.forward``)::

        M    = {positions with labels != -100}
        CE   = mean_{p in M} -log softmax(logits[p])[labels[p]]
        KD   = mean_{p in M} -sum_v softmax(soft_logits[p])_v * log_softmax(logits[p])_v
        loss = (1 - alpha) * CE + alpha * KD

    logits, soft_logits: [..., V] (e.g. [B, L, V], or [N, V] when the head only scores masked positions);
    labels: [...] matching the leading dims. The teacher (``soft_logits``, from the momentum model) gets no
    gradient. Computed in fp32.

    Differences from the official code, both only where it would return NaN: a batch with no masked token
    returns 0 (still attached to the graph) instead of NaN, and ``alpha == 0`` skips the teacher term instead of
    multiplying a possibly-NaN term by 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab).float()
    flat_labels = labels.reshape(-1)
    if flat_logits.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    selected = flat_labels != IGNORE_INDEX
    # Averaging with a mask instead of boolean indexing avoids a device->host sync per step.
    n = selected.sum().clamp(min=1)
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    loss = torch.where(selected, ce, torch.zeros_like(ce)).sum() / n
    if soft_logits is not None and alpha > 0.0:
        teacher = F.softmax(soft_logits.detach().reshape(-1, vocab).float(), dim=-1)
        kd = -(teacher * F.log_softmax(flat_logits, dim=-1)).sum(dim=-1)
        kd = torch.where(selected, kd, torch.zeros_like(kd)).sum() / n
        loss = (1.0 - alpha) * loss + alpha * kd
    return loss
