"""Official MVPTR checkpoints (``Junction4Nako/mvp_pytorch``, ``BiBertImgForPreTraining``) -> a vlp ``MVPTR``.

Files are read with ``weights_only=True`` (``vlp.utils.checkpoint``: nothing in them is executed). Keys:

====================================  =====================================  ============================================
official                              vlp ``MVPTR``                          notes
====================================  =====================================  ============================================
``bert.embeddings.*``                 ``embeddings.*``                       word table = words, then phrase rows
``bert.img_embedding.*``              ``img_embedding.img_embedding.*``      Linear over the 2054-d feature
``bert.LayerNorm.*``                  ``img_embedding.LayerNorm.*``          the image LayerNorm (``use_img_layernorm``)
``bert.{txt,vis,mul}_encoder.*``      ``{txt,vis,mul}_encoder.*``            HF ``BertLayer`` names
``bert.pooler.*``                     ``pooler.*``
``bert.txt_proj`` / ``bert.vis_proj`` ``txt_proj`` / ``vis_proj``            [H, E], used as ``x @ P``
``logit_scale``                       ``logit_scale`` ([1])                  raw (used as ``exp``)
``cls.predictions.*``                 ``mlm_head.*``                         decoder tied to the word rows
``half_mlm.*``                        ``mcr_head.*``                         decoder tied to the word rows
``cls.seq_relationship.*``            ``itm_head.*``                         rows swapped for a pre-training file
====================================  =====================================  ============================================

ITM convention: the official pre-training labels a matched pair 0 (BERT's "is next"), fine-tuned retrieval models 1;
the contract's ``match_logits`` has index 1 = matched, so a pre-training file's two ``seq_relationship`` rows are
swapped (``itm_match_index=0``, the default; pass 1 for a retrieval checkpoint). Dropped with a warning: ``qa_head``
(unused in pre-training) and heads of other tasks; ``*.decoder.weight`` (tied views, absent from the released
files: the official code ties them to the first ``only_word_size`` rows).

Sizes come from the shapes (``config_from_state_dict``): the word vocabulary is the LM head's bias length
(``only_word_size``), the phrase rows are the rest of the word table, ``text.layers`` is twice a stack's depth,
``region_dim`` the image Linear's input (the official 2054 = feature + 6 box values, so ``box_values=False``), the
image LayerNorm is on when the file has it; attention heads width / 64 unless given.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.convert.common import layer_indices, load_converted, load_official_state_dict, rename_by_prefix, \
    report_skipped, unknown_keys_error

__all__ = ["convert_state_dict", "config_from_state_dict", "load_official", "load_into", "convert_checkpoint"]

OFFICIAL = "an official MVPTR state dict (BiBertImgForPreTraining)"

_PREFIXES = [  # official prefix -> ours; the first match wins
    ("bert.embeddings.", "embeddings."),
    ("bert.img_embedding.", "img_embedding.img_embedding."),
    ("bert.LayerNorm.", "img_embedding.LayerNorm."),
    ("bert.txt_encoder.", "txt_encoder."),
    ("bert.vis_encoder.", "vis_encoder."),
    ("bert.mul_encoder.", "mul_encoder."),
    ("bert.pooler.", "pooler."),
    ("cls.predictions.", "mlm_head."),
    ("half_mlm.", "mcr_head."),
    ("cls.seq_relationship.", "itm_head."),
]
_EXACT = {"bert.txt_proj": "txt_proj", "bert.vis_proj": "vis_proj", "logit_scale": "logit_scale"}
_DROP_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.decoder.weight",
              "half_mlm.decoder.weight", "cls.predictions.decoder.bias", "half_mlm.decoder.bias")
_SKIP_PREFIXES = ("qa_head.", "qa_seq_relation.", "classifier.", "re_head.")


def convert_state_dict(official: dict[str, torch.Tensor], itm_match_index: int = 0) -> dict[str, torch.Tensor]:
    """Rename an official MVPTR state dict to our ``MVPTR`` keys (see the module docstring)."""
    if itm_match_index not in (0, 1):
        raise ValueError(f"itm_match_index must be 0 (pre-training file) or 1 (retrieval file), got {itm_match_index}")
    out: dict[str, torch.Tensor] = {}
    unknown, skipped = [], []
    for key, value in official.items():
        if key in _DROP_KEYS:
            continue
        if key.startswith(_SKIP_PREFIXES):
            skipped.append(key)
            continue
        ours = _EXACT.get(key) or rename_by_prefix(key, _PREFIXES)
        if ours is None:
            unknown.append(key)
            continue
        out[ours] = value
    if unknown:
        raise unknown_keys_error(unknown, "official MVPTR state_dict")
    report_skipped(skipped, "official MVPTR state_dict")
    if itm_match_index == 0:  # official pre-training: row 0 = matched; ours: row 1 = matched
        for name in ("itm_head.weight", "itm_head.bias"):
            if name in out:
                out[name] = out[name].flip(0).clone()
    if "logit_scale" in out:  # 0-d officially; ours is [1] (FSDP2 cannot shard a 0-d parameter)
        out["logit_scale"] = out["logit_scale"].reshape(1)
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None, **overrides):
    """The ``MVPTRConfig`` an official state dict fits (sizes from the shapes; BERT's LayerNorm eps 1e-12, pad 0)."""
    from vlp.blocks.text import TextConfig
    from vlp.models.mvptr import MVPTRConfig

    rows, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
    if "cls.predictions.bias" not in sd:
        raise ValueError("official MVPTR state_dict: no cls.predictions.bias (the LM head gives the word vocabulary)")
    words = sd["cls.predictions.bias"].shape[0]
    half = layer_indices(sd, "bert.txt_encoder.layer.")
    if not half:
        raise ValueError("official MVPTR state_dict: no bert.txt_encoder.layer.N keys")
    text = TextConfig(arch="bert", vocab_size=words, hidden=hidden, layers=2 * len(half),
                      heads=heads or max(1, hidden // 64),
                      intermediate=sd["bert.txt_encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position=sd["bert.embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0], ln_eps=1e-12,
                      pad_token_id=0, dropout=0.1)
    if hidden % text.heads:
        raise ValueError(f"hidden {hidden} is not divisible by {text.heads} attention heads (pass heads=)")
    kw: dict = dict(text=text, phrase_vocab_size=rows - words, box_values=False,
                    region_dim=sd["bert.img_embedding.weight"].shape[1],
                    region_layernorm="bert.LayerNorm.weight" in sd, embed_dim=sd["bert.txt_proj"].shape[1])
    kw.update(overrides)
    return MVPTRConfig(**kw)


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official file (bare, or under ``model`` / ``state_dict``), ``weights_only=True``."""
    return load_official_state_dict(path, OFFICIAL)


def load_into(model, official: dict[str, torch.Tensor], itm_match_index: int = 0) -> list[str]:
    """Load a converted official state dict into a built ``MVPTR``, checking every key and shape. Returns the module
    keys the file did not cover (they keep their init)."""
    return load_converted(model, convert_state_dict(official, itm_match_index), "official MVPTR state_dict",
                          tied=("mlm_head.decoder.weight", "mcr_head.decoder.weight"))


def convert_checkpoint(src: str | Path, heads: int | None = None, itm_match_index: int = 0):
    """An ``MVPTR`` module (eval mode) holding the weights of the official file ``src``."""
    from vlp.models.mvptr import MVPTR

    official = load_official(src)
    model = MVPTR(config_from_state_dict(official, heads))
    absent = load_into(model, official, itm_match_index)
    trunk = [k for k in absent if k.startswith(("embeddings.", "txt_encoder.", "vis_encoder.", "mul_encoder."))]
    if trunk:
        raise KeyError(f"{src}: the file lacks trunk weights {trunk[:8]}")
    return model.eval()
