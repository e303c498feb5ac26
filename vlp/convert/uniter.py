"""Official UNITER checkpoints (``ChenRocks/UNITER``) -> a vlp ``UNITER`` checkpoint.

The official files are bare ``torch.save``\\ d state dicts (``pretrain.py``'s ``ModelSaver``: ``model_step_N.pt``;
the released ``uniter-base.pt`` / ``uniter-large.pt``; the BERT initialisations ``uniter-{base,large}-init.pt``),
read here with ``weights_only=True`` (``vlp.utils.checkpoint``: nothing in the file is executed). Keys map by prefix:

=====================================  =========================================  ==================================
official                               vlp ``UNITER``                             notes
=====================================  =========================================  ==================================
``uniter.embeddings.*``                ``embeddings.*``                           ``position_ids`` buffer dropped
``uniter.img_embeddings.*``            ``img_embeddings.*``                       ``mask_embedding`` row 0 zeroed
``uniter.encoder.layer.N.*``           ``encoder.layer.N.*``                      HF ``BertLayer`` names
``uniter.pooler.dense.*``              ``pooler.dense.*``
``cls.predictions.*``                  ``mlm_head.*``                             decoder tied to word embeddings;
                                                                                  ``decoder.bias`` = ``bias``
``feat_regress.{weight, bias, net.*}`` ``feat_regress.{weight, bias, net.*}``     weight tied to ``img_linear``
``region_classifier.net.*``            ``region_classifier.net.*``
``itm_output.*``                       ``itm_head.*``
``vqa_output.{0, 2, 3}.*``             ``vqa_head.{0, 2, 3}.*``                   fine-tuned VQA checkpoints
=====================================  =========================================  ==================================

``gamma`` / ``beta`` are renamed ``weight`` / ``bias`` (old BERT LayerNorm names; the official ``from_pretrained``
does the same). Dropped on purpose, with a warning: ``cls.seq_relationship.*`` (BERT's NSP head in the ``-init``
files) and the heads of other fine-tuning tasks (``rank_output``, ``nlvr2_output``, ...). Tied tensors
(``cls.predictions.decoder.weight``, ``feat_regress.weight``) must equal what they are tied to, else the file is not a
UNITER checkpoint. The official forward re-zeroes row 0 of ``mask_embedding`` before every masked use, so the row is
zeroed here (our embedder only ever adds row 1).

The ``UNITERConfig`` comes from the tensor shapes (``config_from_state_dict``): vocabulary, width, depth, FFN width,
positions and token types from the keys, ``region_dim`` from ``img_linear``, ``region_classes`` from the classifier
(1601 when the file has none), ``num_answers`` from a VQA head; attention heads are width / 64 unless given (UNITER
base: 12, large: 16, both 64 wide). The converted module is checked key by key and shape by shape: every official
tensor finds a home (or is dropped by a rule above), every module tensor is covered except heads the file does not
have (e.g. the region heads of an ``-init`` file), which keep their init and are reported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.convert.common import layer_indices, load_converted, load_official_state_dict, rename_by_prefix, \
    report_skipped, unknown_keys_error

__all__ = ["convert_state_dict", "config_from_state_dict", "load_official", "load_into", "convert_checkpoint"]

OFFICIAL = "an official UNITER state dict (model_step_N.pt, uniter-base.pt, uniter-base-init.pt)"

_PREFIXES = [  # official prefix -> ours; the first match wins
    ("uniter.embeddings.", "embeddings."),
    ("uniter.img_embeddings.", "img_embeddings."),
    ("uniter.encoder.", "encoder."),
    ("uniter.pooler.", "pooler."),
    ("cls.predictions.", "mlm_head."),
    ("feat_regress.", "feat_regress."),
    ("region_classifier.", "region_classifier."),
    ("itm_output.", "itm_head."),
    ("vqa_output.", "vqa_head."),
]
_DROP_KEYS = ("uniter.embeddings.position_ids", "uniter.embeddings.token_type_ids", "cls.predictions.decoder.bias")
_SKIP_PREFIXES = ("cls.seq_relationship.", "rank_output.", "nlvr2_output.", "vcr_output.", "re_output.",
                  "ve_output.", "attn1.", "attn2.", "attn_pool.")
_TIED = {"mlm_head.decoder.weight": "embeddings.word_embeddings.weight",
         "feat_regress.weight": "img_embeddings.img_linear.weight"}


def _rename_ln(key: str) -> str:
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official UNITER state dict to our ``UNITER`` keys (see the module docstring); unknown keys raise,
    known other-task heads are dropped with a warning, tied copies are checked."""
    out: dict[str, torch.Tensor] = {}
    unknown, skipped = [], []
    for key, value in official.items():
        key = _rename_ln(key)
        if key in _DROP_KEYS:
            continue
        if key.startswith(_SKIP_PREFIXES):
            skipped.append(key)
            continue
        ours = rename_by_prefix(key, _PREFIXES)
        if ours is None:
            unknown.append(key)
            continue
        out[ours] = value
    if unknown:
        raise unknown_keys_error(unknown, "official UNITER state_dict")
    report_skipped(skipped, "official UNITER state_dict")
    for tied, source in _TIED.items():
        if tied in out and source in out and not torch.equal(out[tied], out[source]):
            raise ValueError(f"official UNITER state_dict: {tied} (tied) differs from {source}; not a UNITER "
                             "checkpoint whose heads share these weights")
    mask = "img_embeddings.mask_embedding.weight"
    if mask in out:
        out[mask] = out[mask].clone()
        out[mask][0] = 0
    n_expected = len(official) - sum(1 for k in official if _rename_ln(k) in _DROP_KEYS) - len(skipped)
    if len(out) != n_expected:
        raise AssertionError(f"official UNITER state_dict: {len(out)} converted keys for {n_expected} mapped ones")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None, **overrides):
    """The ``UNITERConfig`` an official state dict fits (sizes from the shapes; BERT's LayerNorm eps 1e-12, pad 0)."""
    from vlp.blocks.text import TextConfig
    from vlp.models.uniter import UNITERConfig

    sd = {_rename_ln(k): v for k, v in sd.items()}
    pre = "uniter."
    vocab, hidden = sd[pre + "embeddings.word_embeddings.weight"].shape
    layers = layer_indices(sd, pre + "encoder.layer.")
    if not layers:
        raise ValueError("official UNITER state_dict: no uniter.encoder.layer.N keys")
    text = TextConfig(arch="bert", vocab_size=vocab, hidden=hidden, layers=len(layers),
                      heads=heads or max(1, hidden // 64),
                      intermediate=sd[pre + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position=sd[pre + "embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd[pre + "embeddings.token_type_embeddings.weight"].shape[0], ln_eps=1e-12,
                      pad_token_id=0, dropout=0.1)
    if hidden % text.heads:
        raise ValueError(f"hidden {hidden} is not divisible by {text.heads} attention heads (pass heads=)")
    kw: dict = {"text": text}
    if pre + "img_embeddings.img_linear.weight" in sd:
        kw["region_dim"] = sd[pre + "img_embeddings.img_linear.weight"].shape[1]
    if "region_classifier.net.3.weight" in sd:
        kw["region_classes"] = sd["region_classifier.net.3.weight"].shape[0]
    if "vqa_output.3.weight" in sd:
        kw["num_answers"] = sd["vqa_output.3.weight"].shape[0]
        kw["vqa_hidden_scale"] = sd["vqa_output.0.weight"].shape[0] // hidden
    kw.update(overrides)
    return UNITERConfig(**kw)


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official file (bare, or under ``model`` / ``state_dict``), ``weights_only=True``."""
    return load_official_state_dict(path, OFFICIAL)


def load_into(model, official: dict[str, torch.Tensor]) -> list[str]:
    """Load a converted official state dict into a built ``UNITER``, checking every key and shape. Returns the
    module keys the file did not cover (heads it does not have; they keep their init)."""
    converted = convert_state_dict(official)
    # tied copies that are absent are fine (the tie covers them); a whole head missing is reported
    tied = [k for k, src in _TIED.items() if src in converted]
    return load_converted(model, converted, "official UNITER state_dict", tied)


def convert_checkpoint(src: str | Path, heads: int | None = None):
    """A ``UNITER`` module (eval mode) holding the weights of the official file ``src``."""
    from vlp.models.uniter import UNITER

    official = load_official(src)
    model = UNITER(config_from_state_dict(official, heads))
    absent = load_into(model, official)
    trunk = [k for k in absent if k.startswith(("embeddings.", "encoder."))]  # -init files have no region parts
    if trunk:
        raise KeyError(f"{src}: the file lacks trunk weights {trunk[:8]}")
    return model.eval()
