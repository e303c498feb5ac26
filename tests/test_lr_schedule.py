"""``optim.schedule: tcl_official``: the official TCL/ALBEF pre-training schedule (configs/Pretrain.yaml's timm
cosine scheduler, warmed up in ticks of 100 iterations during epoch 0 and then stepped once per epoch, as
Pretrain.py steps it), as a function of the optimizer step: hand-computed values, the same loop driven through
timm's scheduler, and a real run that fills ``steps_per_epoch`` from the loader."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from vlp.config import OptimConfig
from vlp.models.base import lr_lambda

PAPER = dict(lr=1e-4, warmup_start_lr=1e-5, min_lr=1e-5, schedule="tcl_official", epochs=30, warmup_epochs=20,
             warmup_step_size=100)


def lr_at(optim: OptimConfig, step: int) -> float:
    return optim.lr * lr_lambda(optim, total_steps=1)(step)


def test_paper_schedule_by_hand():
    o = OptimConfig(**PAPER, steps_per_epoch=3000)
    # epoch 0: ticks of 4.5e-6 ((1e-4 - 1e-5) / 20), each taking effect after the step of iteration 100 k
    expected = {0: 1e-5, 1: 1e-5, 100: 1e-5, 101: 1.45e-5, 200: 1.45e-5, 201: 1.9e-5, 1000: 5.05e-5, 1001: 5.5e-5,
                2000: 9.55e-5, 2001: 1e-4, 2999: 1e-4}
    # epoch e >= 1: one cosine value per epoch, c = e; min_lr from c = epochs (timm's single cycle is over)
    cos = lambda c: 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * c / 30))  # noqa: E731
    expected.update({3000: 9.975353e-5, 3000 * 2 - 1: cos(1), 3000 * 15: 5.5e-5, 3000 * 15 + 1234: 5.5e-5,
                     3000 * 29: 1.0246514e-5, 3000 * 30: 1e-5, 3000 * 45 + 7: 1e-5})
    for step, lr in expected.items():
        assert lr_at(o, step) == pytest.approx(lr, rel=1e-6), step


def test_short_first_epoch_and_no_warmup():
    # the warm-up is cut off where epoch 0 ends (500 < 2000 steps); epoch 1 is the cosine's c = 1 anyway
    o = OptimConfig(**PAPER, steps_per_epoch=500)
    assert lr_at(o, 499) == pytest.approx(1e-5 + 4 * 4.5e-6)
    assert lr_at(o, 500) == pytest.approx(9.975353e-5, rel=1e-6)
    flat = OptimConfig(**{**PAPER, "warmup_epochs": 0}, steps_per_epoch=10)
    assert lr_at(flat, 0) == lr_at(flat, 9) == pytest.approx(1e-4)
    assert lr_at(flat, 10) == pytest.approx(9.975353e-5, rel=1e-6)


def test_matches_the_official_loop_driven_through_timm():
    """Pretrain.py's loop around timm's CosineLRScheduler (the factory's arguments: one cycle, warm-up prefix),
    with small numbers so that every phase appears: the lr each optimizer step ran at must be ours."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    epochs, ticks, size, per_epoch, run_epochs = 4, 3, 2, 9, 6
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=0.05, cycle_decay=1.0, warmup_t=ticks,
                              warmup_lr_init=0.01, warmup_prefix=True, cycle_limit=1, t_in_epochs=True)
    official = []
    for epoch in range(run_epochs):
        if epoch > 0:
            sched.step(epoch + ticks)
        for i in range(per_epoch):
            official.append(opt.param_groups[0]["lr"])  # the lr this optimizer step runs at
            if epoch == 0 and i % size == 0 and i <= ticks * size:
                sched.step(i // size)
    o = OptimConfig(lr=0.5, warmup_start_lr=0.01, min_lr=0.05, schedule="tcl_official", epochs=epochs,
                    warmup_epochs=ticks, warmup_step_size=size, steps_per_epoch=per_epoch)
    ours = [lr_at(o, s) for s in range(run_epochs * per_epoch)]
    assert ours == pytest.approx(official, rel=1e-9)


def test_missing_fields_are_named():
    with pytest.raises(ValueError, match=r"optim\.steps_per_epoch: schedule tcl_official needs a positive value"):
        lr_lambda(OptimConfig(**PAPER), total_steps=10)
    with pytest.raises(ValueError, match=r"optim\.epochs"):
        lr_lambda(OptimConfig(**{**PAPER, "epochs": 0}, steps_per_epoch=5), total_steps=10)


def test_paper_config_selects_it_and_a_run_fills_steps_per_epoch(shapes_shards, tmp_path):
    from test_pretrain_cli import TINY, data_args
    from vlp import config as config_lib
    from vlp.cli import main

    root = Path(__file__).resolve().parents[1] / "experiments" / "tcl"
    paper = config_lib.load(root / "pretrain.yaml").optim
    assert (paper.schedule, paper.epochs, paper.warmup_epochs, paper.warmup_step_size) == ("tcl_official", 30, 20, 100)
    assert (paper.lr, paper.warmup_start_lr, paper.min_lr) == (1e-4, 1e-5, 1e-5)
    assert config_lib.load(root / "tiny.yaml").optim.schedule == "cosine"
    # 96 training images / batch 8 = 12 steps per epoch; 2 ticks of 5 steps, cosine over 2 epochs
    args = ["pretrain", str(root / "tiny.yaml"), *TINY, *data_args(shapes_shards), f"output_dir={tmp_path}",
            "name=official", "trainer.max_steps=14", "trainer.checkpoint_every_n_steps=100", "optim.lr=1e-3",
            "optim.schedule=tcl_official", "optim.epochs=2", "optim.warmup_epochs=2", "optim.warmup_step_size=5",
            "optim.warmup_start_lr=1e-4", "optim.min_lr=1e-4", "--no-eval"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared 2-core machine
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    with (tmp_path / "official" / "metrics.csv").open() as f:
        lrs = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}
    tick1 = 1e-4 + 0.5 * (1e-3 - 1e-4)
    expected = {0: 1e-4, 5: 1e-4, 6: tick1, 10: tick1, 11: 1e-3, 12: 1e-4 + 0.9e-3 * 0.5, 13: 1e-4 + 0.9e-3 * 0.5}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-5), (step, lrs)
