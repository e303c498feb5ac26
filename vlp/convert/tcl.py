"""Official TCL and ALBEF pre-training checkpoints -> a vlp ``TCL`` checkpoint.

The official file is ``{"model": state_dict, ...}`` (``torch.save`` of ``ALBEF``/``TCL`` in
``models/model_pretrain.py``); it is read with ``weights_only=True``. Keys map by prefix:

=================================  ===========================================
official                           vlp ``TCL``
=================================  ===========================================
``visual_encoder.*``               ``vision.vit.*``
``text_encoder.bert.*``            ``text.*`` (embeddings, encoder.layer.N)
``text_encoder.cls.predictions.*`` ``text.mlm_head.*`` (``decoder.bias`` = ``bias``)
``vision_proj / text_proj / itm``  same names
``<module>_m.*``                   ``momentum.<our module>.*``
``temp`` (0-d)                     ``temp.value`` ([1])
``image_queue / text_queue / ptr`` ``queue.image_queue / text_queue / queue_ptr``
=================================  ===========================================

The ``TCLConfig`` is inferred from the tensor shapes (``config_from_state_dict``): sizes and depths from the keys,
the official LayerNorm eps and token ids, attention heads width / 64 unless given.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vlp.convert.common import (check_fit, layer_indices, load_file, rename_by_prefix, tensor_dict,
                                unknown_keys_error)

__all__ = ["convert_state_dict", "load_official", "load_into", "config_from_state_dict", "convert_checkpoint"]

OFFICIAL = "an official TCL/ALBEF checkpoint ({'model': state_dict}, or a bare state dict)"

_PREFIXES = [  # official prefix -> ours; the first match wins
    ("visual_encoder.", "vision.vit."),
    ("text_encoder.bert.", "text."),
    ("text_encoder.cls.predictions.", "text.mlm_head."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
]
_MOMENTUM = {"visual_encoder_m.": "visual_encoder.", "text_encoder_m.": "text_encoder.",
             "vision_proj_m.": "vision_proj.", "text_proj_m.": "text_proj."}
_DROP = ("position_ids", "cls.predictions.decoder.bias")  # a buffer we rebuild; a duplicate of the tied bias
_BUFFERS = {"image_queue": "queue.image_queue", "text_queue": "queue.text_queue", "queue_ptr": "queue.queue_ptr"}


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official TCL/ALBEF ``model`` state_dict to our ``TCL`` keys. Unknown keys raise (named)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        if key.endswith(_DROP):
            continue
        if key == "temp":
            out["temp.value"] = value.reshape(1).float()
            continue
        if key in _BUFFERS:
            out[_BUFFERS[key]] = value
            continue
        momentum = next((m for m in _MOMENTUM if key.startswith(m)), None)
        if momentum is not None:
            ours = rename_by_prefix(_MOMENTUM[momentum] + key[len(momentum):], _PREFIXES)
            ours = None if ours is None else "momentum." + ours
        else:
            ours = rename_by_prefix(key, _PREFIXES)
        if ours is None:
            unknown.append(key)
            continue
        out[ours] = value
    if unknown:
        raise unknown_keys_error(unknown, "official TCL state_dict")
    return out


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state_dict of an official checkpoint (or a bare state_dict), read with ``weights_only=True``."""
    ckpt = load_file(path, what=OFFICIAL)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    return tensor_dict(ckpt, path, OFFICIAL)


def load_into(model, official: dict[str, torch.Tensor]) -> None:
    """Load a converted official state_dict into a built ``TCL``; every parameter must be covered (the tied MLM
    decoder weight has no key of its own in ours)."""
    check_fit(model, convert_state_dict(official), "TCL", optional=lambda k: k.endswith("mlm_head.decoder.weight"))


# ------------------------------------------------------------------------------------------ config inference ---
def _vision_config(sd: dict, heads: int | None):
    from vlp.blocks.vision import VisionConfig

    width, _, patch, _ = sd["visual_encoder.patch_embed.proj.weight"].shape
    grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
    return VisionConfig(name="custom", img_size=grid * patch, patch_size=patch, width=width,
                        depth=len(layer_indices(sd, "visual_encoder.blocks.")), heads=heads or max(1, width // 64),
                        mlp_ratio=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
                        qkv_bias="visual_encoder.blocks.0.attn.qkv.bias" in sd, ln_eps=1e-6)


def _text_config(sd: dict, heads: int | None):
    """BERT with its top layers fusing (the ones with cross-attention); official eps 1e-12, pad id 0."""
    from vlp.blocks.text import TextConfig

    pre = "text_encoder.bert."
    vocab, hidden = sd[pre + "embeddings.word_embeddings.weight"].shape
    layers = layer_indices(sd, pre + "encoder.layer.")
    fusion = [i for i in layers if f"{pre}encoder.layer.{i}.crossattention.self.key.weight" in sd]
    encoder_width = sd[f"{pre}encoder.layer.{fusion[0]}.crossattention.self.key.weight"].shape[1] if fusion else None
    return TextConfig(arch="bert", vocab_size=vocab, hidden=hidden, layers=len(layers),
                      heads=heads or max(1, hidden // 64),
                      intermediate=sd[pre + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position=sd[pre + "embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd[pre + "embeddings.token_type_embeddings.weight"].shape[0], ln_eps=1e-12,
                      pad_token_id=0, dropout=0.1, fusion_layers=len(fusion), encoder_width=encoder_width)


def config_from_state_dict(sd: dict, vision_heads: int | None = None, text_heads: int | None = None):
    """The ``TCLConfig`` an official TCL/ALBEF state dict fits (sizes from shapes; official eps and ids)."""
    from vlp.models.tcl import TCLConfig

    kw = {}
    if "temp" in sd:
        kw["temp"] = float(sd["temp"].reshape(-1)[0])
    if "image_queue" in sd:
        kw["queue_size"] = sd["image_queue"].shape[1]
    return TCLConfig(vision=_vision_config(sd, vision_heads), text=_text_config(sd, text_heads),
                     embed_dim=sd["vision_proj.weight"].shape[0], **kw)


def convert_checkpoint(src: str | Path, vision_heads: int | None = None, text_heads: int | None = None):
    """A ``TCL`` module (eval mode) holding the weights of the official checkpoint ``src``."""
    from vlp.models.tcl import TCL

    official = load_official(src)
    module = TCL(config_from_state_dict(official, vision_heads, text_heads))
    load_into(module, official)
    return module.eval()
