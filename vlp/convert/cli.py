"""``vlp convert KIND SRC DST.ckpt``: official / transformers checkpoints -> a vlp checkpoint that
``vlp.models.load(DST)`` (and ``ckpt=DST`` in an experiment) reads.

Kinds:

* ``bridgetower-hf``: a transformers ``save_pretrained`` directory of ``BridgeTowerModel``,
  ``BridgeTowerForMaskedLM`` or ``BridgeTowerForImageAndTextRetrieval`` (config.json + safetensors/bin);
* ``bridgetower``: an official ``microsoft/BridgeTower`` Lightning checkpoint (.ckpt);
* ``tcl``: an official TCL / ALBEF checkpoint (``{"model": state_dict}``); sizes are read from the tensor shapes,
  attention heads are width / 64 unless ``--vision-heads`` / ``--text-heads`` say otherwise;
* ``uniter``: an official UNITER state dict (``model_step_N.pt``, ``uniter-base.pt``, ``uniter-base-init.pt``; key map
  in ``vlp.convert.uniter``); sizes from the shapes, attention heads width / 64 unless ``--text-heads``;
* ``mvptr``: an official MVPTR ``BiBertImgForPreTraining`` state dict (key map in ``vlp.convert.mvptr``); sizes from
  the shapes, attention heads width / 64 unless ``--text-heads``; ``--itm-match-index 1`` for a retrieval
  fine-tuned file (pre-training files label a match 0);
* ``clip-visual``: an OpenAI CLIP state dict (``visual.*`` keys, or a bare visual tower) -> a timm-named CLIP
  image tower (.pt) for ``model.vision.checkpoint`` (``VisionConfig.clip``).

Wiring into ``vlp/cli.py``: ``"convert": (HELP, vlp.convert.cli.add_args, vlp.convert.cli.run)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert an official or transformers checkpoint into a vlp checkpoint (bridgetower-hf, bridgetower, tcl, " \
       "uniter, mvptr, clip-visual)"
KINDS = ("bridgetower-hf", "bridgetower", "tcl", "uniter", "mvptr", "clip-visual")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="what SRC is")
    p.add_argument("src", help="source checkpoint file or directory")
    p.add_argument("dst", help="vlp checkpoint to write (.ckpt; .pt for clip-visual)")
    p.add_argument("--vision-heads", type=int, default=None, help="tcl: ViT attention heads (default width / 64)")
    p.add_argument("--text-heads", type=int, default=None, help="tcl, uniter, mvptr: BERT attention heads (default width / "
                                                                "64)")
    p.add_argument("--itm-match-index", type=int, default=0, choices=(0, 1),
                   help="mvptr: the ITM row of a matched pair in SRC (0: pre-training file, 1: retrieval file)")
    p.add_argument("--prefix", default=None, help="clip-visual: key prefix of the image tower (default: 'visual.' "
                                                  "when such keys exist, else none)")


def run(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, dst = Path(args.src), Path(args.dst)
    if args.kind == "clip-visual":
        path = convert_clip_visual(src, dst, args.prefix)
        print(f"wrote {path} (load it with model.vision.checkpoint={path})")
        return 0
    if args.kind == "bridgetower-hf":
        from vlp.convert.bridgetower import build_module, load_hf

        cfg, sd = load_hf(src)
        module = build_module(cfg, sd)
    elif args.kind == "bridgetower":
        from vlp.convert.bridgetower import build_module, load_official

        cfg, sd = load_official(src)
        module = build_module(cfg, sd)
    elif args.kind == "uniter":
        from vlp.convert.uniter import convert_checkpoint

        module = convert_checkpoint(src, args.text_heads)
    elif args.kind == "mvptr":
        from vlp.convert.mvptr import convert_checkpoint

        module = convert_checkpoint(src, args.text_heads, args.itm_match_index)
    else:
        from vlp.convert.tcl import convert_checkpoint

        module = convert_checkpoint(src, args.vision_heads, args.text_heads)
    from vlp.models.loading import save

    save(module, dst, converted_from=str(src), converted_kind=args.kind)
    n = sum(p.numel() for p in module.parameters())
    print(f"wrote {dst}: {type(module).__name__}, {n / 1e6:.1f}M parameters")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlp convert", description=HELP)
    add_args(parser)
    return run(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------- CLIP visual ---
def convert_clip_visual(src: Path, dst: Path, prefix: str | None = None) -> Path:
    import torch

    from vlp.convert.bridgetower import clip_visual_to_timm
    from vlp.convert.common import read_weights
    from vlp.utils.io import atomic_open

    sd = read_weights(src, what="an OpenAI CLIP state dict (visual.* keys) or a CLIP image tower")
    for key in ("state_dict", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    if prefix is None:
        prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    timm_sd = clip_visual_to_timm(sd, prefix)
    if not timm_sd:
        raise ValueError(f"{src}: no CLIP image-tower keys under prefix {prefix!r}")
    with atomic_open(dst, "wb") as f:
        torch.save(timm_sd, f)
    return dst


if __name__ == "__main__":
    raise SystemExit(main())
