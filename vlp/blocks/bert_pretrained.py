"""HF BERT/RoBERTa masked-LM weights into the parts of ``vlp.blocks.bert``, by part and with a layer offset.

The papers start their stacks from different slices of one checkpoint (ALBEF/TCL: layers 0-5 text, 6-11 fusion;
MVPTR: 0-5 text, 0-5 visual, 6-11 cross; UNITER: 0-11 single stream), so loading is per part:

* :class:`BertCheckpoint` reads a checkpoint once (``from_pretrained`` by hub name or local path; nothing else
  downloads) and splits its tensors into embeddings, layers and MLM head, in our names;
* :func:`load_bert_embeddings`, :func:`load_bert_layers` (checkpoint layers ``a .. b-1`` -> stack layers
  ``0 .. b-a-1``) and :func:`load_mlm_head` copy them into a part, after checking that every key and shape lines up.

Each loader takes a name/path or a :class:`BertCheckpoint` (pass one to load several parts from one read) and
returns what it mapped. Key renames: ``bert.``/``roberta.`` -> ``""``; ``cls.predictions.`` -> the MLM head, as do
RoBERTa's ``lm_head.{dense, layer_norm, decoder, bias}`` -> ``transform.dense``, ``transform.LayerNorm``,
``decoder``, ``bias``. Dropped: the pooler (unused) and ``decoder.bias`` (the same tensor as ``bias``).
Cross-attention is not in a BERT checkpoint: it keeps its fresh init.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import torch
from torch import nn

from .bert import ARCHS, BertStack, MLMHead

__all__ = ["BertCheckpoint", "load_bert_embeddings", "load_bert_layers", "load_mlm_head"]

log = logging.getLogger(__name__)

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # constant buffers (persistent in old saves)
_HEAD_MAPS = {
    "bert": (("cls.predictions.transform.", "transform."), ("cls.predictions.", "")),
    "roberta": (("lm_head.dense.", "transform.dense."), ("lm_head.layer_norm.", "transform.LayerNorm."),
                ("lm_head.", "")),
}


@dataclass
class BertCheckpoint:
    """The tensors of one HF BERT/RoBERTa checkpoint, split by part and named as our parts name them.

    ``embeddings``: ``{word,position,token_type}_embeddings.weight``, ``LayerNorm.*``; ``layers[i]``: layer i's
    ``attention.*``, ``intermediate.*``, ``output.*``; ``mlm_head``: ``transform.*``, ``decoder.weight``, ``bias``.
    """

    source: str
    arch: str
    embeddings: dict[str, torch.Tensor]
    layers: list[dict[str, torch.Tensor]]
    mlm_head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def load(cls, name_or_path: str | Path, arch: str | None = None) -> "BertCheckpoint":
        """Read ``name_or_path`` with transformers' ``{Bert,Roberta}ForMaskedLM.from_pretrained`` (a checkpoint
        without an MLM head gets transformers' fresh head). ``arch``: the architecture the caller needs."""
        from transformers import AutoConfig, BertForMaskedLM, RobertaForMaskedLM

        source = str(name_or_path)
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type not in ARCHS:
            raise ValueError(f"{source}: a {model_type!r} checkpoint; the BERT parts load {ARCHS}")
        if arch is not None and arch != model_type:
            raise ValueError(f"{source}: a {model_type!r} checkpoint, but the module is {arch!r}")
        hf_cls = BertForMaskedLM if model_type == "bert" else RobertaForMaskedLM
        model = hf_cls.from_pretrained(source)
        sd = {k: v.detach() for k, v in model.state_dict().items()}  # only read: the parts copy them
        del model
        return cls.from_state_dict(sd, model_type, source)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], arch: str, source: str = "<state dict>"
                        ) -> "BertCheckpoint":
        """Split a ``{Bert,Roberta}ForMaskedLM`` (or base model, prefix optional) state dict."""
        if arch not in ARCHS:
            raise ValueError(f"{source}: arch must be one of {ARCHS}, got {arch!r}")
        base = f"{arch}."
        embeddings, layers, head = {}, {}, {}
        for key, value in state_dict.items():
            name = key[len(base):] if key.startswith(base) else key
            if name.startswith("pooler.") or key.endswith("decoder.bias") or name in _BUFFERS:
                continue
            if name.startswith("embeddings."):
                embeddings[name[len("embeddings."):]] = value
                continue
            match = _LAYER.fullmatch(name)
            if match:
                layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
                continue
            for src, dst in _HEAD_MAPS[arch]:
                if key.startswith(src):
                    head[dst + key[len(src):]] = value
                    break
            else:
                raise KeyError(f"{source}: unexpected key {key!r} in a {arch} checkpoint")
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{source}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
        return cls(source, arch, embeddings, [layers[i] for i in range(len(layers))], head)


Source = Union[str, Path, BertCheckpoint]


def _checkpoint(source: Source, arch: str | None = None) -> BertCheckpoint:
    if isinstance(source, BertCheckpoint):
        if arch is not None and arch != source.arch:
            raise ValueError(f"{source.source}: a {source.arch!r} checkpoint, but the module is {arch!r}")
        return source
    return BertCheckpoint.load(source, arch)


def _check_and_load(module: nn.Module, tensors: dict[str, torch.Tensor], where: str,
                    skip: Iterable[str] = ()) -> None:
    """Load ``tensors`` into ``module`` after checking that they are exactly its keys (minus ``skip``) with its
    shapes; ``where`` names the checkpoint part in errors."""
    skip = set(skip)
    own = {k: v for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: the checkpoint lacks {missing} and has unexpected {unexpected} "
                         f"({len(tensors)} tensors for {len(own)} keys)")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the module expects "
                             f"{tuple(own[key].shape)} (check the TextConfig size fields)")
    module.load_state_dict(tensors, strict=False)


def load_bert_embeddings(embeddings: nn.Module, source: Source, extra_rows: bool = False) -> list[str]:
    """Copy the checkpoint's embeddings into ``embeddings`` (a ``BertEmbeddings``/``RobertaEmbeddings``, see
    :func:`vlp.blocks.bert.text_embeddings`). ``extra_rows=True`` allows a word table longer than the checkpoint's
    (MVPTR's words + phrases): its first rows get the checkpoint's words, the rest keep their init. Returns the
    keys loaded."""
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    arch = "roberta" if isinstance(embeddings, RobertaEmbeddings) else "bert"
    ckpt = _checkpoint(source, arch)
    tensors = dict(ckpt.embeddings)
    words = tensors.get("word_embeddings.weight")
    own_words = embeddings.word_embeddings.weight
    if extra_rows and words is not None and words.shape[0] < own_words.shape[0] and words.shape[1:] == \
            own_words.shape[1:]:
        full = own_words.detach().clone()
        full[: words.shape[0]] = words
        tensors["word_embeddings.weight"] = full
        log.info("%s: word embeddings rows 0..%d loaded, rows %d..%d keep their init", ckpt.source,
                 words.shape[0] - 1, words.shape[0], own_words.shape[0] - 1)
    _check_and_load(embeddings, tensors, f"{ckpt.source} embeddings")
    return sorted(tensors)


def load_bert_layers(stack: BertStack, source: Source, layers: Iterable[int] | None = None) -> dict[int, int]:
    """Copy checkpoint layers ``layers`` (e.g. ``range(6, 12)``; None: ``range(stack.depth)``) into ``stack``'s
    layers ``0 .. len(layers)-1``: self-attention, FFN and their LayerNorms. A cross-attending stack layer keeps its
    cross-attention init (BERT has none). Returns ``{stack layer: checkpoint layer}``."""
    ckpt = _checkpoint(source)
    wanted = list(range(stack.depth) if layers is None else layers)
    bad = [i for i in wanted if not 0 <= i < ckpt.num_layers]
    if bad:
        raise ValueError(f"{ckpt.source}: layers {bad} requested, the checkpoint has {ckpt.num_layers} layers "
                         f"(0..{ckpt.num_layers - 1})")
    if len(wanted) != stack.depth:
        raise ValueError(f"{ckpt.source}: {len(wanted)} checkpoint layers {wanted} for a stack of depth "
                         f"{stack.depth}")
    mapping = {}
    for j, i in enumerate(wanted):
        layer = stack.layer[j]
        cross = [k for k in layer.state_dict() if k.startswith("crossattention.")]
        _check_and_load(layer, ckpt.layers[i], f"{ckpt.source} layer {i} -> stack layer {j}", skip=cross)
        mapping[j] = i
    log.info("%s: checkpoint layers %s -> stack layers 0..%d", ckpt.source, wanted, stack.depth - 1)
    return mapping


def load_mlm_head(head: MLMHead, source: Source) -> list[str]:
    """Copy the checkpoint's MLM head (transform, bias, and the decoder weight unless ``head`` is tied: a tied
    decoder is the embedding table, loaded by :func:`load_bert_embeddings`). Returns the keys loaded."""
    ckpt = _checkpoint(source)
    tensors = dict(ckpt.mlm_head)
    skip = ()
    if head.tied:
        tensors.pop("decoder.weight", None)
        skip = ("decoder.weight",)
    _check_and_load(head, tensors, f"{ckpt.source} MLM head", skip=skip)
    return sorted(tensors)
