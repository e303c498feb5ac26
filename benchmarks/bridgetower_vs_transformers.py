"""Benchmark: one BridgeTower pre-training step (MLM pass + ITM pass, forward + backward) of vlp's ``BridgeTower``
against transformers' ``BridgeTowerForMaskedLM`` (+ its ITM head), same architecture, weights and inputs.

The transformers step is the official recipe: a masked-LM pass (masked caption, true image) and an ITM pass (clean
caption, half the images swapped for another image of the batch), each a full forward of the model, loss = MLM CE
(over all positions, -100 ignored) + ITM CE. The vlp step is ``BridgeTower.compute_losses`` on the same batch
(same masked ids, labels and ITM pairs) with its defaults, and two ablations that show where the time goes:

* ``vlp``: defaults (SDPA attention; the ITM pass re-uses the MLM pass's image-tower states because its negatives
  come from the batch; MLM head on masked tokens only; the MLM pass skips the unread last image cross layer);
* ``vlp_vit_twice``: ``reuse_image_states=False`` (the ITM pass runs the ViT again, as the official code does);
* ``vlp_same_work``: ``reuse_image_states=False, mlm_masked_only=False`` (both passes run the ViT, the MLM head
  scores every token): the same arithmetic as transformers, so the difference is the implementation alone;
* ``vlp_same_work_eager``: as above with eager (softmax(QK^T)V) attention in the cross-modal layers.

Timing: all variants in one process, interleaved (one step of each per round), ``--warmup`` rounds discarded,
median over ``--reps`` rounds; ``torch.manual_seed`` before every step so dropout draws are alike. Results go to
``benchmarks/results/bridgetower_vs_transformers.json`` with the machine description.

    python benchmarks/bridgetower_vs_transformers.py [--batch 16] [--reps 7] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

from _common import RESULTS, machine, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


SAME_WORK_GOAL = 0.8


def hf_config(args):
    from transformers import BridgeTowerConfig

    vision = dict(hidden_size=args.width, num_hidden_layers=args.layers, patch_size=16, image_size=args.image_size)
    text = dict(hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                intermediate_size=4 * args.width, vocab_size=args.vocab, max_position_embeddings=args.text_len + 2)
    return BridgeTowerConfig(text_config=text, vision_config=vision, hidden_size=args.width,
                             num_hidden_layers=args.cross_layers, num_attention_heads=args.width // 64)


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.text_len
    ids = torch.randint(3, args.vocab, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(b):  # varied caption lengths, RoBERTa padding
        n = t - int(torch.randint(0, t // 2, (1,), generator=g))
        mask[i, n:], ids[i, n:] = 0, 1
    selected = (torch.rand(b, t, generator=g) < 0.15) & (mask == 1)
    selected[:, 0] = False
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    mlm_ids = torch.where(selected, torch.full_like(ids, args.vocab - 1), ids)
    perm = torch.randperm(b, generator=g)
    index = torch.arange(b)
    index[perm[: b // 2]] = perm[: b // 2].roll(1)  # half the pairs get another image of the batch
    itm_labels = (index == torch.arange(b)).long()
    batch = dict(image=torch.randn(b, 3, args.image_size, args.image_size, generator=g), input_ids=ids,
                 attention_mask=mask, mlm_input_ids=mlm_ids, mlm_labels=labels, itm_image_index=index,
                 itm_labels=itm_labels, image_ids=torch.arange(b))
    return {k: v.to(device) for k, v in batch.items()}


def build(args, device):
    from transformers import BridgeTowerForMaskedLM
    from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerITMHead

    from vlp.convert.bridgetower import build_module, load_hf

    torch.manual_seed(0)
    cfg = hf_config(args)
    hf = BridgeTowerForMaskedLM(cfg)
    itm = BridgeTowerITMHead(2 * args.width)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        vcfg, sd = load_hf(d)
    sd["itm_head.weight"], sd["itm_head.bias"] = itm.fc.weight.detach().clone(), itm.fc.bias.detach().clone()
    variants = {}
    for name, changes in [("vlp", {}),
                          ("vlp_vit_twice", dict(reuse_image_states=False)),
                          ("vlp_same_work", dict(reuse_image_states=False, mlm_masked_only=False)),
                          ("vlp_same_work_eager", dict(reuse_image_states=False, mlm_masked_only=False,
                                                       attn_implementation="eager"))]:
        variants[name] = build_module(dataclasses.replace(vcfg, **changes), sd).train().to(device)
    hf.train().to(device)
    itm.train().to(device)
    return hf, itm, variants


def _loss_only(step):
    def wrapped(*args):
        return step(*args, backward=False)

    step.__wrapped__ = wrapped
    return step


@_loss_only
def hf_step(hf, itm, batch, backward=True):
    out = hf(input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["image"],
             labels=batch["mlm_labels"])
    pooled = hf.bridgetower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["image"][batch["itm_image_index"]]).pooler_output
    loss = out.loss + F.cross_entropy(itm(pooled), batch["itm_labels"])
    if backward:
        loss.backward()
    return loss.detach()


@_loss_only
def vlp_step(model, batch, backward=True):
    losses = model.compute_losses(batch)
    loss = losses["mlm"] + losses["itm"]
    if backward:
        loss.backward()
    return loss.detach()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, float(loss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="uni-modal layers (text and vision)")
    p.add_argument("--cross-layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (the official code ran TF32)")
    p.add_argument("--out", default=str(RESULTS / "bridgetower_vs_transformers.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    info = machine(str(device))
    hf, itm, variants = build(args, device)
    batch = make_batch(args, device)
    steps = {"transformers": lambda: hf_step(hf, itm, batch),
             **{name: (lambda m=m: vlp_step(m, batch)) for name, m in variants.items()}}
    params = [hf, itm, *variants.values()]
    # Same computation: without dropout every variant's loss equals transformers'.
    for m in params:
        m.eval()
    with torch.no_grad():
        check = {"transformers": float(hf_step.__wrapped__(hf, itm, batch))}
        check.update({name: float(vlp_step.__wrapped__(m, batch)) for name, m in variants.items()})
    for m in params:
        m.train()
    spread = max(check.values()) - min(check.values())
    if spread > 1e-3 * max(1.0, abs(check["transformers"])):
        raise SystemExit(f"the variants compute different losses in eval mode: {check}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    t0 = time.perf_counter()
    for rnd in range(args.warmup + args.reps):
        for name, fn in steps.items():
            for m in params:
                m.zero_grad(set_to_none=True)
            torch.manual_seed(rnd)
            dt, loss = timed(fn, device)
            losses[name] = loss
            if rnd >= args.warmup:
                times[name].append(dt)
    wall = time.perf_counter() - t0
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ref = median["transformers"]
    result = {
        "machine": info,
        "config": {k: getattr(args, k) for k in ("width", "layers", "cross_layers", "image_size", "text_len", "vocab",
                                                 "batch", "reps", "warmup")}
        | {"image_tokens": (args.image_size // 16) ** 2 + 1, "tf32": bool(args.tf32)},
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_transformers": {k: round(v / ref, 3) for k, v in median.items()},
        # the goal when both do the same arithmetic (issue #13): at most 0.8 x transformers' step time
        "same_work_goal": {"ratio": round(median["vlp_same_work"] / ref, 3), "goal": SAME_WORK_GOAL,
                           "met": median["vlp_same_work"] / ref <= SAME_WORK_GOAL},
        "all_step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "eval_mode_loss": {k: round(v, 6) for k, v in check.items()},
        "last_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "wall_s": round(wall, 1),
    }
    out = write_json(args.out, result)
    print(f"{'variant':<22}{'median step (s)':>16}{'x transformers':>16}")
    for name in steps:
        print(f"{name:<22}{median[name]:>16.4f}{median[name] / ref:>16.3f}")
    print(f"wrote {out}  (wall {wall:.0f} s, load {info['loadavg_1m_at_start']:.1f} -> "
          f"{info['loadavg_1m_at_end']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
