"""FLOPs of a training step and the peak FLOP/s of the device: the two halves of MFU (model FLOPs utilisation).

* :func:`count_flops` / :class:`FlopCount` -- torch's ``FlopCounterMode`` (shape-based formulas for matmuls,
  convolutions and attention; elementwise ops, norms, softmax and the optimizer count 0, as in the usual MFU
  convention). ``FlopCount`` can be started in one Lightning hook and stopped in another, so that the real training
  step is what gets counted (``vlp.utils.throughput``). Counting does not change what runs: the mode only records
  shapes (checked bitwise on every registered model in ``tests/test_throughput.py``).
* :func:`count_step_flops` -- the same for one forward + backward run *on the side* (a probe outside training: the
  contract tests, benchmarks); it puts back every RNG, gradient and buffer it touched.
* :func:`peak_flops` -- dense peak FLOP/s for the trainer's precision: a table of datasheet figures for the GPUs the
  suite is run on (by ``torch.cuda.get_device_name()``), a measured matmul rate on CPU, and ``None`` (with one
  warning naming the reason) for anything else, never a guess.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["GPU_PEAKS", "FlopCount", "PeakFlops", "count_flops", "count_step_flops", "cpu_peak_flops",
           "gpu_peak_flops", "matmul_dtype", "peak_flops", "preserved_state"]

log = logging.getLogger("vlp")

T = 1e12

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets, per GPU. Rows are tried in order and
# the first whose substrings all occur in the lower-cased device name wins, so the specific variants (NVL, PCIe) come
# before the plain name (an H100 SXM reports itself as "NVIDIA H100 80GB HBM3", an H200 SXM as "NVIDIA H200"; a
# GH200's GPU is an H100 SXM-class part). fp16 equals bf16 on all of them.
GPU_PEAKS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("h200", "nvl"), "H200 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T}),
    (("gh200",), "GH200", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}),
    (("h200",), "H200 SXM", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}),
    (("h100", "nvl"), "H100 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T}),
    (("h100", "pcie"), "H100 PCIe", {"fp32": 51 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T}),
    (("h100",), "H100 SXM", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}),
    (("a100", "pcie"), "A100 PCIe", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T}),
    (("a100",), "A100 SXM", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T}),
]


class PeakFlops(NamedTuple):
    """A device's peak FLOP/s for one matmul dtype and where the figure comes from (table row or measurement)."""

    flops: float
    source: str
    measured: bool = False  # timed on this machine (CPU), not a datasheet figure: it can only be too low


# -- counting ---------------------------------------------------------------------------------------------------------
class FlopCount:
    """``FlopCounterMode`` as start / stop, for a span that begins and ends in different callback hooks (the first
    micro-batch's ``on_train_batch_start`` to the optimizer step's ``on_train_batch_end``). Backward passes inside
    the span are counted too (autograd runs them under the same mode). Not reentrant."""

    def __init__(self):
        self._mode: Optional[FlopCounterMode] = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self) -> None:
        if self._mode is not None:
            raise RuntimeError("FlopCount.start: already counting")
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def stop(self) -> int:
        """End the span; its total FLOPs."""
        mode, self._mode = self._mode, None
        if mode is None:
            raise RuntimeError("FlopCount.stop: not counting")
        mode.__exit__(None, None, None)
        return int(mode.get_total_flops())

    def cancel(self) -> None:
        """Leave the mode if it is active (an exception ended training mid-span); nothing is reported."""
        if self._mode is not None:
            self.stop()


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> tuple[int, Any]:
    """(FLOPs, result) of ``fn(*args, **kwargs)``: its forward and any backward it runs."""
    counter = FlopCount()
    counter.start()
    try:
        out = fn(*args, **kwargs)
    except BaseException:
        counter.cancel()
        raise
    return counter.stop(), out


@contextmanager
def preserved_state(module: torch.nn.Module):
    """Put back, on exit, what a side forward + backward of ``module`` changes: torch's CPU and CUDA generators,
    numpy's and Python's (the suite's draws are seeded per step, DESIGN §7, but a probe may run at any time),
    every parameter's ``.grad`` (the probe's own gradients are dropped), buffers and frozen parameters (feature
    queues and their pointers, EMA twins, norm statistics) and the train/eval mode. Plain Python attributes a
    model updates in its forward are not covered."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    grads = {p: p.grad for p in module.parameters()}
    kept = [t for t in module.buffers()] + [p for p in module.parameters() if not p.requires_grad]
    saved = [t.detach().clone() for t in kept]
    modes = {m: m.training for m in module.modules()}
    for p in grads:
        p.grad = None  # else backward would accumulate into the caller's gradient tensors in place
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(kept, saved):
                t.copy_(v)
        for p, g in grads.items():
            p.grad = g
        for m, training in modes.items():
            m.training = training
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _weighted_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The total a ``PretrainModule.training_step`` backpropagates: ``compute_losses`` weighted, disabled ones out."""
    losses = model.compute_losses(batch)
    enabled = getattr(model, "enabled", lambda k: True)
    weight = getattr(model, "weight", lambda k: 1.0)
    return sum(weight(k) * v for k, v in losses.items() if enabled(k))


def count_step_flops(model: torch.nn.Module, batch: Any,
                     loss_fn: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None) -> int:
    """FLOPs of one training step's forward + backward of ``model`` on ``batch`` (in train mode), run on the side
    under :func:`preserved_state`: the probe leaves no trace on the RNGs, gradients or buffers. ``loss_fn(model,
    batch)`` gives the scalar to backpropagate; by default the model contract's weighted ``compute_losses``.

    A model that samples a task per step outside a Trainer computes every active task here (UNITER's ``step``), so
    this is the sum over tasks; the training callback counts the real steps instead (``vlp.utils.throughput``)."""
    loss_fn = loss_fn or _weighted_loss
    with preserved_state(model):
        model.train()

        def step():
            loss_fn(model, batch).backward()

        flops, _ = count_flops(step)
    return flops


# -- peaks ------------------------------------------------------------------------------------------------------------
def matmul_dtype(precision: str) -> Optional[str]:
    """The dtype the matmuls of a Lightning ``precision`` run in: ``bf16`` / ``fp16`` for the 16-bit settings;
    for 32-bit, ``tf32`` when torch lets float32 matmuls use TF32 (``torch.set_float32_matmul_precision`` "high" or
    "medium"), else ``fp32``. None for anything the table has no column for (64-bit, fp8 engines)."""
    p = str(precision).lower()
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("32"):
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def gpu_peak_flops(device_name: str, dtype: str) -> Optional[PeakFlops]:
    """The table's dense peak for ``device_name`` (as ``torch.cuda.get_device_name()`` spells it) and ``dtype``;
    None for a GPU that is not in the table."""
    name = device_name.lower()
    for keys, label, peaks in GPU_PEAKS:
        if all(k in name for k in keys) and dtype in peaks:
            return PeakFlops(peaks[dtype], f"{label} {dtype} dense (datasheet)")
    return None


_CPU_PEAKS: dict[tuple[int, torch.dtype], float] = {}
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _time_matmul(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best wall time of ``repeats`` n x n products (after one untimed warm-up); inputs from a private generator, so
    the global RNG is untouched. Timed through ``F.linear``, the kernel path the models' layers take: on a CPU
    without bf16 units ``torch.mm`` in bf16 takes a slow path (measured at n = 1024 on 2 threads: 0.73 GFLOP/s against
    10.9 for ``F.linear``), so a peak from ``torch.mm`` made bf16 MFU read above 1."""
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_peak_flops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (256, 512, 1024),
                   repeats: int = 3) -> float:
    """The best matmul FLOP/s this process reaches on the CPU (``2 n^3`` per n x n product, best over ``sizes`` and
    ``repeats``) with the thread count torch uses now. A CPU has no datasheet figure that means anything for torch
    (vector width, turbo, a shared or virtual machine), so "peak" here is the measured attainable dense rate and CPU
    MFU reads as a fraction of what a plain matmul gets. Measured once per (threads, dtype) per process
    (~0.1-0.5 s) and cached."""
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAKS:
        _CPU_PEAKS[key] = max(2.0 * n ** 3 / _time_matmul(n, dtype, repeats) for n in sizes)
    return _CPU_PEAKS[key]


_WARNED: set[str] = set()


def _no_peak(reason: str) -> None:
    """Say once per process why MFU is not logged."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("train/mfu not logged: %s", reason)


def peak_flops(device: torch.device | str, precision: str, device_name: Optional[str] = None) -> Optional[PeakFlops]:
    """Peak FLOP/s of one ``device`` for the trainer's ``precision``: the datasheet table on CUDA (``device_name``
    defaults to ``torch.cuda.get_device_name(device)``), the measured matmul rate on CPU, else None with one
    warning naming the reason (an unknown GPU, another accelerator, a precision without a column)."""
    device = torch.device(device)
    dtype = matmul_dtype(precision)
    if dtype is None:
        _no_peak(f"no peak FLOP/s for precision {precision!r} (known: 32, bf16, 16)")
        return None
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return PeakFlops(cpu_peak_flops(_DTYPES[dtype]),
                         f"cpu {dtype} matmul measured, {threads} thread{'s' if threads > 1 else ''}", measured=True)
    if device.type == "cuda":
        name = device_name or torch.cuda.get_device_name(device)
        found = gpu_peak_flops(name, dtype)
        if found is None:
            _no_peak(f"GPU {name!r} is not in vlp.utils.flops.GPU_PEAKS (add its dense {dtype} peak there)")
        return found
    _no_peak(f"no peak FLOP/s known for device type {device.type!r}")
    return None
