"""``vlp convert KIND SRC DST.ckpt``: official / transformers checkpoints -> a vlp checkpoint that
``vlp.models.load(DST)`` (and ``ckpt=DST`` in an experiment) reads.

Kinds:

* ``bridgetower-hf``: a transformers ``save_pretrained`` directory of ``BridgeTowerModel``,
  ``BridgeTowerForMaskedLM`` or ``BridgeTowerForImageAndTextRetrieval`` (config.json + safetensors/bin);
* ``bridgetower``: an official ``microsoft/BridgeTower`` Lightning checkpoint (.ckpt);
* ``tcl``: an official TCL / ALBEF checkpoint (``{"model": state_dict}``); sizes are read from the tensor shapes,
  attention heads are width / 64 unless ``--vision-heads`` / ``--text-heads`` say otherwise;
* ``clip-visual``: an OpenAI CLIP state dict (``visual.*`` keys, or a bare visual tower) -> a timm-named CLIP
  image tower (.pt) for ``model.vision.checkpoint`` (``VisionConfig.clip``).

Wiring into ``vlp/cli.py``: ``"convert": (HELP, vlp.convert.cli.add_args, vlp.convert.cli.run)``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

HELP = "convert an official or transformers checkpoint into a vlp checkpoint (bridgetower-hf, bridgetower, tcl, " \
       "clip-visual)"
KINDS = ("bridgetower-hf", "bridgetower", "tcl", "clip-visual")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="what SRC is")
    p.add_argument("src", help="source checkpoint file or directory")
    p.add_argument("dst", help="vlp checkpoint to write (.ckpt; .pt for clip-visual)")
    p.add_argument("--vision-heads", type=int, default=None, help="tcl: ViT attention heads (default width / 64)")
    p.add_argument("--text-heads", type=int, default=None, help="tcl: BERT attention heads (default width / 64)")
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
    else:
        module = convert_tcl(src, args.vision_heads, args.text_heads)
    from vlp.models.loading import save

    save(module, dst, converted_from=str(src), converted_kind=args.kind)
    n = sum(p.numel() for p in module.parameters())
    print(f"wrote {dst}: {type(module).__name__}, {n / 1e6:.1f}M parameters")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlp convert", description=HELP)
    add_args(parser)
    return run(parser.parse_args(argv))


# ------------------------------------------------------------------------------------------------------- TCL ---
def tcl_config_from_state_dict(sd: dict, vision_heads: int | None = None, text_heads: int | None = None):
    """The ``TCLConfig`` an official TCL/ALBEF state dict fits (sizes from shapes; official eps and ids)."""
    from vlp.blocks.text import TextConfig
    from vlp.blocks.vision import VisionConfig
    from vlp.models.tcl import TCLConfig

    width, _, patch, _ = sd["visual_encoder.patch_embed.proj.weight"].shape
    n = sd["visual_encoder.pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    depth = len({m.group(1) for k in sd for m in [re.match(r"visual_encoder\.blocks\.(\d+)\.", k)] if m})
    vision = VisionConfig(name="custom", img_size=grid * patch, patch_size=patch, width=width, depth=depth,
                          heads=vision_heads or max(1, width // 64),
                          mlp_ratio=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
                          qkv_bias="visual_encoder.blocks.0.attn.qkv.bias" in sd, ln_eps=1e-6)
    pre = "text_encoder.bert."
    vocab, hidden = sd[pre + "embeddings.word_embeddings.weight"].shape
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(pre) + r"encoder\.layer\.(\d+)\.", k)]
                     if m})
    fusion = [i for i in layers if f"{pre}encoder.layer.{i}.crossattention.self.key.weight" in sd]
    encoder_width = sd[f"{pre}encoder.layer.{fusion[0]}.crossattention.self.key.weight"].shape[1] if fusion else None
    text = TextConfig(arch="bert", vocab_size=vocab, hidden=hidden, layers=len(layers),
                      heads=text_heads or max(1, hidden // 64),
                      intermediate=sd[pre + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position=sd[pre + "embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd[pre + "embeddings.token_type_embeddings.weight"].shape[0], ln_eps=1e-12,
                      pad_token_id=0, dropout=0.1, fusion_layers=len(fusion), encoder_width=encoder_width)
    kw = {}
    if "temp" in sd:
        kw["temp"] = float(sd["temp"].reshape(-1)[0])
    if "image_queue" in sd:
        kw["queue_size"] = sd["image_queue"].shape[1]
    return TCLConfig(vision=vision, text=text, embed_dim=sd["vision_proj.weight"].shape[0], **kw)


def convert_tcl(src: Path, vision_heads: int | None = None, text_heads: int | None = None):
    from vlp.convert.tcl import load_into, load_official
    from vlp.models.tcl import TCL

    official = load_official(src)
    module = TCL(tcl_config_from_state_dict(official, vision_heads, text_heads))
    load_into(module, official)
    return module.eval()


# ----------------------------------------------------------------------------------------------- CLIP visual ---
def convert_clip_visual(src: Path, dst: Path, prefix: str | None = None) -> Path:
    import torch

    from vlp.convert.bridgetower import _read_state_dict_file, clip_visual_to_timm
    from vlp.utils.io import atomic_open

    sd = _read_state_dict_file(src)
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
