"""Masked language modelling: the BERT 80/10/10 masker and the (distilled) MLM loss.

:func:`mask_tokens` is tokenizer-free so the model (TCL masks inside ``forward``) and the data collators can
share it. :func:`mlm_loss` is ALBEF's ``BertForMaskedLM`` loss with momentum distillation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_tokens", "mlm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Iterable[int],
    probability: float | Tensor = 0.15,
    generator: torch.Generator | None = None,
    special_mask: Tensor | None = None,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """BERT masking as ALBEF/TCL's ``mask()`` does it; returns ``(masked_ids, labels)``, both long [B, L].

    1. Each token is selected with probability ``probability`` (Bernoulli per token; a float, or a [B, L] tensor
       of per-token probabilities), except tokens whose id is in ``special_ids`` or where ``special_mask`` is
       True. ALBEF/TCL protect only PAD and CLS (``special_ids=(pad_id, cls_id)``), so [SEP] can be masked; pass
       the SEP id too for HF-collator behaviour (BridgeTower).
    2. Of the selected tokens, Bernoulli(``mask_ratio``) become ``mask_id``; of the rest, Bernoulli(
       ``random_ratio / (1 - mask_ratio)``) (0.5 for 80/10/10) become a token drawn uniformly from
       ``[0, vocab_size)`` (special ids included, as in ALBEF and HF); the others stay unchanged.
    3. ``labels`` holds the original id at selected positions and -100 elsewhere.

    The input is not modified. The random draws are made in ALBEF's order (selection, [MASK], random-or-keep,
    random ids), each over the full [B, L] shape, on the generator's device when a generator is given.
    """
    if input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if not 0.0 <= mask_ratio <= 1.0 or not 0.0 <= random_ratio <= 1.0 - mask_ratio + 1e-12:
        raise ValueError(f"need 0 <= mask_ratio and 0 <= random_ratio <= 1 - mask_ratio, got {mask_ratio}, "
                         f"{random_ratio}")
    device = input_ids.device
    draw_device = generator.device if generator is not None else device
    shape = input_ids.shape

    if isinstance(probability, Tensor):
        prob = probability.to(draw_device, torch.float).expand(shape)
    else:
        prob = torch.full(shape, float(probability), device=draw_device)
    selected = torch.bernoulli(prob, generator=generator).bool().to(device)
    protected = torch.zeros(shape, dtype=torch.bool, device=device)
    for sid in special_ids:
        protected |= input_ids == sid
    if special_mask is not None:
        protected |= special_mask.to(device=device, dtype=torch.bool)
    selected &= ~protected

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    to_mask = torch.bernoulli(torch.full(shape, mask_ratio, device=draw_device),
                              generator=generator).bool().to(device) & selected
    p_random = random_ratio / (1.0 - mask_ratio) if mask_ratio < 1.0 else 0.0
    to_random = torch.bernoulli(torch.full(shape, p_random, device=draw_device),
                                generator=generator).bool().to(device) & selected & ~to_mask
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=draw_device,
                               dtype=input_ids.dtype).to(device)

    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


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
