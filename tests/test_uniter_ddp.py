"""UNITER's one-task-per-step under real DDP (2 gloo ranks): both ranks run the same task at every step, and the
zero-weight touch of every parameter lets DDP reduce with ``find_unused_parameters=False`` (without it, a step whose
task leaves heads unused fails), and the ranks stay identical.

The ranks are subprocesses running this file (``python tests/test_uniter_ddp.py RANK WORLD INIT_FILE OUT``)
with the launcher variables removed from their environment; they meet through a FileStore in a temp directory.
"""

from __future__ import annotations

from pathlib import Path

from _ranks import gloo_group, launch, one_task_per_step, rank_args

if __name__ != "__main__":
    import pytest

    pytestmark = pytest.mark.slow

WORLD, STEPS = 2, 6


def test_one_task_per_step_under_ddp_without_unused_parameter_search(tmp_path):
    import torch

    res = launch(Path(__file__), tmp_path, WORLD, timeout=180)
    assert res[0]["tasks"] == res[1]["tasks"] and len(set(res[0]["tasks"])) > 1, res[0]["tasks"]
    for a, b in zip(res[0]["params"], res[1]["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # gradients were reduced: the ranks stay identical
    # without the touch, DDP without find_unused_parameters refuses the step after one that left heads unused
    assert all("find_unused_parameters" in r["untouched_error"] for r in res), res[0]["untouched_error"]


def _worker(rank: int, world: int, store: str, out_dir: Path) -> None:
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from vlp.models.uniter import UNITER, UNITERConfig

    Stepped = one_task_per_step(UNITER)  # the position a Trainer would give: the optimizer step

    class Total(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            out = self.model.step(batch)
            return sum(self.model.weight(k) * v for k, v in out.losses.items())

    def train(touch: bool):
        torch.manual_seed(0)
        model = Stepped(UNITERConfig.tiny(touch_unused=touch, ot_iterations=3)).train()
        ddp = DistributedDataParallel(Total(model))
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        tasks = []
        for step in range(STEPS):
            model.position = step
            visual, text = model.example_inputs(4, seed=100 * step + rank)  # each rank its own batch
            ids, mask = text
            labels = torch.full_like(ids, -100)
            labels[:, 1] = ids[:, 1]
            batch = {"region_features": visual.features, "region_boxes": visual.boxes, "region_mask": visual.mask,
                     "region_cls_prob": visual.cls_prob, "input_ids": ids, "attention_mask": mask,
                     "mlm_input_ids": ids.masked_fill(labels != -100, 4), "mlm_labels": labels,
                     "image_ids": torch.arange(4) + 10 * rank}
            tasks.append(model.tasks_for_call()[0])
            opt.zero_grad()
            ddp(batch).backward()
            opt.step()
        return tasks, [p.detach().clone() for p in model.parameters()]

    with gloo_group(rank, world, store):
        tasks, params = train(touch=True)
        try:  # both ranks run the same task, so both refuse at the same step: no rank waits for the other
            train(touch=False)
            error = ""
        except RuntimeError as e:
            error = str(e)
        torch.save({"tasks": tasks, "params": params, "untouched_error": error}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(*rank_args())
