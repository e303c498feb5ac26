"""Word-region alignment by optimal transport (UNITER's WRA): the cosine cost, the IPOT plan, the distance, the loss.

UNITER (``model/ot.py``, ``pretrain.py``) aligns the final-layer word states x_i (i < M, [CLS] and [SEP] included)
with the region states y_j (j < N) of each ITM pair:

* cost ``C_ij = 1 - cos(x_i, y_j)`` (``F.normalize`` with eps 1e-5), 0 where either side is padding;
* plan ``T`` by IPOT (Xie et al. 2019, the inexact proximal point method) with uniform marginals ``1/n_x`` and
  ``1/n_y`` (the unpadded lengths), computed **without gradient on the detached cost in fp32**: ``A = exp(-C / beta)``
  on real entries (0 on padding), ``sigma = 1/n_x``, ``T = 1``; ``iterations`` times (with ``k`` inner steps,
  UNITER: 1): ``Q = A * T``, ``delta_j = 1 / (n_y sum_i Q_ij sigma_i)``, ``sigma_i = 1 / (n_x sum_j Q_ij delta_j)``,
  ``T = diag(sigma) Q diag(delta)``;
* distance ``D = <C, T> = sum_ij C_ij T_ij``: the gradient flows through the cost only;
* loss ``(sum_{pos} D - sum_{neg} D) / n_pairs`` (no margin; bounded since C is in [0, 2] and T has mass 1).

Layout and masks: ``T`` is [B, M, N] (text rows, region columns; the official code keeps its transpose), and the
masks are keep-masks as everywhere in the suite (True / 1 = a real token), where the official code takes padding
masks. Padded rows/columns are set to 0 by ``torch.where`` where the official code adds 1e4 to a denominator; both
leave the padded entries of ``T`` at 0 and the real ones unchanged. Two guards keep fp32 finite for small betas and
many iterations (the official code overflows there; at UNITER's beta 0.5 and 50 iterations they change nothing but
rounding): sigma is rescaled to max 1/n_x before each iteration (the plan does not depend on the scalings' common
factor, along which they drift), and a scaling or plan entry that overflows becomes 0 (that row or column loses its
mass: the plan stays finite, never NaN). Entries of ``exp(-C / beta)``-weighted plans shrink geometrically with the
iterations, so fp32 loses the support of far-off entries for small betas: there, IPOT's result is only approximate
(see the tests: beta 0.1 with 300 iterations is within 1e-5 of the exact optimum). A pair with no real token on a
side gets distance 0 instead of NaN. The distance is returned in fp32 (the official code casts it back to the
states' dtype). Defaults: beta 0.5, 50 iterations, k 1 (``optimal_transport_dist``'s). Autocast is switched off
inside, so the cost and the plan are fp32 under mixed precision too (the official "run in fp32 for stability").

POT's ``ot.solve_batch(method="proximal")`` has a sign error in POT 0.9.7 (POT issue #842), so the tests compare
this plan with POT's exact ``ot.emd2`` instead: IPOT's proximal term vanishes at convergence, so with a small beta
and enough iterations its cost approaches the exact optimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_cost", "ipot_plan", "ot_distance", "wra_loss"]


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 - cos(x_i, y_j)``: [B, M, D] x [B, N, D] -> [B, M, N] (UNITER's ``cost_matrix_cosine``)."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"cosine_cost: expected [B, M, D] and [B, N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    return 1 - F.normalize(x, p=2, dim=-1, eps=eps) @ F.normalize(y, p=2, dim=-1, eps=eps).transpose(1, 2)


def _fp32(device: torch.device):
    """No autocast: under bf16/fp16-mixed training the matmuls here would otherwise run in half precision."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def ipot_plan(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float = 0.5, iterations: int = 50,
              k: int = 1) -> Tensor:
    """The IPOT transport plan [B, M, N] (fp32, no gradient) of ``cost`` [B, M, N] between the real rows
    (``x_mask`` [B, M]) and columns (``y_mask`` [B, N]), marginals ``1/n_x`` and ``1/n_y``; 0 on padding."""
    if beta <= 0 or iterations < 1 or k < 1:
        raise ValueError(f"ipot_plan: need beta > 0, iterations >= 1, k >= 1; got {beta}, {iterations}, {k}")
    with _fp32(cost.device):
        return _ipot(cost, x_mask, y_mask, beta, iterations, k)


def _ipot(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float, iterations: int, k: int) -> Tensor:
    c = cost.detach().float()
    xm, ym = x_mask.bool(), y_mask.bool()
    joint = xm.unsqueeze(2) & ym.unsqueeze(1)
    n_x = xm.sum(1).clamp(min=1).float().view(-1, 1, 1)
    n_y = ym.sum(1).clamp(min=1).float().view(-1, 1, 1)
    a = torch.exp(-c / beta).masked_fill_(~joint, 0.0)
    plan = joint.float()
    sigma = xm.float().unsqueeze(2) / n_x  # [B, M, 1]; delta is [B, 1, N]
    tiny = torch.finfo(c.dtype).tiny
    for _ in range(iterations):
        q = a * plan
        # The scalings have a gauge freedom (sigma * c, delta / c give the same plan) along which they drift
        # geometrically with a small beta until fp32 overflows; fixing the gauge (max sigma = 1/n_x) changes no plan.
        sigma = sigma / (sigma.amax(dim=1, keepdim=True) * n_x).clamp_(min=tiny)
        for _ in range(k):
            delta = _reciprocal(n_y * torch.bmm(sigma.transpose(1, 2), q))  # 1 / (n_y sum_i sigma_i Q_ij)
            sigma = _reciprocal(n_x * torch.bmm(q, delta.transpose(1, 2)))  # 1 / (n_x sum_j Q_ij delta_j)
        plan = (sigma * q * delta).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return plan.masked_fill_(~joint, 0.0)


def _reciprocal(value: Tensor) -> Tensor:
    """``1 / value`` where finite, else 0: padded rows/columns (all-zero Q) get scaling 0, and so does a row or column
    whose entries all underflowed (fp32, a small beta, many iterations): it loses its mass, the plan never turns NaN."""
    return value.reciprocal_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def ot_distance(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float = 0.5, iterations: int = 50,
                k: int = 1, return_plan: bool = False):
    """UNITER's ``optimal_transport_dist``: per pair ``<C, T>`` [B] (fp32) between word states ``x`` [B, M, D]
    and region states ``y`` [B, N, D] under keep-masks ``x_mask`` [B, M], ``y_mask`` [B, N]; gradient through the
    cost only. ``return_plan``: also the plan [B, M, N]."""
    with _fp32(x.device):
        cost = cosine_cost(x.float(), y.float())
        joint = x_mask.bool().unsqueeze(2) & y_mask.bool().unsqueeze(1)
        cost = cost.masked_fill(~joint, 0.0)
        plan = ipot_plan(cost, x_mask, y_mask, beta, iterations, k)
        dist = (cost * plan).sum(dim=(1, 2))
    # A pair without a real token on a side has an all-zero plan: its distance is 0 (the official code gives NaN).
    return (dist, plan) if return_plan else dist


def wra_loss(distance: Tensor, labels: Tensor) -> Tensor:
    """``(sum of positive-pair distances - sum of negative-pair distances) / n_pairs`` (UNITER's ``ot_loss``); labels
    [B] with 1 = matched. 0 (attached to the graph) for an empty batch; a batch with only positives or only
    negatives is fine (its other sum is 0), as in the official code."""
    if distance.shape != labels.shape:
        raise ValueError(f"wra_loss: distance {tuple(distance.shape)} and labels {tuple(labels.shape)} differ")
    sign = torch.where(labels.bool(), 1.0, -1.0).to(distance.dtype)
    return (distance * sign).sum() / max(1, distance.numel())
