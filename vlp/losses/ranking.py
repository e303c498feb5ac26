"""UNITER's retrieval objective: a hinge ranking loss over matching scores, with sampled hard negatives.

Math (``pos[i]``: the score of anchor i's positive pair, ``neg[i, k]``: of its k-th negative pair, margin ``m``)::

    loss = mean_{i, k} max(0, m + neg[i, k] - pos[i])

The official ``UniterForImageTextRetrieval`` scores a pair by ``sigmoid(rank_output(pooled))`` (a Linear(H, 1)
initialised from the ITM head's matched row), margin 0.2, and averages the hinge over every negative of every
anchor; its hard-negative variant draws many negatives per anchor, scores them without gradient and trains on the
top few, text-anchored and image-anchored in turn. :func:`draw_candidates` is the draw (uniform, without
replacement, never the anchor's own image id) and :func:`hardest_candidates` the pick.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hinge_rank_loss", "draw_candidates", "hardest_candidates"]


def hinge_rank_loss(pos: Tensor, neg: Tensor, margin: float = 0.2) -> Tensor:
    """``mean max(0, margin + neg[i, k] - pos[i])`` over all anchors i and negatives k.

    pos: [B] scores of the positive pairs; neg: [B, K] scores of each anchor's negatives (same scale as ``pos``:
    UNITER's sigmoid probabilities)."""
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"hinge_rank_loss expects pos [B] and neg [B, K], got {tuple(pos.shape)}, "
                         f"{tuple(neg.shape)}")
    return (margin + neg.float() - pos.float().unsqueeze(1)).clamp(min=0).mean()


def draw_candidates(valid: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` distinct candidates per row, uniformly among the row's valid ones (``valid`` bool [B, K], e.g.
    ``vlp.losses.matching.valid_negative_mask``): long [B, n]. Raises when a row has fewer than ``n``."""
    have = valid.sum(1)
    if bool((have < n).any()):
        rows = torch.nonzero(have < n).flatten().tolist()
        raise ValueError(f"draw_candidates: rows {rows[:8]} have fewer than {n} valid negatives (at most "
                         f"{int(have.min())}); lower the number of candidates or raise the batch size")
    keys = torch.rand(valid.shape, generator=generator, device=generator.device if generator else valid.device)
    keys = keys.to(valid.device).masked_fill(~valid, -1.0)  # invalid ones sort last
    return keys.topk(n, dim=1).indices


def hardest_candidates(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Of each row's ``candidates`` [B, C] with ``scores`` [B, C], the ``k`` highest-scored: long [B, k], in
    decreasing order of score."""
    if scores.shape != candidates.shape or not 1 <= k <= candidates.shape[1]:
        raise ValueError(f"hardest_candidates: scores {tuple(scores.shape)} and candidates "
                         f"{tuple(candidates.shape)} must agree and 1 <= k={k} <= {candidates.shape[1]}")
    return candidates.gather(1, scores.topk(k, dim=1).indices)
