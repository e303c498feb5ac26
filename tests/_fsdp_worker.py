"""One rank of the 2-process gloo check of FSDP2 (vlp.utils.fsdp) against DDP, run by tests/test_fsdp.py.

Usage: python tests/_fsdp_worker.py RANK WORLD INIT_FILE OUT_DIR

For every registered model (its ``tiny()`` config; TCL with a feature queue): a reference copy trained as DDP trains
it (each rank its half of one global batch, gradients averaged over the ranks with an all-reduce) and an FSDP2 copy
(``shard_model`` with the model's ``fsdp_blocks()``) of the same initial weights run two optimizer steps with the same
seeds. Saved to OUT_DIR/rank{RANK}.pt, per model: both losses of each step, the largest difference between the
gathered FSDP2 gradients and the reference's and between all parameters after the two steps (momentum twins
included), how many parameter elements this rank holds, and the feature queues; UNITER once more with one sampled
task per step (as a Trainer runs it: unused heads touched); plus one bf16-mixed step of TCL.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _ranks import gloo_group, one_task_per_step, rank_args  # noqa: E402
from vlp.models import MODELS, _import  # noqa: E402
from vlp.utils.fsdp import clamp_stored, full_tensor, mixed_precision_policy, shard_model  # noqa: E402

GLOBAL_B, STEPS = 4, 2
OVERRIDES = {"tcl": dict(queue_size=8)}  # a queue of two global batches: written, and read back, by step 2


def local_batch(model, step: int, rank: int, world: int) -> dict:
    from test_model_contract import training_batch

    b = GLOBAL_B // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in training_batch(model, GLOBAL_B, seed=step).items()}


def total_loss(model, batch) -> torch.Tensor:
    out = model.step(batch)
    return sum(model.weight(k) * v for k, v in out.losses.items() if model.enabled(k))


def max_diff(sharded: dict, reference: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, ref in reference.items():
        got = full_tensor(sharded[name])
        if (ref is None) != (got is None):
            return float("inf"), name
        if ref is not None and (d := float((got.detach().float() - ref.detach().float()).abs().max())) >= worst:
            worst, where = d, name
    return worst, where


def compare(name: str, rank: int, world: int, mesh, sampled: bool = False) -> dict:
    cfg_cls, cls = _import(name)
    cls = one_task_per_step(cls) if sampled else cls
    torch.manual_seed(0)
    ref = cls(cfg_cls.tiny(**OVERRIDES.get(name, {}))).train()
    sharded = copy.deepcopy(ref)
    shard_model(sharded, sharded.fsdp_blocks(), mesh=mesh, forward_method=cls.FSDP_FORWARD)
    local = sum(p.to_local().numel() for p in sharded.parameters())
    full = sum(p.numel() for p in sharded.parameters())
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (ref, sharded)]
    out = {"loss": [], "loss_ref": [], "grad_diff": [], "local_numel": local, "full_numel": full}
    for step in range(STEPS):
        ref.position = sharded.position = step
        batch = local_batch(ref, step, rank, world)
        torch.manual_seed(step)
        loss = total_loss(ref, batch)
        loss.backward()
        for p in ref.parameters():  # what DDP does: the mean of the ranks' gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        out["loss_ref"].append(loss.item())
        clamp_stored(sharded)  # PretrainModule.on_train_batch_start does this under a Trainer
        torch.manual_seed(step)
        loss = total_loss(sharded, batch)
        loss.backward()
        out["loss"].append(loss.item())
        out["grad_diff"].append(max_diff({n: p.grad for n, p in sharded.named_parameters()},
                                         {n: p.grad for n, p in ref.named_parameters()}))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    out["param_diff"] = max_diff(dict(sharded.named_parameters()), dict(ref.named_parameters()))
    if getattr(sharded, "queue", None) is not None:
        out["queue"] = {k: v.clone() for k, v in sharded.queue.state_dict().items()}
        out["queue_ref"] = {k: v.clone() for k, v in ref.queue.state_dict().items()}
    return out


def bf16_step(rank: int, world: int, mesh) -> dict:
    """One TCL step in bf16-mixed (autocast + FSDP2's bf16 policy) next to the same step in fp32."""
    cfg_cls, cls = _import("tcl")
    torch.manual_seed(0)
    model = cls(cfg_cls.tiny()).train()
    fp32, bf16 = copy.deepcopy(model), model
    shard_model(fp32, fp32.fsdp_blocks(), mesh=mesh, forward_method=cls.FSDP_FORWARD)
    shard_model(bf16, bf16.fsdp_blocks(), mesh=mesh, mp_policy=mixed_precision_policy("bf16-mixed"),
                forward_method=cls.FSDP_FORWARD)
    batch = local_batch(model, 0, rank, world)
    torch.manual_seed(0)
    with torch.no_grad():
        loss32 = total_loss(fp32, batch)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = total_loss(bf16, batch)
    loss16.backward()
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    return {"loss_fp32": loss32.item(), "loss_bf16": loss16.item(),
            "grad_dtypes": sorted({str(g.dtype) for g in grads}),
            "param_dtypes": sorted({str(p.dtype) for p in bf16.parameters()}),
            "grads_finite": all(bool(torch.isfinite(g.to_local()).all()) for g in grads)}


def main() -> None:
    rank, world, store, out_dir = rank_args()
    with gloo_group(rank, world, store):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        result = {name: compare(name, rank, world, mesh) for name in sorted(MODELS)}
        result["uniter-sampled"] = compare("uniter", rank, world, mesh, sampled=True)
        result["bf16"] = bf16_step(rank, world, mesh)
        torch.save(result, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
