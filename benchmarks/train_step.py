"""Train-step throughput of the four models (forward + backward + AdamW) on synthetic batches of real shapes.

For each model and size: samples/s, ms/step (median of ``--steps`` timed steps after ``--warmup`` untimed ones),
peak memory (CPU: the process's peak resident set during the steps; CUDA: ``max_memory_allocated``), and MFU: the
FLOPs of one step counted once (``vlp.utils.flops.count_step_flops``, forward + backward) over the step time and
the device's peak for the precision (``vlp.utils.flops.peak_flops``: datasheet table on GPUs, a measured matmul
rate on CPU). Precisions: ``fp32`` and ``bf16`` (``torch.autocast``, as Lightning's bf16-mixed); ``--compile on``
wraps the step's loss in ``torch.compile`` (its first call, the warm-up, pays the compilation).

Sizes -- every one built offline from explicit architectures with random weights (no hub, no timm download):

* ``unit``: the config class's ``tiny()``, the size of the unit tests (seconds; ``benchmarks/gpu.sh --dry-run``);
* ``tiny``: ``experiments/<model>/tiny.yaml``, the embedded default the README's runs train;
* ``base``: ``experiments/<model>/pretrain.yaml``, the paper's architecture; its hub towers (``bert-base-uncased``,
  ``bert-base-cased``, ``roberta-base``) become the same architecture from :data:`HUB_TEXT`, its timm towers the
  same timm architecture without weights.

Batches: 2 samples at unit size and for base models on CPU, else the experiment's ``data.batch_size`` (``--batch``
overrides); text at the config's ``data.max_text_len`` (every token real), images at the tower's ``img_size`` (a
second view where ``data.two_views``), :data:`REGIONS` regions per image, MVPTR's ``data.max_tags`` tags and
``data.max_phrases`` phrase tokens. Where the model differs from a Trainer step: UNITER samples one task per
optimizer step under a Trainer; here (no Trainer) each step computes every active task, ``tasks_per_step`` in the
JSON, and samples/s counts each sample once per step.

    python benchmarks/train_step.py [--models tcl uniter ...] [--sizes tiny base] [--precision fp32 bf16]
        [--steps 3] [--warmup 1] [--batch N] [--device cpu|cuda] [--compile off on] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _common import RESULTS, ROOT, machine, write_json  # noqa: E402

import torch  # noqa: E402

from vlp import config as config_lib  # noqa: E402
from vlp.blocks.text import build_hf_config, explicit_text_config  # noqa: E402
from vlp.models import MODELS, _import, build  # noqa: E402
from vlp.utils.flops import _weighted_loss, count_step_flops, peak_flops  # noqa: E402

SIZES = ("unit", "tiny", "base")
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # -> the Lightning precision peak_flops reads

# The hub text towers of the paper configs, as their published config.json files define them.
_BERT_BASE = dict(arch="bert", hidden=768, layers=12, heads=12, intermediate=3072, max_position=512,
                  type_vocab_size=2, ln_eps=1e-12, pad_token_id=0)
HUB_TEXT = {
    "bert-base-uncased": {**_BERT_BASE, "vocab_size": 30522},
    "bert-base-cased": {**_BERT_BASE, "vocab_size": 28996},
    "roberta-base": dict(arch="roberta", vocab_size=50265, hidden=768, layers=12, heads=12, intermediate=3072,
                         max_position=514, type_vocab_size=1, ln_eps=1e-5, pad_token_id=1),
}
TINY_VOCAB = 201  # the shapes world's WordPiece vocabulary is about this size (tiny.yaml leaves it to the tokenizer)
PHRASE_ROWS = {"unit": None, "tiny": 100, "base": 1000}  # MVPTR phrase_vocab_size when the config leaves it null
REGIONS = {"unit": 6, "tiny": 10, "base": {"uniter": 36, "mvptr": 50}}  # BUTD 36 (UNITER), VinVL 50 (MVPTR)
UNIT_TEXT_LEN, UNIT_TAGS, UNIT_PHRASES = 12, 5, 2


@dataclasses.dataclass
class Shapes:
    """What one synthetic sample holds (recorded in the JSON beside each result)."""

    text_len: int
    image_size: int | None = None
    two_views: bool = False
    regions: int | None = None
    tags: int | None = None
    phrases: int = 0


# -- configs ----------------------------------------------------------------------------------------------------------
def offline_text(text, size: str):
    """``text`` with no hub name and no weight loading: a hub name becomes its architecture (:data:`HUB_TEXT`), the
    tokenizer-given fields of tiny.yaml take :data:`TINY_VOCAB`; the result is fully explicit
    (``explicit_text_config``), so the JSON records the exact tower that was timed."""
    if text.name is not None:
        if text.name not in HUB_TEXT:
            raise SystemExit(f"text.name {text.name!r}: no offline architecture for it in benchmarks/train_step.py "
                             f"HUB_TEXT (known: {', '.join(HUB_TEXT)})")
        hub = {k: v for k, v in HUB_TEXT[text.name].items() if getattr(text, k) is None or k == "arch"}
        text = dataclasses.replace(text, name=None, pretrained=False, **hub)
    if text.vocab_size is None:
        text = dataclasses.replace(text, vocab_size=TINY_VOCAB)
    if text.pad_token_id is None:
        text = dataclasses.replace(text, pad_token_id=0)
    return explicit_text_config(text, build_hf_config(text))


def model_and_shapes(name: str, size: str):
    """(model config, Shapes) of ``name`` at ``size`` (module docstring), built offline."""
    if size == "unit":
        cfg = _import(name)[0].tiny()
        data = None
    else:
        path = ROOT / "experiments" / name / ("tiny.yaml" if size == "tiny" else "pretrain.yaml")
        exp = config_lib.load(path)
        cfg, data = exp.model, exp.data
    changes = {}
    if getattr(cfg, "vision", None) is not None:
        changes["vision"] = dataclasses.replace(cfg.vision, pretrained=False, checkpoint=None)
    if getattr(cfg, "text", None) is not None:
        changes["text"] = offline_text(cfg.text, size)
    if getattr(cfg, "phrase_vocab_size", 0) is None:
        changes["phrase_vocab_size"] = PHRASE_ROWS[size]
    cfg = dataclasses.replace(cfg, **changes)

    model_cls = _import(name)[1]
    reads = model_cls.READS
    regions = REGIONS[size] if not isinstance(REGIONS[size], dict) else REGIONS[size].get(name)
    shapes = Shapes(text_len=data.max_text_len if data else UNIT_TEXT_LEN)
    if "pixels" in reads:
        shapes.image_size = cfg.vision.img_size
        shapes.two_views = bool(data and data.two_views)
    if "regions" in reads:
        shapes.regions = regions
    if "tags" in reads:
        shapes.tags = data.max_tags if data else UNIT_TAGS
    if "phrases" in reads and getattr(cfg, "phrase_vocab_size", 0):
        shapes.phrases = data.max_phrases if data else UNIT_PHRASES
    return cfg, shapes


# -- batches ----------------------------------------------------------------------------------------------------------
def _masked(ids: torch.Tensor, g: torch.Generator, mask_id: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels): 15 % of the positions after the first, at least one per row, set to ``mask_id``."""
    pick = torch.rand(ids.shape, generator=g) < 0.15
    pick[:, 0] = False
    pick[:, 1] |= ~pick.any(1)
    return ids.masked_fill(pick, mask_id), torch.where(pick, ids, torch.full_like(ids, -100))


def synthetic_batch(model, shapes: Shapes, batch_size: int, seed: int = 0) -> dict:
    """A collated training batch of ``shapes`` under the collator's keys (``vlp.data.collate``), random contents."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    words = getattr(model, "word_vocab_size", None) or model.cfg.text.vocab_size
    t = shapes.text_len + shapes.phrases  # MVPTR's phrase tokens follow the words
    ids = torch.randint(5, words, (b, t), generator=g)
    ids[:, 0] = 2
    if shapes.phrases:
        ids[:, shapes.text_len:] = words + torch.randint(0, model.phrase_rows, (b, shapes.phrases), generator=g)
    mlm_ids, labels = _masked(ids, g)
    if shapes.phrases:  # phrase tokens are corrupted, never predicted: MLM covers the words
        mlm_ids[:, shapes.text_len:], labels[:, shapes.text_len:] = ids[:, shapes.text_len:], -100
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long), "mlm_input_ids": mlm_ids,
             "mlm_labels": labels, "image_ids": torch.arange(b)}
    if shapes.phrases:
        batch["phrase_mask"] = ids >= words
    if shapes.image_size:
        s = shapes.image_size
        batch["image"] = torch.randn(b, 3, s, s, generator=g)
        if shapes.two_views:
            batch["image_aug"] = torch.randn(b, 3, s, s, generator=g)
    if shapes.regions:
        n = shapes.regions
        corners = torch.rand(b, n, 2, 2, generator=g).sort(dim=2).values  # [B, N, (lo, hi), (x, y)]
        batch.update(region_features=torch.randn(b, n, model.cfg.region_dim, generator=g).relu(),
                     region_boxes=torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1),
                     region_mask=torch.ones(b, n, dtype=torch.bool))
        classes = getattr(model.cfg, "region_classes", None)
        if classes:
            batch["region_cls_prob"] = torch.randn(b, n, classes, generator=g).mul(2).softmax(-1)
    if shapes.tags:
        tags = torch.randint(5, words, (b, shapes.tags), generator=g)
        tags[:, 0] = 2
        tag_mlm, tag_labels = _masked(tags, g)
        batch.update(tag_ids=tags, tag_mask=torch.ones_like(tags), tag_mlm_ids=tag_mlm, tag_mlm_labels=tag_labels)
    return batch


# -- measuring --------------------------------------------------------------------------------------------------------
def _reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak-memory window; False where none can be started (then the process-wide peak is read)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    try:  # glibc keeps freed heap mapped: hand it back first, or the last model's memory stays in this one's peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, batch: dict, *, steps: int, warmup: int, precision: str, compile_step: bool,
               device: torch.device) -> dict:
    """Warm-up and timed optimizer steps of ``model`` on ``batch``: per-step seconds, warm-up seconds, peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    loss_fn = torch.compile(_weighted_loss) if compile_step else _weighted_loss
    model.train()
    reset = _reset_peak_memory(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"non-finite loss {float(loss)} after {warmup + steps} steps")
    return {"step_s": times[warmup:], "warmup_s": sum(times[:warmup]), "peak_mem_mib": _peak_memory_mib(device),
            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else
            ("peak_rss" if reset else "peak_rss_of_process")}


def bench_model(name: str, size: str, compiled: str, args, device: torch.device, cache: dict) -> list[dict]:
    """The rows of one model at one size with compilation ``compiled`` ("off" / "on"), one per precision. FLOPs
    and FLOP/s peaks are counted once per model and size / per precision and kept in ``cache``."""
    t0 = time.perf_counter()
    cfg, shapes = model_and_shapes(name, size)
    torch.manual_seed(0)
    model = build(cfg).to(device)
    build_s = time.perf_counter() - t0
    batch_size = args.batch or default_batch(name, size, device)
    batch = {k: v.to(device) for k, v in synthetic_batch(model, shapes, batch_size).items()}
    if (name, size) not in cache:
        t1 = time.perf_counter()
        cache[name, size] = (count_step_flops(model, batch), time.perf_counter() - t1)
    flops, count_s = cache[name, size]
    tasks = len(model.active_tasks()) if hasattr(model, "active_tasks") else 1
    common = {"model": name, "size": size, "batch": batch_size, "shapes": dataclasses.asdict(shapes),
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              "trainable_params_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
              "tasks_per_step": tasks, "flops_per_step": flops, "build_s": round(build_s, 2),
              "flop_count_s": round(count_s, 2), "compile": compiled == "on"}
    rows = []
    for precision in args.precision:
        if precision not in cache:
            cache[precision] = peak_flops(device, PRECISIONS[precision])
        peak = cache[precision]
        row = {**common, "precision": precision}
        try:
            r = time_steps(model, batch, steps=args.steps, warmup=args.warmup, precision=precision,
                           compile_step=compiled == "on", device=device)
        except Exception as e:  # one failing configuration (a compile error on a new GPU) must not end the run
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{name:12s} {size:5s} {precision} compile={compiled}: FAILED {row['error']}", flush=True)
            rows.append(row)
            continue
        sec = statistics.median(r["step_s"])
        mfu = flops / sec / peak.flops if peak else None
        row.update(ms_per_step=round(sec * 1e3, 2), samples_per_s=round(batch_size / sec, 3),
                   tflops_per_s=round(flops / sec / 1e12, 4), mfu=None if mfu is None else round(mfu, 5),
                   peak_flops=peak.flops if peak else None, peak_source=peak.source if peak else None,
                   peak_mem_mib=round(r["peak_mem_mib"], 1), peak_mem_kind=r["peak_mem_kind"],
                   warmup_s=round(r["warmup_s"], 2), all_step_ms=[round(s * 1e3, 2) for s in r["step_s"]])
        print(f"{name:12s} {size:5s} {precision} compile={compiled:3s} batch {batch_size:3d}: "
              f"{row['samples_per_s']:9.2f} samples/s {row['ms_per_step']:9.1f} ms/step  MFU "
              f"{mfu if mfu is not None else float('nan'):.3f}  peak {row['peak_mem_mib']:8.0f} MiB", flush=True)
        rows.append(row)
    del model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def default_batch(name: str, size: str, device: torch.device) -> int:
    """2 at unit size and for base models on CPU (a base step at the paper's batch takes minutes there), else the
    experiment file's per-device ``data.batch_size`` (tiny: what the embedded default trains with; base on a GPU:
    the paper's)."""
    if size == "unit" or (size == "base" and device.type == "cpu"):
        return 2
    path = ROOT / "experiments" / name / ("tiny.yaml" if size == "tiny" else "pretrain.yaml")
    return config_lib.load(path).data.batch_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=SIZES)
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, autotuning, compilation)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per step (default: 2 at unit size and for base on CPU, else the experiment's "
                        "data.batch_size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no further model after this many seconds (its rows say 'skipped')")
    p.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    info = machine(str(device))
    t0 = time.perf_counter()
    rows, cache = [], {}
    settings = {"steps": args.steps, "warmup": args.warmup, "optimizer": "AdamW",
                "attention": "sdpa (torch scaled_dot_product_attention)",
                "float32_matmul_precision": torch.get_float32_matmul_precision(), "budget_s": args.budget_s}
    if device.type == "cuda":  # which fused kernels SDPA may pick (flash needs no padding mask, bf16/fp16)
        settings["sdpa_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                     "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                     "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}

    def write() -> Path:  # after every model: a run stopped by a time limit keeps what it measured
        return write_json(args.out, {"machine": dict(info), "settings": settings, "runs": rows,
                                     "wall_s": round(time.perf_counter() - t0, 1)})

    # Every model eager first, then compiled: a slow compilation cannot cost the eager figures.
    for compiled in args.compile:
        for name in args.models:
            for size in args.sizes:
                if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                    rows.extend({"model": name, "size": size, "compile": compiled == "on", "precision": precision,
                                 "skipped": f"time budget of {args.budget_s} s spent"} for precision in args.precision)
                    continue
                try:
                    rows.extend(bench_model(name, size, compiled, args, device, cache))
                except Exception as e:  # building or counting failed (out of memory, a model that breaks there)
                    traceback.print_exc()
                    rows.extend({"model": name, "size": size, "compile": compiled == "on", "precision": precision,
                                 "error": f"{type(e).__name__}: {e}"} for precision in args.precision)
                write()
    out = write()
    print(f"wrote {out} (wall {time.perf_counter() - t0:.1f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
