"""Weakly-supervised phrase grounding (MVPTR's WPG): phrases should find their regions in their own image.

For text t and image i, the score ``s(t, i)`` is, over the phrases p of t, the mean of one similarity picked at
random among the top-k (k = 3) cosine similarities between p and the regions of i, all states taken from the
cross-modal encoder's output of the *positive* pairs (the official ``t2i_sim``: phrase rows of pair t, region rows
of pair i, each L2-normalised). The loss of text t is the hinge ``max(0, margin + s(t, neg_t) - s(t, t))`` against
a random other image ``neg_t`` of the batch, averaged over the texts with at least one phrase (margin 0.2).

Vectorised over the batch with padding masks (the official ``get_pos_neg_sims`` loops over samples and ``topk(3)``
fails on an image with fewer than 3 regions): an image with n < k regions picks among its n. The random choices are
inputs -- ``neg_image`` [B] and the top-k picks ``pick_pos`` / ``pick_neg`` [B, P] as uniforms in [0, 1) or as
indices -- so a caller draws them from a seeded generator (or replays recorded ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_rows", "text_image_scores", "wpg_loss", "draw_wpg_choices"]


def gather_rows(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``states`` [B, L, H] where ``mask`` [B, L] is True, packed to the left: ``([B, P, H], [B, P])``
    with P the most rows of any sample (at least 1), padding masked out."""
    mask = mask.bool()
    counts = mask.sum(1)
    p = max(1, int(counts.max()) if counts.numel() else 1)
    # stable sort puts the selected positions first, in order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :p]
    rows = torch.gather(states, 1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
    keep = torch.arange(p, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return rows * keep.unsqueeze(-1).to(rows.dtype), keep


def text_image_scores(phrases: Tensor, phrase_mask: Tensor, regions: Tensor, region_mask: Tensor,
                      pick: Tensor, top_k: int = 3) -> Tensor:
    """``s(t, image of row t)`` [B] for phrase rows ``phrases`` [B, P, H] and region rows ``regions`` [B, N, H]
    (row t of each already paired). ``pick`` [B, P]: float uniforms in [0, 1) (index ``floor(u * min(k, n))``)
    or long indices into the sorted top-k. Texts without phrases score 0."""
    p_hat = F.normalize(phrases.float(), dim=-1)
    r_hat = F.normalize(regions.float(), dim=-1)
    sims = torch.einsum("bph,bnh->bpn", p_hat, r_hat)
    sims = sims.masked_fill(~region_mask.bool().unsqueeze(1), float("-inf"))
    k = min(top_k, sims.shape[-1])
    top = sims.topk(k, dim=-1).values  # [B, P, k], descending
    available = region_mask.bool().sum(1).clamp(min=1, max=k)  # [B]
    if pick.is_floating_point():
        index = (pick * available.unsqueeze(1)).long()
    else:
        index = pick.long()
    index = torch.minimum(index, (available - 1).unsqueeze(1)).clamp(min=0)
    chosen = torch.gather(top, 2, index.unsqueeze(-1)).squeeze(-1)  # [B, P]
    keep = phrase_mask.bool() & torch.isfinite(chosen)  # an image without regions scores 0
    chosen = torch.where(keep, chosen, torch.zeros_like(chosen))
    n = keep.sum(1)
    return chosen.sum(1) / n.clamp(min=1)


def wpg_loss(phrases: Tensor, phrase_mask: Tensor, regions: Tensor, region_mask: Tensor, neg_image: Tensor,
             pick_pos: Tensor, pick_neg: Tensor, margin: float = 0.2, top_k: int = 3) -> dict:
    """The WPG loss and its parts: ``loss`` (scalar; 0 with a graph when no text qualifies), ``pos`` / ``neg``
    [B] scores, ``valid`` [B] (a text with phrases and another image to contrast with)."""
    pos = text_image_scores(phrases, phrase_mask, regions, region_mask, pick_pos, top_k)
    neg_image = neg_image.to(regions.device).long()
    neg = text_image_scores(phrases, phrase_mask, regions[neg_image], region_mask[neg_image], pick_neg, top_k)
    b = phrases.shape[0]
    has_regions = region_mask.bool().any(1)
    valid = (phrase_mask.bool().any(1) & (neg_image != torch.arange(b, device=neg_image.device))
             & has_regions & has_regions[neg_image])
    hinge = (neg + margin - pos).clamp(min=0)
    loss = (hinge * valid).sum() / valid.sum().clamp(min=1)
    return {"loss": loss, "pos": pos, "neg": neg, "valid": valid}


def draw_wpg_choices(batch_size: int, max_phrases: int, generator: torch.Generator | None = None,
                     device=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(neg_image [B], pick_pos [B, P], pick_neg [B, P])``: for each text a uniformly drawn other image of the
    batch (itself when the batch has one sample: such a text does not count), and uniforms for the top-k picks."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    b = batch_size
    if b > 1:
        r = torch.randint(0, b - 1, (b,), generator=generator, device=gen_device)
        neg = r + (r >= torch.arange(b, device=gen_device)).long()
    else:
        neg = torch.zeros(1, dtype=torch.long, device=gen_device)
    picks = torch.rand(2, b, max(1, max_phrases), generator=generator, device=gen_device)
    device = device if device is not None else gen_device
    return neg.to(device), picks[0].to(device), picks[1].to(device)
