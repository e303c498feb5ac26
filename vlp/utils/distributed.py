"""Small helpers over ``torch.distributed`` that degrade to no-ops in a single process.

Every helper works the same whether the process group was created by Lightning (DDP, ddp_spawn, FSDP2 via
ModelParallelStrategy) or by hand, and returns its input unchanged when no group is initialised or the world has
one rank, so losses can call them unconditionally.

Gathers concatenate along dim 0 in rank order, so rank ``r``'s rows sit at ``[r * B, (r + 1) * B)``. They require
the same shape on every rank (as DDP's equal-sized per-rank batches guarantee); a collective with mismatched
shapes fails inside the backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "gather_with_grad", "gather_no_grad"]


def is_distributed() -> bool:
    """True when a default process group exists (whatever its size)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def _autograd_all_gather():
    """The differentiable all-gather of this torch version.

    The functional collectives are the maintained path (``torch.distributed.nn.functional.all_gather`` is
    deprecated and warns); their backward is a reduce-scatter with SUM, i.e. each rank receives the sum over
    ranks of the gradient flowing into its slice. The names moved between torch releases, hence the lookup.
    """
    import torch.distributed._functional_collectives as fc

    for name in ("all_gather_single_autograd", "all_gather_tensor_autograd"):
        fn = getattr(fc, name, None)
        if fn is not None:
            return fn
    return None


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """All-gather ``x`` [B, ...] from every rank into [W * B, ...], keeping the autograd graph.

    Backward: the gradient of the gathered tensor is summed over ranks and each rank receives its own slice
    (reduce-scatter SUM). With DDP averaging parameter gradients over W ranks, a per-rank loss computed from the
    gathered tensor therefore yields exactly the gradient of the mean of the per-rank losses.

    Plain ``dist.all_gather`` is NOT used: it returns tensors detached from the graph, which silently drops the
    gradient flowing through other ranks' copies of this rank's features.
    """
    if world_size(group) == 1:
        return x
    group = group if group is not None else dist.group.WORLD
    x = x.contiguous()
    fn = _autograd_all_gather()
    if fn is not None:
        out = fn(x, 0, group)
        # The functional collectives may return an AsyncCollectiveTensor; materialise it so callers can use
        # in-place ops or pass it to code that inspects the type.
        wait = getattr(out, "wait", None)
        return wait() if callable(wait) else out
    from torch.distributed.nn.functional import all_gather as _nn_all_gather

    return torch.cat(_nn_all_gather(x, group=group), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor, group=None) -> Tensor:
    """All-gather ``x`` [B, ...] into [W * B, ...] without gradient (queue features, ids, labels).

    The result is detached even in a single process, so it is safe to store in a buffer.
    """
    if world_size(group) == 1:
        return x.detach()
    x = x.detach().contiguous()
    out = x.new_empty((world_size(group) * x.shape[0], *x.shape[1:]))
    # Newer torch renamed all_gather_into_tensor (which now warns) to all_gather_single.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(out, x, group=group)
    return out
