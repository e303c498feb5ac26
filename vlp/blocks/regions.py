"""Detector-region embedders: UNITER's (``UniterImageEmbeddings``, official parameter names, the 7-d box feature) and
MVPTR's (one Linear over feature || 6 box values, :class:`ConcatRegionEmbedder`).

For region features ``v`` [B, N, D] with boxes and a token-type vector ``e_type`` [H]::

    v'  = M[1] where a region is masked (MRFR / MRC: zeroed features + the mask vector), else v
    e   = LN(LN_img(W_img v' + b_img) + LN_pos(W_pos loc7 + b_pos) + e_type)
    out = Dropout(e)

* ``img_linear`` (W_img: Linear(D -> H)), ``img_layer_norm``, ``pos_linear`` (W_pos: Linear(7 -> H)),
  ``pos_layer_norm``, ``mask_embedding`` (``nn.Embedding(2, D)``: M), ``LayerNorm`` (the output LN); LayerNorm eps
  1e-12 as the official FusedLayerNorm. The keys are those of the official ``uniter.img_embeddings.*``, so the
  converter maps them by prefix.
* **Masked regions.** The official collate zero-fills a masked region's features and the forward adds
  ``mask_embedding(img_masks)``, after re-zeroing row 0 of the table in place (``weight.data[0].fill_(0)``) at every
  masked forward. Here the masked features are zeroed and only row 1 is added (``m * M[1]``), which is the same
  number with row 0 = 0, without writing into a parameter in the forward; row 0 is zeroed at init and by the
  converter, and never receives a gradient. Without a mask (MLM, ITM, retrieval) the table is not used, as in the
  official code.
* **Location.** ``loc7 = (x1, y1, x2, y2, w, h, w * h)`` of the xyxy box normalised to [0, 1]
  (:func:`location_features`). The official collate passes this 7-d vector, made from the stored 6-d ``norm_bb``
  ``(x1, y1, x2, y2, w, h)`` by appending ``w * h`` (``data/data.py``); our shards store xyxy (``Visual.boxes``) and the
  block computes the 7 values itself. :meth:`RegionEmbedder.forward` also accepts a ready 7-d tensor (official
  batches, the parity test).
* **Token type.** UNITER has no table of its own for images: ``e_type`` is row 1 of the text embeddings'
  ``token_type_embeddings`` (passed in by the model, so the table stays shared).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["location_features", "RegionEmbedder", "ConcatRegionEmbedder"]


def location_features(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes in [0, 1], [..., 4] -> UNITER's 7-d location ``(x1, y1, x2, y2, w, h, w * h)`` [..., 7].

    A box of the official 6-d ``norm_bb`` gives the same values (w = x2 - x1, h = y2 - y1 in normalised units)."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"location_features: boxes must be [..., 4] xyxy, got {tuple(boxes.shape)}")
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], -1)


class RegionEmbedder(nn.Module):
    """UNITER's region embedding. ``forward(features [B, N, D], location [B, N, 4 | 7], type_embedding [H] or
    [B, N, H], masked [B, N] bool | None) -> [B, N, H]``; ``location`` is xyxy boxes (4) or the 7-d feature (7)."""

    def __init__(self, feat_dim: int, hidden: int, dropout: float = 0.1, ln_eps: float = 1e-12,
                 location_dim: int = 7):
        super().__init__()
        self.feat_dim, self.hidden, self.location_dim = feat_dim, hidden, location_dim
        self.img_linear = nn.Linear(feat_dim, hidden)
        self.img_layer_norm = nn.LayerNorm(hidden, eps=ln_eps)
        self.pos_layer_norm = nn.LayerNorm(hidden, eps=ln_eps)
        self.pos_linear = nn.Linear(location_dim, hidden)
        self.mask_embedding = nn.Embedding(2, feat_dim)
        self.LayerNorm = nn.LayerNorm(hidden, eps=ln_eps)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """BERT init (the official ``init_weights``): Linear/Embedding N(0, std), biases 0, LayerNorms (1, 0); row 0
        of ``mask_embedding`` zero."""
        for m in (self.img_linear, self.pos_linear):
            m.weight.normal_(0.0, std)
            m.bias.zero_()
        self.mask_embedding.weight.normal_(0.0, std)
        self.mask_embedding.weight[0].zero_()
        for ln in (self.img_layer_norm, self.pos_layer_norm, self.LayerNorm):
            ln.weight.fill_(1.0)
            ln.bias.zero_()

    def mask_features(self, features: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        """``features`` with masked regions zeroed and the learned mask vector ``mask_embedding.weight[1]`` added."""
        if masked is None:
            return features
        if masked.shape != features.shape[:-1]:
            raise ValueError(f"region mask {tuple(masked.shape)} does not match features {tuple(features.shape)}")
        vector = self.mask_embedding.weight[1].to(features.dtype)
        return torch.where(masked.unsqueeze(-1).bool(), vector, features)  # 0 + M[1] where masked

    def forward(self, features: torch.Tensor, location: torch.Tensor, type_embedding: torch.Tensor,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        if features.shape[-1] != self.feat_dim:
            raise ValueError(f"region features are {features.shape[-1]}-d, the embedder expects {self.feat_dim} "
                             "(model.region_dim must match the data's regions.npz)")
        if location.shape[-1] == 4 and self.location_dim == 7:
            location = location_features(location)
        if location.shape[-1] != self.location_dim:
            raise ValueError(f"region location is {location.shape[-1]}-d; expected xyxy boxes (4) or the "
                             f"{self.location_dim}-d location feature")
        feats = self.mask_features(features, masked)
        img = self.img_layer_norm(self.img_linear(feats))
        pos = self.pos_layer_norm(self.pos_linear(location.to(feats.dtype)))
        return self.dropout(self.LayerNorm(img + pos + type_embedding))


class ConcatRegionEmbedder(nn.Module):
    """MVPTR's (OSCAR's) region embedding: ``Dropout([LN](W [v || b6] + bias))`` with ``b6 = (x1, y1, x2, y2, w, h)``
    of the normalised xyxy box (the official 2054-d input = 2048-d feature + these 6 values). No position or token
    type embedding. Keys ``img_embedding.{weight,bias}`` and ``LayerNorm.*`` (with ``layernorm``: the official
    ``use_img_layernorm``). ``box_values=False``: the features already carry the 6 values (VinVL TSV features)."""

    def __init__(self, feat_dim: int, hidden: int, box_values: bool = True, layernorm: bool = True,
                 dropout: float = 0.1, ln_eps: float = 1e-12):
        super().__init__()
        self.feat_dim, self.box_values = feat_dim, box_values
        self.img_embedding = nn.Linear(feat_dim + (6 if box_values else 0), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=ln_eps) if layernorm else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if features.shape[-1] != self.feat_dim:
            raise ValueError(f"region features are {features.shape[-1]}-d, the embedder expects {self.feat_dim} "
                             "(model.region_dim must match the data's regions.npz)")
        if self.box_values:
            if boxes is None or boxes.shape[-1] != 4:
                raise ValueError("the region embedding appends the 6 box values: pass xyxy boxes [..., 4]")
            features = torch.cat([features, location_features(boxes.to(features.dtype))[..., :6]], -1)
        x = self.img_embedding(features)
        if self.LayerNorm is not None:
            x = self.LayerNorm(x)
        return self.dropout(x)
