"""Shared encoder blocks: vision tower (timm ViT / CLIP-ViT), BERT parts (embeddings, plain and cross-attending layer
stacks, MLM head, pretrained loading by layer range), text towers built from them (HF BERT/RoBERTa with fusion layers
and MLM head), two-stream co-attention fusion with bridge layers, the detector-region embedder (UNITER), heads,
momentum (EMA) twins and feature queues.

Names are imported lazily, so ``import vlp.blocks.momentum`` (or ``heads``) does not pay for timm/transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "VisionConfig": "vision",
    "VisionOutput": "vision",
    "VisionTower": "vision",
    "resample_pos_embed": "vision",
    "load_vision_state_dict": "vision",
    "TextConfig": "text",
    "TextTower": "text",
    "TextEncoder": "text",
    "BertStack": "bert",
    "LayerStack": "bert",
    "CrossLayerStack": "bert",
    "bert_layer": "bert",
    "text_embeddings": "bert",
    "BertCheckpoint": "bert_pretrained",
    "load_bert_embeddings": "bert_pretrained",
    "load_bert_layers": "bert_pretrained",
    "load_mlm_head": "bert_pretrained",
    "MLMHead": "text",
    "MASK_VALUE": "text",
    "additive_mask": "text",
    "CrossModalLayer": "fusion",
    "BridgeLayer": "fusion",
    "CoAttentionStack": "fusion",
    "BRIDGE_KINDS": "fusion",
    "RegionEmbedder": "regions",
    "location_features": "regions",
    "Projection": "heads",
    "ITMHead": "heads",
    "Pooler": "heads",
    "mlp_head": "heads",
    "init_bert_weights": "heads",
    "MomentumPair": "momentum",
    "FeatureQueue": "momentum",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
