"""InfoNCE contrastive loss with distributed gathering, queues, multi-positive and distilled targets.

One function, :func:`info_nce`, serves every contrastive objective of the suite:

* ALBEF/TCL cross-modal alignment (CMA/ITC): online queries vs momentum keys + queue, soft targets from the
  momentum query (momentum distillation);
* TCL intra-modal contrast (IMC): image vs momentum image of the other view + image queue, text vs momentum
  text + text queue, hard targets;
* CLIP/open_clip-style ITC (BridgeTower's optional ITC): local queries vs keys gathered from every rank with
  gradient, positives at ``arange(B) + rank * B``, or multi-positive targets from image ids (retrieval).

Math (per query row ``i``, keys ``k`` = [keys ; queue], temperature ``tau``)::

    logits[i, k] = <q_i, key_k> / tau
    loss_i       = -sum_k targets[i, k] * log_softmax(logits[i])[k]
    loss         = mean_i loss_i                        (the per-rank loss; DDP averages over ranks)

    targets = (1 - alpha) * hard + alpha * softmax(<q_m_i, key_k> / tau)       (alpha = 0: hard only)
    hard    = one-hot at the positive,  or  pos_mask / pos_mask.sum(1)  with pos_mask[i, k] = ids_i == ids_k

This is ALBEF/TCL's ``-sum(log_softmax(sim) * targets, 1).mean()`` verbatim; with one-hot targets it equals
cross-entropy. Similarities are computed in fp32 even under autocast: with tau down to 1e-3 the logits reach
1000, where bf16/fp16 rounding is larger than the gaps that matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.utils import distributed as vdist

__all__ = [
    "Temperature",
    "info_nce",
    "soft_cross_entropy",
    "multi_positive_targets",
    "distillation_targets",
]


class Temperature(nn.Module):
    """Learnable softmax temperature, clamped in place to ``[min, max]`` at every forward (ALBEF/TCL).

    The value is stored as a 1-d parameter of shape [1] (not 0-d): FSDP2 cannot shard 0-d parameters. Official
    ALBEF/TCL checkpoints hold a 0-d ``temp``; a converter reshapes it to [1].

    ``forward()`` returns the clamped value as a 0-d tensor that carries the gradient to the parameter. The clamp
    is applied to the stored value (not as a differentiable ``clamp``), as in the official code: a value pushed
    past a bound is reset to the bound, so it stays at the bound with a live gradient instead of drifting out of
    range with a zero gradient. The clamp writes through ``.data`` so that it does not bump the autograd version
    counter: calling the module several times in one step (CMA, IMC and LMI share one temperature) would
    otherwise invalidate the graph of the earlier calls. Only the first call of a step can change the value.

    Under FSDP2 the forward sees the all-gathered (unsharded) copy, so the clamp bounds the value used but not
    the stored shard. For the official dynamics there (stored value reset to the bound), also call
    :meth:`clamp_` outside the forward, e.g. at the start of each training batch: it clamps the shards.
    """

    def __init__(self, init: float = 0.07, min: float = 0.001, max: float = 0.5, learnable: bool = True):
        super().__init__()
        if not (0.0 < min <= init <= max):
            raise ValueError(f"Temperature needs 0 < min <= init <= max, got min={min}, init={init}, max={max}")
        self.init = float(init)
        self.min = float(min)
        self.max = float(max)
        self.value = nn.Parameter(torch.full((1,), self.init), requires_grad=learnable)

    def reset_parameters(self) -> None:
        """Refill the initial value (for models built on the meta device and materialised with to_empty)."""
        with torch.no_grad():
            self.value.fill_(self.init)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored value in place. Elementwise, so it also works on a sharded (FSDP2 DTensor) value."""
        self.value.data.clamp_(self.min, self.max)

    def forward(self) -> Tensor:
        self.clamp_()
        # A copy, not a view: under FSDP2 the parameter's unsharded storage is freed after the module reshards,
        # and a view kept for logging would then point at freed memory.
        return self.value.squeeze(0).clone()

    def extra_repr(self) -> str:
        # No .item(): the module may live on the meta device (deferred init) or be sharded.
        return f"init={self.init:g}, min={self.min:g}, max={self.max:g}"


def soft_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """``-sum_k targets[i, k] * log_softmax(logits[i])[k]``, averaged over rows (``reduction='mean'``).

    logits, targets: [B, K]; each targets row is a distribution (sums to 1). Returns a scalar, or [B] with
    ``reduction='none'``.
    """
    per_row = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    return _reduce(per_row, reduction)


def multi_positive_targets(query_ids: Tensor, key_ids: Tensor) -> Tensor:
    """Targets spreading each row's mass uniformly over the keys that share its id.

    query_ids [B], key_ids [K] (any integer ids, e.g. image ids). Returns float [B, K] with
    ``pos_mask / pos_mask.sum(1)``. Raises if a query has no positive key (its target would be undefined).
    """
    pos = (query_ids.reshape(-1, 1) == key_ids.reshape(1, -1)).float()
    count = pos.sum(dim=1, keepdim=True)
    if bool((count == 0).any()):
        missing = torch.nonzero(count.squeeze(1) == 0).flatten().tolist()
        raise ValueError(f"multi_positive_targets: queries {missing} have no key with the same id")
    return pos / count


def distillation_targets(teacher_logits: Tensor, hard_targets: Tensor, alpha: float) -> Tensor:
    """ALBEF momentum-distillation targets: ``alpha * softmax(teacher_logits) + (1 - alpha) * hard_targets``.

    teacher_logits, hard_targets: [B, K]. The teacher is detached (no gradient reaches the momentum model).
    """
    return alpha * F.softmax(teacher_logits.detach().float(), dim=1) + (1.0 - alpha) * hard_targets


def info_nce(
    query: Tensor,
    keys: Tensor,
    temperature: float | Tensor,
    *,
    gather: bool = False,
    queue: Tensor | None = None,
    query_ids: Tensor | None = None,
    key_ids: Tensor | None = None,
    queue_ids: Tensor | None = None,
    teacher_query: Tensor | None = None,
    alpha: float = 0.0,
    reduction: str = "mean",
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """InfoNCE of ``query`` rows against ``[keys ; queue]`` (see the module docstring for the math).

    Args:
        query: [B, D] anchors (this rank's batch), usually L2-normalised projections, with gradient.
        keys: [B, D] this rank's keys; row i is query i's positive unless ids are given. With ``gather=True`` the
            keys of all ranks are all-gathered WITH gradient into [W * B, D] and query i's positive is global
            row ``rank * B + i`` (open_clip's local-vs-global loss). Without gathering (ALBEF/TCL) only this
            rank's keys are used.
        temperature: float or tensor (e.g. ``Temperature()()``); logits are divided by it.
        queue: [Q, D] extra keys appended after the batch keys (MoCo/ALBEF queue, rows = features; an official
            [D, Q] queue is passed as ``queue.T``). Treated as constants (detached).
        query_ids, key_ids: [B] ids; when given, every key sharing the query's id is a positive and the hard
            target is ``pos_mask / pos_mask.sum(1)`` (ALBEF retrieval, BridgeTower ITC). ``key_ids`` are gathered
            along with the keys; ``queue_ids`` [Q] give the ids of queue entries (without them the queue holds
            negatives only). ``key_ids`` defaults to ``query_ids`` (paired batches).
        teacher_query: [B, D] momentum-model query for soft targets: teacher logits are
            ``teacher_query @ [keys ; queue].T / tau`` (no gradient), and the targets become
            ``alpha * softmax(teacher logits) + (1 - alpha) * hard``.
        alpha: distillation weight in [0, 1]; 0 gives the plain hard-target loss.
        reduction: ``'mean'`` over this rank's queries, or ``'none'`` for [B] per-query losses.
        return_logits: also return the student logits [B, K_total] (fp32), e.g. for hard-negative mining,
            where TCL/ALBEF use ``logits[:, :B]``.

    Returns:
        The loss (scalar, or [B]), and the logits when ``return_logits``.

    Distributed: each rank returns the mean over its own queries of the loss against the global keys. Averaging
    these over ranks (what DDP does to gradients) equals the single-process loss on the whole global batch, and
    the gathered-with-grad keys make the gradients equal too.
    """
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"info_nce expects query [B, D] and keys [K, D], got {tuple(query.shape)}, "
                         f"{tuple(keys.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0.0 and teacher_query is None:
        raise ValueError("info_nce: alpha > 0 needs teacher_query (the momentum model's query features)")
    b = query.shape[0]
    use_ids = query_ids is not None
    if not use_ids and keys.shape[0] != b:
        raise ValueError(f"info_nce without ids pairs query i with key i: need {b} keys per rank, "
                         f"got {keys.shape[0]} (pass query_ids/key_ids for other layouts)")

    with torch.autocast(device_type=query.device.type, enabled=False):
        query = query.float()
        keys = keys.float()
        offset = 0
        if gather and vdist.world_size() > 1:
            offset = vdist.rank() * keys.shape[0]
            keys = vdist.gather_with_grad(keys)
            if use_ids:
                key_ids = vdist.gather_no_grad(key_ids if key_ids is not None else query_ids)
        elif use_ids and key_ids is None:
            key_ids = query_ids
        all_keys = keys if queue is None else torch.cat([keys, queue.detach().float()], dim=0)
        logits = query @ all_keys.t() / temperature

        if use_ids:
            ids = key_ids
            if queue is not None:
                # Queue entries without ids can never be positives: give them an id no query carries.
                q_ids = queue_ids if queue_ids is not None else _ids_matching_nothing(query_ids, queue.shape[0])
                ids = torch.cat([key_ids.reshape(-1), q_ids.reshape(-1).to(key_ids.dtype)])
            hard = multi_positive_targets(query_ids, ids)
        else:
            positive = torch.arange(b, device=query.device) + offset
            hard = None

        if teacher_query is not None and alpha > 0.0:
            with torch.no_grad():
                t = temperature.detach() if isinstance(temperature, Tensor) else temperature
                teacher_logits = teacher_query.detach().float() @ all_keys.detach().t() / t
                if hard is None:
                    hard = F.one_hot(positive, all_keys.shape[0]).float()
                targets = distillation_targets(teacher_logits, hard, alpha)
            loss = soft_cross_entropy(logits, targets, reduction)
        elif hard is not None:
            loss = soft_cross_entropy(logits, hard, reduction)
        else:
            # One-hot targets: cross-entropy is the same number without materialising a [B, K] target matrix.
            loss = F.cross_entropy(logits, positive, reduction=reduction)
    return (loss, logits) if return_logits else loss


def _ids_matching_nothing(query_ids: Tensor, n: int) -> Tensor:
    """n ids that differ from every query id (so unlabeled queue entries are negatives)."""
    sentinel = query_ids.min() - 1 if query_ids.numel() else torch.zeros((), dtype=query_ids.dtype)
    return sentinel.expand(n).to(query_ids.device)


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
