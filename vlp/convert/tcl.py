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
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def _rename(key: str) -> str | None:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


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
            ours = _rename(_MOMENTUM[momentum] + key[len(momentum):])
            ours = None if ours is None else "momentum." + ours
        else:
            ours = _rename(key)
        if ours is None:
            unknown.append(key)
            continue
        out[ours] = value
    if unknown:
        raise KeyError(f"official TCL state_dict: no vlp home for keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state_dict of an official checkpoint (or a bare state_dict), loaded safely."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: expected an official TCL/ALBEF checkpoint ({{'model': state_dict}})")
    return ckpt


def load_into(model, official: dict[str, torch.Tensor]) -> None:
    """Load a converted official state_dict into a built ``TCL``; every parameter must be covered."""
    converted = convert_state_dict(official)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    # The tied MLM decoder weight has no key of its own in ours; everything else must be there.
    missing = [k for k in missing if not k.endswith("mlm_head.decoder.weight")]
    if missing or unexpected:
        raise KeyError(f"converted TCL checkpoint does not fit the model: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
