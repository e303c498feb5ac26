"""Momentum (EMA) copies of online modules and MoCo-style feature queues, as ALBEF/TCL use them.

:class:`MomentumPair` holds frozen deep copies ("twins") of named online modules and moves them towards the online
weights with ``update()``: θm ← m·θm + (1 − m)·θ, under ``no_grad``. The caller decides when (ALBEF/TCL: once per
optimizer step, *before* the momentum forward pass). The twins are registered as children under the same names, so a
model that does ``self.momentum = MomentumPair({"vision": self.vision, "text": self.text, ...})`` has keys
``momentum.vision.*`` that mirror ``vision.*`` one to one: an official ``visual_encoder_m.*`` key converts to
``momentum.<our twin prefix>`` by the same prefix rename as its online twin. The online modules are *not* registered
(they belong to the model already), so nothing is stored twice.

Sharding (FSDP2): the twins are plain module trees mirroring the online ones. Build the pair on the unsharded model,
then apply ``fully_shard`` to each twin exactly as to its online module (same sub-module granularity, same mesh);
each twin parameter then has the same placement as its online parameter and ``update()`` works shard by shard
(``torch._foreach_*`` ops accept DTensors). Parameters are re-read from the modules at every ``update()``, so wrapping
after construction is fine. Keep ``requires_grad=False`` parameters out of the optimizer (filter on ``requires_grad``).

Twins follow the parent's train/eval mode (ALBEF runs its momentum encoders in train mode, dropout included). Only
parameters are averaged; buffers are left as copied (ALBEF does the same; our blocks have no running statistics).

:class:`FeatureQueue` is a ring buffer of features in ALBEF's layout: one ``[dim, size]`` buffer per name
(``image_queue``, ``text_queue``), an optional ``idx_queue`` ``[1, size]`` (ALBEF retrieval), and ``queue_ptr``
``[1]`` (long), so the official buffers load directly after a ``queue.`` prefix is added.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlp.utils.distributed import gather_no_grad

__all__ = ["MomentumPair", "FeatureQueue"]


class MomentumPair(nn.Module):
    """Frozen EMA twins of ``online`` modules.

    Args:
        online: name -> module (a dict or ``nn.ModuleDict``). Names must be valid attribute names.
        momentum: m in θm ← m·θm + (1 − m)·θ (ALBEF/TCL: 0.995).

    ``pair[name]`` / ``getattr(pair, name)`` is the twin; ``pair.online(name)`` the online module.
    """

    def __init__(self, online: Mapping[str, nn.Module] | nn.ModuleDict, momentum: float = 0.995):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        items = dict(online.items())
        if not items:
            raise ValueError("MomentumPair needs at least one online module")
        # A plain dict is not registered by nn.Module.__setattr__: the online modules stay owned by the model.
        self._online: dict[str, nn.Module] = {}
        for name, module in items.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"online[{name!r}] is {type(module).__name__}, expected an nn.Module")
            self._online[name] = module
            twin = copy.deepcopy(module)  # deepcopy keeps weight tying (e.g. MLM decoder = word embeddings)
            for p in twin.parameters():
                p.requires_grad_(False)
            self.add_module(name, twin)

    def names(self) -> list[str]:
        return list(self._online)

    def online(self, name: str) -> nn.Module:
        return self._online[name]

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def _pairs(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        twin_params = list(self._modules[name].parameters())
        online_params = list(self._online[name].parameters())
        if len(twin_params) != len(online_params):
            raise RuntimeError(
                f"momentum twin {name!r} has {len(twin_params)} parameters but its online module has "
                f"{len(online_params)}: were they changed after the pair was built?"
            )
        return twin_params, online_params

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """θm ← m·θm + (1 − m)·θ for every twin parameter (``momentum`` overrides ``self.momentum`` once)."""
        m = self.momentum if momentum is None else float(momentum)
        for name in self._online:
            twin, online = self._pairs(name)
            torch._foreach_mul_(twin, m)
            torch._foreach_add_(twin, online, alpha=1.0 - m)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the online weights into the twins (ALBEF's ``copy_params``), e.g. after loading pretrained weights
        into the online modules of an already built model."""
        for name in self._online:
            twin, online = self._pairs(name)
            torch._foreach_copy_(twin, online)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class FeatureQueue(nn.Module):
    """Ring buffers of (momentum) features, one per name, written with features gathered from every rank.

    Args:
        dim: feature dimension.
        size: number of slots; must be a multiple of the global batch (checked at ``enqueue``).
        names: queue names, or an int n for names ``"0" .. "n-1"``. Buffers are ``<name>_queue`` [dim, size],
            initialised randn and L2-normalised along ``dim`` (ALBEF).
        with_ids: also keep ``idx_queue`` [1, size] (long, initialised to -100), as ALBEF's retrieval fine-tuning.

    ``enqueue(*feats, ids=None)``: one [B, dim] tensor per name in ``names`` order (gathered across ranks, no grad),
    written at ``queue_ptr``; returns nothing. ``features(name)`` -> [size, dim].
    """

    def __init__(self, dim: int, size: int, names: Sequence[str] | int = ("image", "text"), with_ids: bool = False):
        super().__init__()
        if isinstance(names, int):
            names = [str(i) for i in range(names)]
        self.names = list(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"FeatureQueue needs distinct names, got {self.names}")
        if dim <= 0 or size <= 0:
            raise ValueError(f"FeatureQueue dim and size must be positive, got dim={dim}, size={size}")
        self.dim, self.size, self.with_ids = int(dim), int(size), bool(with_ids)
        for name in self.names:
            self.register_buffer(f"{name}_queue", F.normalize(torch.randn(dim, size), dim=0))
        if with_ids:
            self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _buffer(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no queue named {name!r}; queues: {self.names}")
        return getattr(self, f"{name}_queue")

    def features(self, name: str, snapshot: bool = True) -> torch.Tensor:
        """The queue ``name`` as [size, dim] (row i = slot i).

        ``snapshot=True`` (default) returns a detached copy, which is what a loss needs: ``enqueue`` writes the buffer
        in place, and a similarity ``feat @ queue.T`` keeps the queue for its backward, so a view would make the
        backward fail after an enqueue in the same step (ALBEF clones for the same reason). ``snapshot=False`` returns
        the aliasing view (read-only uses: evaluation, inspection).
        """
        view = self._buffer(name).t()
        return view.clone() if snapshot else view

    def ids(self, snapshot: bool = True) -> torch.Tensor:
        """The id queue as [size] (``with_ids=True`` only)."""
        if not self.with_ids:
            raise RuntimeError("this FeatureQueue keeps no ids (built with with_ids=False)")
        view = self.idx_queue[0]
        return view.clone() if snapshot else view

    @property
    def ptr(self) -> int:
        return int(self.queue_ptr.item())

    @torch.no_grad()
    def enqueue(self, *feats: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        if len(feats) != len(self.names):
            raise ValueError(f"enqueue takes one tensor per queue {self.names}, got {len(feats)}")
        batch = feats[0].shape[0]
        for name, f in zip(self.names, feats):
            if f.dim() != 2 or f.shape != (batch, self.dim):
                raise ValueError(
                    f"enqueue: features for {name!r} have shape {tuple(f.shape)}, expected [{batch}, {self.dim}]"
                )
        if self.with_ids and ids is None:
            raise ValueError("enqueue: this queue keeps ids (with_ids=True); pass ids=")
        if ids is not None and not self.with_ids:
            raise ValueError("enqueue: ids given but the queue was built with with_ids=False")
        # One collective for all feature queues: concatenate along the feature dim, gather, split.
        gathered = gather_no_grad(torch.cat([f.to(self._buffer(self.names[0]).dtype) for f in feats], dim=1))
        global_batch = gathered.shape[0]
        if self.size % global_batch != 0:
            world = global_batch // batch if batch else 1
            raise ValueError(
                f"queue size {self.size} is not a multiple of the global batch {global_batch} "
                f"(local batch {batch} x {world} rank(s)); choose a queue size divisible by it "
                f"(ALBEF/TCL: 65536 with a global batch of 512)"
            )
        ptr = self.ptr
        for i, name in enumerate(self.names):
            block = gathered[:, i * self.dim : (i + 1) * self.dim]
            self._buffer(name)[:, ptr : ptr + global_batch] = block.t()
        if ids is not None:
            all_ids = gather_no_grad(ids.reshape(-1).to(self.idx_queue.dtype))
            self.idx_queue[0, ptr : ptr + global_batch] = all_ids
        self.queue_ptr[0] = (ptr + global_batch) % self.size

    def extra_repr(self) -> str:
        return f"names={self.names}, dim={self.dim}, size={self.size}, with_ids={self.with_ids}"
