"""Train-step throughput of TCL (forward + backward + AdamW) on fixed batches, against its ALBEF ablation.

Run: ``python benchmarks/tcl_step.py [--config experiments/tcl/tiny.yaml] [--steps 20]``. Synthetic batches with
the config's shapes (no data loading), fp32 and bf16-autocast, interleaved repetitions; medians go to
``benchmarks/results/tcl_step.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import RESULTS, machine, write_json

import torch  # noqa: E402

from vlp import config as config_lib  # noqa: E402
from vlp.models import build  # noqa: E402


def synthetic_batch(cfg, vocab: int, generator: torch.Generator) -> dict:
    d = cfg.data
    b, t, s = d.batch_size, min(d.max_text_len, 25), d.image_size
    ids = torch.randint(5, vocab, (b, t), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones(b, t, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    labels[:, 1:5] = ids[:, 1:5]
    return {"image": torch.randn(b, 3, s, s, generator=generator),
            "image_aug": torch.randn(b, 3, s, s, generator=generator), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": ids, "mlm_labels": labels, "image_ids": torch.arange(b)}


def time_steps(model, batch, steps: int, bf16: bool) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(model.compute_losses(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/tcl/tiny.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--vocab", type=int, default=201, help="vocabulary when the config takes it from a tokenizer")
    p.add_argument("--out", default=str(RESULTS / "tcl_step.json"))
    args = p.parse_args(argv)
    cfg = config_lib.load(args.config)
    info = machine("cpu")
    results = {}
    for label, overrides in (("tcl", {}), ("albef", {"imc": False, "lmi": False})):
        import dataclasses

        model_cfg = dataclasses.replace(cfg.model, **overrides)
        if model_cfg.text.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, vocab_size=args.vocab,
                                                                                pad_token_id=0))
        torch.manual_seed(0)
        model = build(model_cfg, cfg.optim)
        batch = synthetic_batch(cfg, model_cfg.text.vocab_size, torch.Generator().manual_seed(0))
        for bf16 in (False, True):
            sec = time_steps(model, batch, args.steps, bf16)
            results[f"{label}_{'bf16' if bf16 else 'fp32'}"] = {"sec_per_step": round(sec, 4),
                                                                "steps_per_s": round(1 / sec, 3)}
            print(f"{label:6s} {'bf16' if bf16 else 'fp32'}: {1 / sec:6.2f} steps/s ({sec * 1000:.0f} ms/step, "
                  f"batch {cfg.data.batch_size})")
    results["ratio_tcl_over_albef_fp32"] = round(results["tcl_fp32"]["sec_per_step"]
                                                 / results["albef_fp32"]["sec_per_step"], 3)
    print(f"TCL / ALBEF step time (fp32): {results['ratio_tcl_over_albef_fp32']:.2f}x")
    write_json(args.out, {"config": args.config, "results": results, "machine": info})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
