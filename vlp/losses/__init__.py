"""Shared training objectives, each implemented once and reused by every model.

Plain functions on tensors, plus :class:`Temperature` (the one piece of state: a learnable clamped temperature).

* :mod:`.contrastive` — InfoNCE with cross-rank gathering, queue negatives, multi-positive and distilled targets
  (ALBEF/TCL CMA and IMC, CLIP-style ITC).
* :mod:`.matching` — ITM negative sampling (random / local-hard / global-hard), pair layouts, loss.
* :mod:`.mlm` — the MLM loss with momentum distillation (the masker is ``vlp.data.masking.Masker``).
* :mod:`.mutual_info` — TCL's global-to-local mutual-information loss (LMI) and patch pooling.
* :mod:`.regions` — masked region modelling (UNITER's MRFR, MRC, MRC-kl) and the region mask.
* :mod:`.optimal_transport` — word-region alignment by optimal transport (UNITER's WRA: IPOT, distance, loss).
* :mod:`.ranking` — UNITER's retrieval hinge ranking loss and its hard-candidate draws.
* :mod:`.vqa` — the VQA loss (BCE over soft answer scores x number of answers).
"""

from vlp.losses.contrastive import (
    Temperature,
    distillation_targets,
    info_nce,
    multi_positive_targets,
    soft_cross_entropy,
)
from vlp.losses.matching import itm_loss, itm_triplets, sample_negatives, swap_images_for_itm, valid_negative_mask
from vlp.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp.losses.mutual_info import in_batch_g2l_loss, patch_pooling
from vlp.losses.optimal_transport import cosine_cost, ipot_plan, ot_distance, wra_loss
from vlp.losses.ranking import draw_candidates, hardest_candidates, hinge_rank_loss
from vlp.losses.regions import mrc_kl_loss, mrc_loss, mrfr_loss, region_mask
from vlp.losses.vqa import vqa_bce_loss

__all__ = [
    "Temperature",
    "info_nce",
    "soft_cross_entropy",
    "multi_positive_targets",
    "distillation_targets",
    "sample_negatives",
    "valid_negative_mask",
    "itm_triplets",
    "swap_images_for_itm",
    "itm_loss",
    "IGNORE_INDEX",
    "mlm_loss",
    "vqa_bce_loss",
    "in_batch_g2l_loss",
    "patch_pooling",
    "cosine_cost",
    "ipot_plan",
    "ot_distance",
    "wra_loss",
    "mrfr_loss",
    "mrc_loss",
    "mrc_kl_loss",
    "region_mask",
    "hinge_rank_loss",
    "draw_candidates",
    "hardest_candidates",
]
