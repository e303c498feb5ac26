"""The VQA objective shared by every model's VQA head (``vlp.tasks.vqa``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["vqa_bce_loss"]


def vqa_bce_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """The VQA loss of UNITER, ViLT, METER and BridgeTower: BCE-with-logits against the soft scores [Q, A], averaged
    over every element and multiplied by the number of answers (= summed over answers, averaged over questions).
    Computed in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), target_scores.float()) * target_scores.shape[1]
