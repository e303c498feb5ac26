"""``Visual``: what a model sees of an image, pixels or detector regions, as one small batch type (DESIGN §5).

A pixel model (TCL, BridgeTower) reads ``pixels``; a region model (UNITER, MVPTR) reads ``features``/``boxes``/
``mask`` (and ``cls_prob`` for MRC-kl, ``labels`` for concept tags). Every entry point of the suite that hands images
to a model (pre-training, retrieval, VQA) builds one with :meth:`Visual.from_batch`, so nothing downstream assumes
pixels.

=============  =======================  ==========================================================================
field          dtype / shape            meaning
=============  =======================  ==========================================================================
pixels         float [B, 3, S, S]       normalised image (view 1)
features       float [B, N, D]          region features, zero-padded to the batch's most regions
boxes          float [B, N, 4]          xyxy in [0, 1]
mask           bool [B, N]              True on real regions
cls_prob       float [B, N, C]          the detector's class distribution (MRC-kl targets)
labels         list[list[str]] [B]      object names of the regions
tag_ids        int64 [B, T]             ``[CLS] tags [SEP]``: the image's concept tags, tokenised (MVPTR)
tag_mask       int64 [B, T]             1 on tag tokens
=============  =======================  ==========================================================================
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Visual"]

# batch key -> Visual field (the collator's key table, vlp.data.collate)
BATCH_KEYS = {"image": "pixels", "region_features": "features", "region_boxes": "boxes", "region_mask": "mask",
              "region_cls_prob": "cls_prob", "region_labels": "labels", "tag_ids": "tag_ids", "tag_mask": "tag_mask"}


class Visual(NamedTuple):
    pixels: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    cls_prob: Optional[torch.Tensor] = None
    labels: Optional[list] = None
    tag_ids: Optional[torch.Tensor] = None
    tag_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_batch(cls, batch: dict) -> "Visual":
        """The visual part of a collated batch (keys ``image``, ``region_*``); missing keys stay ``None``."""
        return cls(**{field: batch[key] for key, field in BATCH_KEYS.items() if key in batch})

    @property
    def has_pixels(self) -> bool:
        return self.pixels is not None

    @property
    def has_regions(self) -> bool:
        return self.features is not None

    @property
    def batch_size(self) -> int:
        for t in (self.pixels, self.features):
            if t is not None:
                return t.shape[0]
        raise ValueError("Visual holds neither pixels nor region features")

    @property
    def device(self) -> torch.device:
        return (self.pixels if self.pixels is not None else self.features).device

    def require(self, *fields: str, model: str = "the model") -> "Visual":
        """``self``, or a ValueError naming the batch keys a model needs and the batch lacks."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            keys = {v: k for k, v in BATCH_KEYS.items()}
            raise ValueError(f"{model} reads {', '.join(missing)} (batch keys {', '.join(keys[f] for f in missing)}), "
                             "which the batch does not carry: is data.regions / data.images set for this model?")
        return self

    def select(self, index: torch.Tensor) -> "Visual":
        """Rows ``index`` (a LongTensor) of every field."""
        def pick(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value.index_select(0, index.to(value.device))
            return [value[int(i)] for i in index.tolist()]

        return Visual(*(pick(v) for v in self))

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "Visual":
        """Tensors moved to ``device``; floating-point ones also cast to ``dtype`` when given (masks stay bool)."""
        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device)

        return Visual(*(move(v) for v in self))
