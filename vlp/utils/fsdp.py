"""FSDP2 (torch's ``fully_shard``) for the pre-training modules: ``trainer.strategy: fsdp2``.

``vlp.train`` resolves ``fsdp2`` into Lightning's ``ModelParallelStrategy(data_parallel_size=<world>,
tensor_parallel_size=1)``, the strategy that shards on CPU (gloo) as on GPUs; ``PretrainModule.configure_model`` then
calls :func:`shard_model` with the model's ``fsdp_blocks()``. The layout, as torchtitan's and Lightning's examples:

* every transformer block (each layer of every stack: text, vision, fusion / cross-modal, the momentum twins' too) is
  its own FSDP unit: all-gathered just before its forward, freed after it, gathered again for its backward;
* the root unit holds everything else (embeddings, heads, projections, temperatures, the twins' embeddings, ...). Its
  forward is the method that runs one training step (``forward_method``: ``step``, or ``forward`` for a model whose
  ``step`` calls it), so that everything a step reads outside the blocks is gathered for the whole step, however the
  model reaches it (a tied embedding read by a head, a table row read directly, a tower's non-forward method).
* buffers (feature queues, their pointers) are not sharded: each rank keeps its own copy, and the queues are written
  with features gathered from every rank, so they stay identical.

Why the momentum update (and any other in-place write to a parameter) must run outside the root's forward: during it
the root unit's parameters are all-gathered copies that FSDP frees afterwards without writing them back, so a write
into them would be lost. Outside it every parameter is its own shard (a DTensor with ``Shard(0)`` on one mesh), and a
twin is sharded exactly like its online module, so ``θm ← m·θm + (1 − m)·θ`` on the local shards is the update of the
full tensors. ``Temperature`` clamps its stored value at every forward; under FSDP that clamps the gathered copy only,
so :func:`clamp_stored` clamps the shards before each step (the official dynamics: a value past a bound is reset).

Mixed precision: with ``precision: bf16-mixed`` Lightning autocasts the step; :func:`mixed_precision_policy` adds
FSDP2's policy (parameters gathered and computed in bf16, gradients reduced in fp32, shards and optimizer in fp32).

FSDP2 shards along dim 0, so a 0-d parameter cannot be sharded: :func:`shard_model` refuses one, naming it (the models
keep temperatures and logit scales as 1-element vectors).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["STRATEGY", "fsdp2_strategy", "is_shard", "is_sharded", "mixed_precision_policy", "shard_model",
           "stack_layers", "clamp_stored", "full_tensor"]

STRATEGY = "fsdp2"  # the trainer.strategy value that selects this path

_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fsdp2_strategy(timeout_s: float):
    """Lightning's ``ModelParallelStrategy`` as pure data parallelism over every rank (``data_parallel_size`` = the
    world size, however ``trainer.devices`` / ``num_nodes`` give it; ``tensor_parallel_size`` 1), with the process
    group's ``timeout_s``.

    Checkpoints are single files (``save_distributed_checkpoint=False``: the full state gathered to rank 0, on the
    CPU), so ``last.ckpt`` / ``step*.ckpt`` are what every other strategy writes: resume, the damaged-checkpoint
    check, ``vlp evaluate``, fine-tuning and the converters read them unchanged, and a run can resume under another
    strategy or world size. Lightning loads such a file into the sharded model and optimizer itself."""
    from datetime import timedelta

    from lightning.pytorch.strategies import ModelParallelStrategy

    class DataParallelFSDP2(ModelParallelStrategy):
        def setup_environment(self) -> None:
            # Known only now: the ranks this process group will have.
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

    return DataParallelFSDP2(save_distributed_checkpoint=False, timeout=timedelta(seconds=timeout_s))


def mixed_precision_policy(precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for a Lightning precision value: ``bf16-mixed`` / ``16-mixed`` gather and
    compute in bf16 / fp16 and reduce gradients in fp32; any other value: None (parameters as stored)."""
    dtype = _MIXED.get(str(precision))
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (it is an FSDP2 root or unit)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_shard(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard outside its unit's forward), not a plain tensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _check_shardable(module: nn.Module) -> None:
    scalars = [name for name, p in module.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"FSDP2 cannot shard 0-d parameters {scalars} of {type(module).__name__}: store them as "
                         f"1-element vectors (shape [1]), as vlp.losses.Temperature does")


def shard_model(module: nn.Module, blocks: Iterable[nn.Module], mesh=None, mp_policy=None,
                forward_method: str = "forward") -> nn.Module:
    """``fully_shard`` each of ``blocks`` (inner units first), then ``module`` as the root; returns ``module``.

    ``mesh``: the 1-d data-parallel device mesh (None: all ranks); ``mp_policy``: a ``MixedPrecisionPolicy`` or
    None; ``forward_method``: the root method that runs one step, registered as a forward for FSDP's hooks when it is
    not ``forward``. Applying it to a module that is already sharded does nothing (Lightning may call
    ``configure_model`` again)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return module
    _check_shardable(module)
    blocks = list(blocks)
    if not blocks:
        raise ValueError(f"{type(module).__name__}.fsdp_blocks() is empty: FSDP2 needs the transformer blocks to "
                         f"shard (one unit per layer)")
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    if forward_method != "forward":
        register_fsdp_forward_method(module, forward_method)
    return module


def stack_layers(*stacks: nn.Module) -> list[nn.Module]:
    """The layers of each stack, in order: a ``VisionTower``'s ViT blocks, a text tower's ``encoder.layer``, a
    ``BertStack``'s ``layer``, a ``CoAttentionStack``'s text and image layers (the units of :func:`shard_model`)."""
    out: list[nn.Module] = []
    for stack in stacks:
        if hasattr(stack, "vit"):
            out += list(stack.vit.blocks)
        elif hasattr(stack, "text_layers") and hasattr(stack, "image_layers"):
            out += [*stack.text_layers, *stack.image_layers]
        elif hasattr(stack, "encoder") and hasattr(stack.encoder, "layer"):
            out += list(stack.encoder.layer)
        elif hasattr(stack, "layer"):
            out += list(stack.layer)
        else:
            raise TypeError(f"stack_layers: {type(stack).__name__} is not a vision tower, text tower or layer stack")
    return out


@torch.no_grad()
def clamp_stored(module: nn.Module) -> None:
    """Clamp every ``Temperature`` of ``module`` in its stored (sharded) value; call it outside the root forward."""
    from vlp.losses.contrastive import Temperature

    for m in module.modules():
        if isinstance(m, Temperature):
            m.clamp_()


def full_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor of a DTensor (an all-gather: every rank must call it), a plain tensor as it is."""
    if t is None:
        return None
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t
