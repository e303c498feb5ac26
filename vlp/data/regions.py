"""Detector regions of a sample (``regions.npz``, DESIGN §3) and their padding into a batch.

``load_regions`` checks one decoded npz and returns per-sample tensors; ``pad_regions`` zero-pads a list of them to
the batch's most regions. Batch keys (see the key table of ``vlp.data.collate``): ``region_features`` [B, N, D],
``region_boxes`` [B, N, 4], ``region_mask`` [B, N], ``region_cls_prob`` [B, N, C] and ``region_labels``
(list[list[str]], unpadded) when every sample of the batch has them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vlp.data.stream import CorruptSample

__all__ = ["load_regions", "pad_regions"]


def load_regions(npz: dict, key: str = "?") -> dict:
    """Decoded ``regions.npz`` -> ``region_features`` float32 [N, D], ``region_boxes`` [N, 4], optional
    ``region_cls_prob`` [N, C] and ``region_labels`` (list of N object names). A malformed file is a
    ``CorruptSample`` naming the sample key and the member."""
    if not isinstance(npz, dict) or "features" not in npz or "boxes" not in npz:
        raise CorruptSample(f"sample {key}: regions.npz needs 'features' and 'boxes'")
    feats = np.asarray(npz["features"], dtype=np.float32)
    boxes = np.asarray(npz["boxes"], dtype=np.float32)
    if feats.ndim != 2 or boxes.shape != (feats.shape[0], 4):
        raise CorruptSample(f"sample {key}: regions.npz features {feats.shape} / boxes {boxes.shape} do not match "
                            "(expected [N, D] and [N, 4])")
    n = feats.shape[0]
    out = {"region_features": torch.from_numpy(feats), "region_boxes": torch.from_numpy(boxes)}
    if "cls_prob" in npz:
        cls = np.asarray(npz["cls_prob"], dtype=np.float32)
        if cls.ndim != 2 or cls.shape[0] != n:
            raise CorruptSample(f"sample {key}: regions.npz cls_prob {cls.shape} does not match {n} regions "
                                "(expected [N, C])")
        out["region_cls_prob"] = torch.from_numpy(cls)
    if "labels" in npz:
        labels = np.asarray(npz["labels"])
        if labels.shape != (n,):
            raise CorruptSample(f"sample {key}: regions.npz labels {labels.shape} does not match {n} regions "
                                "(expected [N] object names)")
        out["region_labels"] = [str(x) for x in labels.tolist()]
    return out


def pad_regions(samples: Sequence[dict]) -> dict:
    """Zero-pad per-sample region tensors to the batch maximum; ``region_mask`` marks the real ones.
    ``region_cls_prob`` / ``region_labels`` are kept only when every sample carries them."""
    n = max(s["region_features"].shape[0] for s in samples)
    d = samples[0]["region_features"].shape[1]
    b = len(samples)
    feats, boxes = torch.zeros(b, n, d), torch.zeros(b, n, 4)
    mask = torch.zeros(b, n, dtype=torch.bool)
    with_cls = all("region_cls_prob" in s for s in samples)
    cls = torch.zeros(b, n, samples[0]["region_cls_prob"].shape[1]) if with_cls else None
    for i, s in enumerate(samples):
        k = s["region_features"].shape[0]
        if s["region_features"].shape[1] != d:
            raise ValueError(f"sample {s.get('key')}: region feature dim {s['region_features'].shape[1]} != {d} of "
                             f"sample {samples[0].get('key')}; every source of a run needs the same extractor")
        feats[i, :k], boxes[i, :k], mask[i, :k] = s["region_features"], s["region_boxes"], True
        if cls is not None:
            if s["region_cls_prob"].shape[1] != cls.shape[2]:
                raise ValueError(f"sample {s.get('key')}: {s['region_cls_prob'].shape[1]} detector classes != "
                                 f"{cls.shape[2]} of sample {samples[0].get('key')}")
            cls[i, :k] = s["region_cls_prob"]
    out = {"region_features": feats, "region_boxes": boxes, "region_mask": mask}
    if cls is not None:
        out["region_cls_prob"] = cls
    if all("region_labels" in s for s in samples):
        out["region_labels"] = [list(s["region_labels"]) for s in samples]
    return out
