"""Throughput and MFU (vlp.utils.flops, vlp.utils.throughput): the FLOP count of a known model, the peak table and
the CPU measurement, the rate arithmetic, counting that changes nothing, and a tiny ``vlp pretrain`` whose metrics.csv
carries plausible rates and whose weights are bitwise those of the same run without the monitor."""

import logging
import time

import pytest
import torch
from torch import nn

from vlp.models import MODELS
from vlp.utils import flops as flops_lib
from vlp.utils.flops import (FlopCount, count_step_flops, cpu_peak_flops, gpu_peak_flops, matmul_dtype,
                             peak_flops)
from vlp.utils.throughput import THROUGHPUT_KEYS, StepRecord, batch_tokens, rates

from _tiny_runs import compare_runs, metrics_rows, tiny_experiment
from test_model_contract import build, training_batch

pytestmark = pytest.mark.usefixtures("one_thread")

B, IN, OUT = 4, 8, 16


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


# -- counting ----------------------------------------------------------------------------------------------------------
def test_linear_flops_are_the_hand_count():
    """One nn.Linear(in, out) trained by MSE: forward ``2 B in out`` (addmm); backward the weight gradient
    ``2 B in out`` (mm), plus the input gradient ``2 B in out`` only when the input needs one -- so 2x / 3x the
    forward. Bias, MSE and elementwise ops count 0."""
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    x, y = torch.randn(B, IN), torch.randn(B, OUT)
    forward = 2 * B * IN * OUT
    assert count_step_flops(lin, {"x": x, "y": y}, _mse) == 2 * forward
    assert count_step_flops(lin, {"x": x.requires_grad_(True), "y": y}, _mse) == 3 * forward
    assert lin.weight.grad is None and lin.bias.grad is None  # the probe's parameter gradients are dropped


def test_probe_leaves_rngs_grads_and_buffers_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Dropout(0.5), nn.BatchNorm1d(OUT)).eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    stats = model[2].running_mean.clone()
    batch = {"x": torch.randn(B, IN), "y": torch.randn(B, OUT)}
    before = torch.get_rng_state()
    count_step_flops(model, batch, _mse)  # dropout draws, batch norm updates its statistics
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[2].weight.grad is None
    assert torch.equal(model[2].running_mean, stats) and not model.training


@pytest.mark.parametrize("name", sorted(MODELS))
def test_counting_the_real_step_changes_nothing(name):
    """The callback counts inside the training step: under the counter, losses and every gradient are bitwise the
    uncounted step's (FlopCounterMode only reads shapes; no op of these models is decomposed differently)."""
    out = []
    for counted in (False, True):
        model = build(name).train()
        batch = training_batch(model, 4)
        torch.manual_seed(1)
        counter = FlopCount()
        if counted:
            counter.start()
        loss = sum(model.compute_losses(batch).values())
        loss.backward()
        n = counter.stop() if counted else 0
        out.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, n))
    (loss0, grads0, _), (loss1, grads1, n) = out
    assert n > 0 and torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)


# -- peaks -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device_name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
    ("NVIDIA H100 80GB HBM3", "fp32", 67), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 PCIe", "fp32", 51),
    ("NVIDIA H100 NVL", "bf16", 835.5), ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100-SXM4-40GB", "tf32", 156),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5), ("NVIDIA A100 80GB PCIe", "fp16", 312),
])
def test_gpu_peak_table(device_name, dtype, tflops):
    found = gpu_peak_flops(device_name, dtype)
    assert found is not None and found.flops == pytest.approx(tflops * 1e12)
    assert ("PCIe" in found.source) == ("pcie" in device_name.lower())


def test_precision_picks_the_column():
    assert peak_flops("cuda", "bf16-mixed", "NVIDIA H100 80GB HBM3").flops == pytest.approx(989.4e12)
    assert matmul_dtype("16-mixed") == "fp16" and matmul_dtype("bf16-true") == "bf16"
    assert matmul_dtype("32-true") == "fp32" and matmul_dtype("64-true") is None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 allowed: the tf32 column
        assert matmul_dtype("32-true") == "tf32"
        assert peak_flops("cuda", "32-true", "NVIDIA A100-SXM4-80GB").flops == pytest.approx(156e12)
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_gpu_has_no_peak_and_says_so_once(caplog):
    with caplog.at_level(logging.WARNING, logger="vlp"):
        assert peak_flops("cuda", "bf16-mixed", "NVIDIA GeForce RTX 4090 (test)") is None
        assert peak_flops("cuda", "bf16-mixed", "NVIDIA GeForce RTX 4090 (test)") is None
    said = [r.getMessage() for r in caplog.records if "RTX 4090 (test)" in r.getMessage()]
    assert len(said) == 1 and "train/mfu not logged" in said[0]


def test_cpu_peak_is_measured_once(monkeypatch):
    monkeypatch.setattr(flops_lib, "_CPU_PEAKS", {})
    calls = []
    timer = flops_lib._time_matmul
    monkeypatch.setattr(flops_lib, "_time_matmul", lambda *a: calls.append(a) or timer(*a))
    rng = torch.get_rng_state()
    first = cpu_peak_flops(sizes=(128, 256), repeats=2)
    assert first > 1e8 and len(calls) == 2  # at least 0.1 GFLOP/s on any CPU
    assert cpu_peak_flops(sizes=(128, 256), repeats=2) == first and len(calls) == 2  # cached
    assert torch.equal(torch.get_rng_state(), rng)  # private generator: training draws untouched
    assert peak_flops("cpu", "32-true").flops == first and "1 thread" in peak_flops("cpu", "32-true").source


def test_a_measured_peak_below_an_achieved_rate_is_raised_once_and_a_datasheet_peak_is_not(caplog):
    """A CPU peak timed while the machine was busy reads low (MFU above 1, met under a loaded test run): the
    achieved rate is attainable, so it becomes the peak, with one warning; a datasheet peak is never changed."""
    from vlp.utils.flops import PeakFlops
    from vlp.utils.throughput import attainable_peak

    measured = PeakFlops(1e10, "cpu float32 matmul measured, 1 thread", measured=True)
    assert attainable_peak(measured, 5e9) is measured
    with caplog.at_level("WARNING"):
        raised = attainable_peak(measured, 1.2e10)
        again = attainable_peak(raised, 1.3e10)
    assert (raised.flops, again.flops) == (1.2e10, 1.3e10) and again.measured
    assert again.source == "cpu float32 matmul measured, 1 thread, raised to an achieved rate"
    assert sum("is below what training achieved" in r.getMessage() for r in caplog.records) == 1
    sheet = PeakFlops(989e12, "H100 bf16")
    assert attainable_peak(sheet, 1e15) is sheet


# -- arithmetic --------------------------------------------------------------------------------------------------------
def test_rates_are_totals_over_wall_time():
    records = [StepRecord(0.5, 16, torch.tensor(100), 10**9), StepRecord(1.0, 16, torch.tensor(100), 10**9),
               StepRecord(1.5, 16, torch.tensor(100), 10**9)]
    out = rates(records, world_size=2, peak=1e10)
    assert out["train/samples_per_s"] == pytest.approx(48 / 3.0)  # not the mean of 32, 16, 10.7
    assert float(out["train/tokens_per_s"]) == pytest.approx(300 * 2 / 3.0)  # this rank's tokens x world size
    assert out["train/tflops_per_s"] == pytest.approx(1e9 / 1e12)  # per device
    assert out["train/mfu"] == pytest.approx(3e9 / 3.0 / 1e10)
    assert "train/mfu" not in rates(records, 2, peak=None)
    assert set(rates([StepRecord(1.0, 8, None, None)])) == {"train/samples_per_s"}


def test_tokens_are_text_plus_patches_or_regions():
    pixels = build("tcl")
    batch = training_batch(pixels, 3)  # 8-token texts padded to lengths 8, 7, 6; 32 px images, 8 px patches
    h = batch["image"].shape[-1] // 8
    assert int(batch_tokens(batch, pixels)) == 8 + 7 + 6 + 3 * h * h
    regions = build("uniter")
    batch = training_batch(regions, 3)  # 6, 5, 4 real regions
    assert int(batch_tokens(batch, regions)) == 8 + 7 + 6 + 6 + 5 + 4


class _TaskSampler(nn.Module):
    """A stand-in for UNITER's contract: one task per optimizer step (``task_of_step``), each task its own cost."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"small": nn.Linear(IN, 16), "big": nn.Linear(IN, 64)})
        self.logged: list[dict] = []
        self.device = torch.device("cpu")

    def sampling(self) -> bool:
        return True

    def task_of_step(self, step: int) -> str:
        return "small" if step % 2 == 0 else "big"

    def log(self, key, value, **kwargs):
        self.logged[-1][key] = float(value)


def test_monitor_counts_each_task_once_and_charges_each_step_its_own(monkeypatch):
    """The callback's hooks driven by hand (2 micro-batches per optimizer step, a 1 s clock per step): each task is
    counted at its first step (forward + backward of both micro-batches), those steps and the warm-up are not
    timed, and a window's FLOPs are the sum of its steps' own tasks."""
    from types import SimpleNamespace

    from vlp.utils import throughput

    clock = iter(range(100))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(clock)))
    trainer = SimpleNamespace(global_step=0, world_size=2, log_every_n_steps=4, precision="32-true")
    model, cb = _TaskSampler(), throughput.ThroughputMonitor(warmup_steps=2)
    cb.on_train_start(trainer, model)
    x = torch.randn(B, IN)
    batch = {"input_ids": torch.zeros(B, 5, dtype=torch.long), "attention_mask": torch.ones(B, 5)}
    for step in range(6):
        model.logged.append({})
        for micro in range(2):
            cb.on_train_batch_start(trainer, model, batch, 2 * step + micro)
            model.heads[model.task_of_step(step)](x).square().mean().backward()
            trainer.global_step += micro  # the optimizer steps after the second micro-batch
            cb.on_train_batch_end(trainer, model, None, batch, 2 * step + micro)
    per = {"small": 2 * 2 * (2 * B * IN * 16), "big": 2 * 2 * (2 * B * IN * 64)}  # micro-batches x (fwd + wgrad)
    assert cb.flops == per
    assert model.logged[0] == model.logged[1] == {}  # steps 0, 1: counted (and warm-up), not timed
    assert set(model.logged[2]) == {"train/samples_per_s", "train/tokens_per_s", "train/tflops_per_s", "train/mfu"}
    last = model.logged[-1]  # window: steps 2..5, 1 s each
    assert last["train/samples_per_s"] == pytest.approx(2 * B * 2)  # micro-batches x B x world size
    assert last["train/tokens_per_s"] == pytest.approx(2 * B * 5 * 2)
    assert last["train/tflops_per_s"] == pytest.approx((2 * per["small"] + 2 * per["big"]) / 4 / 1e12)
    assert last["train/mfu"] == pytest.approx(last["train/tflops_per_s"] * 1e12 / cb.peak.flops)
    assert not FlopCount().active and not cb._counter.active


# -- end to end --------------------------------------------------------------------------------------------------------
def _pretrain(path, *overrides) -> float:
    from vlp.cli import main

    t0 = time.perf_counter()
    assert main(["pretrain", str(path), "--no-eval", *overrides]) == 0
    return time.perf_counter() - t0


def test_pretrain_logs_rates_and_trains_the_same_weights(shapes_shards, tmp_path):
    steps, batch = 12, 8
    on = tiny_experiment("tcl", tmp_path / "on", shapes_shards, max_steps=steps, throughput=True)
    off = tiny_experiment("tcl", tmp_path / "off", shapes_shards, max_steps=steps, throughput=False)
    wall = _pretrain(on)
    _pretrain(off)
    rows = metrics_rows(tmp_path / "on" / "tcl")
    timed = {s: r for s, r in rows.items() if "train/samples_per_s" in r}
    # warm-up: steps 0 (also the counted one) and 1 are not measured; then every step (log_every_n_steps=1)
    assert sorted(timed) == list(range(2, steps))
    sps = [float(r["train/samples_per_s"]) for r in timed.values()]
    # one step per window: batch / samples_per_s is each measured step's wall time; together they fit in the run
    measured = sum(batch / s for s in sps)
    assert wall / 50 < measured < wall, (measured, wall)
    for r in timed.values():
        per_sample = float(r["train/tokens_per_s"]) / float(r["train/samples_per_s"])
        assert 16 + 2 <= per_sample <= 16 + 40  # 4x4 patches + a caption's real tokens
        assert 0 < float(r["train/mfu"]) <= 1 and float(r["train/tflops_per_s"]) > 0
    # the monitor changes nothing but its own columns
    res = compare_runs(tmp_path / "on" / "tcl", tmp_path / "off" / "tcl")
    assert res["steps"] == (steps, steps)
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert not res[key][2], (key, res[key][2][:5])
    assert {k for _, k in res["metrics_differ"]} <= set(THROUGHPUT_KEYS)
    assert not any(k in THROUGHPUT_KEYS for r in metrics_rows(tmp_path / "off" / "tcl").values() for k in r)
