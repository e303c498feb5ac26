"""Masked region modelling: feature regression (MRFR), classification (MRC) and its KL variant (MRC-kl), and the
conditional region mask they are computed on.

Every loss takes the predictions and targets of the **masked regions only** ([n_masked, ...], the official
``_compute_masked_hidden`` selection) and normalises as UNITER's trainer does: the model returns the per-element
losses (``reduction='none'``) and ``pretrain.py`` takes their ``.mean()``, i.e. over every element of the
micro-batch:

* MRFR: ``mean((pred - target)^2)`` over n_masked x D elements (``F.mse_loss``), D the feature width;
* MRC-kl: ``mean(KL elements)`` over n_masked x C, ``F.kl_div(log_softmax(pred), p_detector)``: the per-region
  ``KL(p_detector || q_model)`` divided by C;
* MRC: cross-entropy against the hard label ``argmax(p_detector[:, 1:]) + 1`` (column 0 is the detector's
  background and never the target), mean over the masked regions (the official ``ignore_index=0`` never fires).

With no masked region (impossible with UNITER's at-least-one rule, possible with hand-made masks) every loss is 0,
still attached to the graph, instead of the NaN of a mean over nothing. Computed in fp32.

:func:`region_mask` draws the regions to mask: i.i.d. with ``probability`` among the real regions, and one real
region chosen uniformly where a sample drew none (``data/mrm.py: _get_img_mask``, "at least mask 1").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mrfr_elements", "mrfr_loss", "mrc_kl_elements", "mrc_kl_loss", "mrc_targets", "mrc_loss",
           "region_mask"]


def _mean(elements: Tensor) -> Tensor:
    return elements.mean() if elements.numel() else elements.sum()


def mrfr_elements(pred: Tensor, target: Tensor) -> Tensor:
    """Squared errors [n_masked, D] (``F.mse_loss(reduction='none')``)."""
    if pred.shape != target.shape:
        raise ValueError(f"mrfr: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    return F.mse_loss(pred.float(), target.float(), reduction="none")


def mrfr_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MRFR: the mean squared error over every element of the masked regions' features."""
    return _mean(mrfr_elements(pred, target))


def mrc_kl_elements(logits: Tensor, target_prob: Tensor) -> Tensor:
    """KL elements [n_masked, C]: ``p * (log p - log_softmax(logits))`` (0 where p = 0), ``F.kl_div``'s."""
    if logits.shape != target_prob.shape:
        raise ValueError(f"mrc-kl: logits {tuple(logits.shape)} and class probabilities {tuple(target_prob.shape)} "
                         "differ (model.region_classes must match the data's cls_prob)")
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), target_prob.float(), reduction="none")


def mrc_kl_loss(logits: Tensor, target_prob: Tensor) -> Tensor:
    """MRC-kl: the mean over every (region, class) element of the KL divergence to the detector's distribution."""
    return _mean(mrc_kl_elements(logits, target_prob))


def mrc_targets(target_prob: Tensor, skip_background: bool = True) -> Tensor:
    """Hard MRC labels [n_masked]: the detector's argmax class, background column 0 excluded when
    ``skip_background`` (UNITER: ``max(p[:, 1:]) + 1``)."""
    if skip_background:
        return target_prob[:, 1:].argmax(-1) + 1
    return target_prob.argmax(-1)


def mrc_loss(logits: Tensor, target_prob: Tensor, skip_background: bool = True) -> Tensor:
    """MRC: cross-entropy against :func:`mrc_targets`, mean over the masked regions."""
    if logits.shape != target_prob.shape:
        raise ValueError(f"mrc: logits {tuple(logits.shape)} and class probabilities {tuple(target_prob.shape)} differ")
    labels = mrc_targets(target_prob, skip_background)
    return _mean(F.cross_entropy(logits.float(), labels, reduction="none"))


def region_mask(valid: Tensor, probability: float = 0.15, generator: torch.Generator | None = None,
                min_masked: int = 1) -> Tensor:
    """Bool [B, N]: regions to mask, i.i.d. with ``probability`` among ``valid`` ones (True = real region); a sample
    with fewer than ``min_masked`` (UNITER: 1) gets one more real region, chosen uniformly. Draws come from
    ``generator`` (on its own device; the result is moved to ``valid``'s), two uniform tensors of ``valid``'s
    shape, so the mask is a pure function of the generator's seed."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"region_mask: probability {probability} outside [0, 1]")
    if min_masked not in (0, 1):
        raise ValueError(f"region_mask: min_masked must be 0 or 1 (UNITER forces one region), got {min_masked}")
    device = generator.device if generator is not None else valid.device
    select = torch.rand(valid.shape, generator=generator, device=device).to(valid.device)
    pick = torch.rand(valid.shape, generator=generator, device=device).to(valid.device)
    valid = valid.bool()
    masked = (select < probability) & valid
    if min_masked and valid.shape[1]:
        empty = ~masked.any(dim=1) & valid.any(dim=1)
        # uniform over the real regions: the argmax of uniform scores restricted to them
        forced = F.one_hot(pick.masked_fill(~valid, -1.0).argmax(dim=1), valid.shape[1]).bool()
        masked = masked | (forced & empty.unsqueeze(1))
    return masked
