"""One rank of the model-level DDP equivalence check (run by tests/test_model_ddp_equivalence.py).

Usage: python tests/_model_ddp_worker.py RANK WORLD INIT_FILE OUT_DIR

For every case of ``CASES`` (every registered model, MVPTR twice: VSC per rank and gathered) each rank

1. before the process group exists (so every gather is a no-op), computes the single-process reference of the cases
   ``i % WORLD == RANK`` on the whole global batch: the losses, the per-rank-by-design losses of each rank's half,
   the reference total, the gradient of every parameter, and the model's state (buffers, frozen momentum twins)
   after one SGD step and one momentum update;
2. in the gloo group, builds the same model, wraps it in ``DistributedDataParallel`` (which runs the model's
   ``training_step``, as Lightning's wrapper does, and averages the gradients over the ranks), runs one step on its
   half of the batch and records its losses, its total, the averaged gradients and the state after the same SGD
   step and momentum update.

Everything goes to OUT_DIR/rank{RANK}.pt; the test compares. Random parts are fixed so that "equal" is exact:
dropout is 0, and every draw a model would make (ITM negatives and labels, UNITER's region masks, MVPTR's ITM order
and WPG choices) comes in the batch, each one a function of the sample's global row only (the ITM negative of a row
is the other row of its rank pair), so the whole batch and the ranks' halves make the same draws.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _ranks import gloo_group, rank_args  # noqa: E402

GLOBAL_B, LR = 4, 0.1

# case -> (registered model, tiny() overrides, losses computed per rank on purpose: the paper mines or contrasts
# within each rank's batch, so 2 ranks x B/2 equal one process that computes them on each half apart).
CASES = {
    # ita: CMA, IMC and LMI use this rank's momentum keys (plus the gathered queue), as the official TCL/ALBEF.
    "tcl": ("tcl", {"queue_size": 2 * GLOBAL_B}, ("ita",)),
    "bridgetower": ("bridgetower", {}, ()),
    "uniter": ("uniter", {}, ()),
    # vsc: official in-batch contrast; itm: hardest negatives mined in this rank's batch (official encode_hn).
    "mvptr": ("mvptr", {}, ("vsc", "itm")),
    "mvptr_vsc_gather": ("mvptr", {"vsc_gather": True}, ("itm",)),
}


def build(case: str):
    """The case's tiny model without dropout, the same weights in every process (seed 0)."""
    from vlp.models import _import

    name, overrides, _ = CASES[case]
    cfg_cls, cls = _import(name)
    cfg = cfg_cls.tiny(**overrides)
    off = {f: 0.0 for f in ("cross_dropout", "region_dropout") if hasattr(cfg, f)}
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dropout=0.0), **off)
    torch.manual_seed(0)
    return cls(cfg).train()


def global_batch(case: str, model) -> dict:
    """The contract tests' training batch (two masked words and distinct image ids per row) of GLOBAL_B rows, with
    the per-row draws that slice like data: UNITER's region masks (the first two regions of every sample, so every
    rank masks as many) and MVPTR's WPG top-k picks."""
    from test_model_contract import training_batch

    batch = training_batch(model, b=GLOBAL_B)
    name = CASES[case][0]
    if name == "uniter":
        masked = torch.zeros(batch["region_mask"].shape, dtype=torch.bool)
        masked[:, :2] = True
        batch["region_masked"] = masked
    if name == "mvptr":
        picks = torch.rand(2, GLOBAL_B, int(batch["phrase_mask"].sum(1).max()),
                           generator=torch.Generator().manual_seed(7))
        batch["wpg_pick_pos"], batch["wpg_pick_neg"] = picks[0], picks[1]
    return batch


def rows(case: str, batch: dict, lo: int, hi: int) -> dict:
    """Rows [lo, hi) of the batch, with the model's draws that index into the batch as local indices: the negative
    of row i is the other row of its pair (i xor 1, on the same rank); in BridgeTower's and UNITER's ITM the even
    rows keep their image and the odd rows take the partner's; MVPTR's ITM anchors the even rows' texts and the
    odd rows' images."""
    part = {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    g = torch.arange(lo, hi)
    own, partner, keep = g - lo, (g ^ 1) - lo, g % 2 == 0
    name = CASES[case][0]
    if name == "tcl":
        part.update(neg_image_for_text=partner, neg_text_for_image=partner)
    elif name in ("bridgetower", "uniter"):
        part.update(itm_labels=keep.long(), itm_image_index=torch.where(keep, own, partner))
    elif name == "mvptr":
        part.update(itm_order=torch.cat([own[keep], own[~keep]]), wpg_neg_image=partner)
    else:
        raise KeyError(f"no fixed draws for model {name!r}: add them to rows() before adding its case")
    return part


def side_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a step changes besides the trained parameters: buffers (queues, pointers) and frozen parameters
    (momentum twins)."""
    out = {f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()}
    out.update({f"frozen:{k}": p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad})
    return out


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back the side state, touching only what changed (an in-place write to an unchanged buffer such as
    ``position_ids`` would invalidate the graphs already built from it)."""
    now = {f"buffer:{k}": v for k, v in model.named_buffers()}
    now.update({f"frozen:{k}": p for k, p in model.named_parameters() if not p.requires_grad})
    for k, saved in state.items():
        if not torch.equal(now[k], saved):
            now[k].copy_(saved)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.full_like(p, float("nan")))
            for k, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def after_update(model: nn.Module) -> dict[str, torch.Tensor]:
    """Side state after one SGD step with the gradients in ``.grad`` and one momentum (EMA) update."""
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            p.add_(p.grad, alpha=-LR)
    if hasattr(model, "momentum"):
        model.momentum.update()
    return side_state(model)


def detached(losses: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in losses.items()}


def reference(case: str, world: int) -> dict:
    """One process, the whole global batch. The per-rank losses are computed on each rank's half apart, from the
    side state the ranks start from (TCL's queue before this step's enqueue)."""
    model = build(case)
    batch = global_batch(case, model)
    per_rank = CASES[case][2]
    before = side_state(model)
    whole = model.step(rows(case, batch, 0, GLOBAL_B)).losses
    after_step = side_state(model)
    halves = []
    b = GLOBAL_B // world
    for r in range(world if per_rank else 0):
        restore(model, before)
        halves.append(model.step(rows(case, batch, r * b, (r + 1) * b)).losses)
    restore(model, after_step)
    total = sum(model.weight(k) * (torch.stack([h[k] for h in halves]).mean() if k in per_rank else v)
                for k, v in whole.items() if model.enabled(k))
    total.backward()
    return {"whole": detached(whole), "halves": [detached(h) for h in halves], "total": total.detach(),
            "grads": grads(model), "state_before": before, "state": after_update(model)}


class TrainingStep(nn.Module):
    """What Lightning's DDP wrapper runs in ``forward``: the model's ``training_step``; also returns the step's
    losses (read from the ``step`` call inside it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        seen, step = {}, self.model.step

        def recording(b):
            out = step(b)
            seen.update(out.losses)
            return out

        self.model.step = recording
        try:
            total = self.model.training_step(batch, 0)
        finally:
            del self.model.step
        return total, seen


def ddp_step(case: str, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = build(case)
    b = GLOBAL_B // world
    local = rows(case, global_batch(case, model), rank * b, (rank + 1) * b)
    # Buffers are not re-sent from rank 0 before the forward (Lightning's DDP would): each rank's queue is its own.
    ddp = DistributedDataParallel(TrainingStep(model), forward_sync_buffers=False)
    total, losses = ddp(local)
    total.backward()
    return {"losses": detached(losses), "total": total.detach(), "grads": grads(model),
            "state": after_update(model)}


def main() -> None:
    rank, world, store, out_dir = rank_args()
    torch.set_num_threads(1)
    # training_step logs; outside a Trainer Lightning warns once per key and ignores the call.
    warnings.filterwarnings("ignore", message=".*self.trainer.* reference is not registered")
    refs = {case: reference(case, world) for i, case in enumerate(CASES) if i % world == rank}
    with gloo_group(rank, world, store):
        ranks = {case: ddp_step(case, rank, world) for case in CASES}
        from vlp.models import MODELS

        torch.save({"registered": sorted(MODELS), "reference": refs, "ddp": ranks}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
