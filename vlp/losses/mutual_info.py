"""TCL's local mutual-information maximisation (LMI): a global-to-local InfoNCE with in-batch negatives.

:func:`in_batch_g2l_loss` scores a sample's global feature against its own local features (positives) and the
local features of every other sample in the batch (negatives); :func:`patch_pooling` turns ViT patch tokens into
the image locals.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["in_batch_g2l_loss", "patch_pooling"]

# TCL masks logits by setting them to -10000 (and padded positives to +10000). Same constant here, so that
# results match the official code in every regime, including B = 1 where every negative is masked.
_MASKED = 10000.0


def in_batch_g2l_loss(
    locals_: Tensor,
    globals_: Tensor,
    temperature: float | Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Global-to-local InfoNCE (TCL ``in_batch_g2l_loss``), DIM/AMDIM-style, in-batch negatives only.

    For sample i with global ``m_i`` and locals ``l_ij``::

        u_p(i, j)      = <l_ij, m_i> / tau                       positive of anchor (i, j)
        u_n(i, k, j')  = <m_i, l_kj'> / tau                      negatives: all locals of all samples k != i
        u_n(i, i, *)   = -10000                                  (own locals are not negatives)
        u_n(i, k, j')  = -10000  where mask[k, j'] = 0           (padded locals are not negatives)
        loss(i, j)     = -log softmax([u_p(i, j), u_n(i, :, :)])[0]

    The negative set of sample i is shared by all its anchors j. Reduction over anchors:

    * ``mask is None`` (image locals): mean over all (i, j);
    * with ``mask`` [B, N] (text locals, TCL passes ``attention_mask[:, 1:]``): padded anchors contribute 0
      (TCL sets their positive to +10000, which makes their term exactly 0), per sample
      ``sum_j loss(i, j) / sum_j mask[i, j]``, then the mean over samples.

    Args:
        locals_: [B, N, D] local features (TCL: momentum-encoder tokens through the momentum projection,
            L2-normalised per token; pooled image locals are not renormalised).
        globals_: [B, D] global features (TCL: the online normalised CLS projection, with gradient).
        temperature: float or tensor.
        mask: optional [B, N], 1/True for real locals, 0/False for padding.
        reduction: ``'mean'`` or ``'none'`` (per-sample [B] losses, before the batch mean).

    Unlike the official code (``.squeeze()``), B = 1 and N = 1 work: with B = 1 there is no negative and the
    loss is 0. A sample whose locals are all padding contributes 0 instead of dividing by zero. Computed in fp32.
    """
    if locals_.dim() != 3 or globals_.dim() != 2 or locals_.shape[0] != globals_.shape[0] \
            or locals_.shape[2] != globals_.shape[1]:
        raise ValueError(f"in_batch_g2l_loss expects locals [B, N, D] and globals [B, D], got "
                         f"{tuple(locals_.shape)}, {tuple(globals_.shape)}")
    b, n, d = locals_.shape
    if mask is not None and tuple(mask.shape) != (b, n):
        raise ValueError(f"mask must be [{b}, {n}], got {tuple(mask.shape)}")

    with torch.autocast(device_type=locals_.device.type, enabled=False):
        l = locals_.float()
        m = globals_.float()
        u_p = torch.einsum("bnd,bd->bn", l, m) / temperature                     # [B, N]
        u_n = (m @ l.reshape(b * n, d).t() / temperature).reshape(b, b, n)        # [B(i), B(k), N(j')]
        invalid = torch.eye(b, dtype=torch.bool, device=l.device).unsqueeze(2)    # k == i
        if mask is not None:
            valid_local = mask.to(device=l.device).bool()
            invalid = invalid | ~valid_local.unsqueeze(0)
        u_n = u_n.masked_fill(invalid, -_MASKED)
        # log softmax([u_p, u_n])[0] = u_p - logsumexp(u_p, u_n); the negatives' logsumexp is shared by every
        # anchor of sample i, so it is computed once per sample instead of expanding to [B, N, 1 + B*N].
        lse_neg = torch.logsumexp(u_n.reshape(b, b * n), dim=1, keepdim=True)    # [B, 1]
        per_anchor = torch.logaddexp(u_p, lse_neg) - u_p                          # [B, N] = -log p_pos

        if mask is None:
            # Equal local counts per sample, so the mean of per-sample means is the mean over all (i, j).
            per_sample = per_anchor.mean(dim=1)
        else:
            per_anchor = torch.where(valid_local, per_anchor, torch.zeros_like(per_anchor))
            count = valid_local.sum(dim=1).clamp(min=1).to(per_anchor.dtype)
            per_sample = per_anchor.sum(dim=1) / count
        if reduction == "mean":
            return per_sample.mean()
        if reduction == "none":
            return per_sample
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def patch_pooling(patch_tokens: Tensor, n_locals: int = 16) -> Tensor:
    """Average-pool ViT patch tokens [B, L, D] (no CLS) on their square grid into ``n_locals`` regions.

    The L tokens are read row-major as a g x g grid (g = sqrt(L)) and averaged over non-overlapping
    k x k windows, k = g / sqrt(n_locals), giving [B, n_locals, D] in row-major window order. TCL pre-training:
    16 x 16 patches, kernel 4 -> 16 locals; retrieval at 384 px: 24 x 24, kernel 6 -> 16 locals. (TCL's
    pre-training code derives the output side as sqrt(g) instead: the same for g = 16; for a 4 x 4 grid it gives
    2 x 2, i.e. ``n_locals=4``.)

    Raises ValueError if L is not a square, n_locals is not a square, or the grid side is not divisible by the
    output side.
    """
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch_pooling expects [B, L, D], got {tuple(patch_tokens.shape)}")
    b, length, d = patch_tokens.shape
    g = math.isqrt(length)
    if g * g != length:
        raise ValueError(f"patch_pooling: {length} patch tokens do not form a square grid (drop the CLS token?)")
    s = math.isqrt(n_locals)
    if n_locals < 1 or s * s != n_locals:
        raise ValueError(f"patch_pooling: n_locals={n_locals} is not a square number")
    if g % s:
        raise ValueError(f"patch_pooling: a {g}x{g} patch grid cannot be pooled into {s}x{s} equal windows")
    k = g // s
    # [B, s, k, s, k, D]: (window row, row inside, window col, col inside); average inside each window.
    pooled = patch_tokens.reshape(b, s, k, s, k, d).mean(dim=(2, 4))
    return pooled.reshape(b, n_locals, d)

