"""One rank of the 2-process gloo parity check for vlp.losses (run by tests/test_losses_distributed.py).

Usage: python tests/_dist_worker.py RANK WORLD INIT_FILE OUT_DIR

Every rank builds the same global batch from a fixed seed, keeps its slice, runs each case and saves the per-rank
losses and the gradients w.r.t. its own slice of the inputs to OUT_DIR/rank{RANK}.pt. The test compares them
with the single-process values on the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _ranks import gloo_group, rank_args  # noqa: E402
from vlp.losses import Temperature, info_nce, sample_negatives  # noqa: E402
from vlp.utils import distributed as vdist  # noqa: E402

GLOBAL_B, DIM, QUEUE = 8, 16, 6


def make_global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "q": F.normalize(torch.randn(GLOBAL_B, DIM, generator=g), dim=1),
        "k": F.normalize(torch.randn(GLOBAL_B, DIM, generator=g), dim=1),
        "teacher": F.normalize(torch.randn(GLOBAL_B, DIM, generator=g), dim=1),
        "queue": F.normalize(torch.randn(QUEUE, DIM, generator=g), dim=1),
        # Ids shared across ranks (0 at global rows 0 and 4, 1 at rows 1 and 6) exercise gathered ids.
        "ids": torch.tensor([0, 1, 2, 3, 0, 4, 1, 5]),
    }


def cases(q, k, teacher, queue, ids, temp):
    """name -> loss of this rank; identical code runs single-process (where gather is a no-op)."""
    return {
        "plain_symmetric": lambda: (info_nce(q, k, temp, gather=True) + info_nce(k, q, temp, gather=True)) / 2,
        "queue_soft": lambda: info_nce(q, k, temp, gather=True, queue=queue, teacher_query=teacher, alpha=0.4),
        "ids_symmetric": lambda: (info_nce(q, k, temp, gather=True, query_ids=ids)
                                  + info_nce(k, q, temp, gather=True, query_ids=ids)) / 2,
    }


def run_cases(batch: dict[str, torch.Tensor], lo: int, hi: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per case: this rank's loss and the gradients of loss / world (DDP's averaging) w.r.t. its inputs."""
    out = {}
    names = list(cases(None, None, None, None, None, None))
    for name in names:
        q = batch["q"][lo:hi].clone().requires_grad_(True)
        k = batch["k"][lo:hi].clone().requires_grad_(True)
        temp = Temperature(init=0.07)
        loss = cases(q, k, batch["teacher"][lo:hi], batch["queue"], batch["ids"][lo:hi], temp())[name]()
        (loss / world).backward()
        t_grad = temp.value.grad.clone()
        if world > 1:
            # DDP all-reduces parameter gradients (sum of the per-rank grads of loss / world).
            dist.all_reduce(t_grad)
        out[name] = {"loss": loss.detach(), "q_grad": q.grad, "k_grad": k.grad, "t_grad": t_grad}
    return out


def main() -> None:
    rank, world, store, out_dir = rank_args()
    with gloo_group(rank, world, store):
        assert vdist.world_size() == world and vdist.rank() == rank
        batch = make_global_batch()
        b = GLOBAL_B // world
        lo, hi = rank * b, (rank + 1) * b
        result = run_cases(batch, lo, hi, world)

        # gather_no_grad: rank order, detached.
        x = batch["q"][lo:hi].clone().requires_grad_(True)
        gathered = vdist.gather_no_grad(x)
        result["gather_no_grad"] = {"value": gathered, "requires_grad": torch.tensor(gathered.requires_grad)}

        # global-hard negatives: one allowed candidate per row with a high score (the draw is deterministic), and
        # a higher-scored candidate on the OTHER rank sharing the row's image id, which must be excluded.
        ids = batch["ids"]
        sim = torch.full((GLOBAL_B, GLOBAL_B), -1e4)
        target = torch.tensor([5, 7, 3, 2, 1, 0, 4, 6])      # ids differ from the row's
        sim[torch.arange(GLOBAL_B), target] = 5.0
        sim[0, 4] = sim[4, 0] = sim[1, 6] = sim[6, 1] = 50.0  # same image id, other rank
        neg_img, neg_txt = sample_negatives(sim[lo:hi], sim[lo:hi], "global-hard", image_ids=ids[lo:hi],
                                            generator=torch.Generator().manual_seed(rank))
        result["global_hard"] = {"neg_img": neg_img, "neg_txt": neg_txt}
        torch.save(result, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
