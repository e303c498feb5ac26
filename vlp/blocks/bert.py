"""BERT parts that the papers compose: text embeddings, post-LN layer stacks (plain and cross-attending), MLM head.

The papers cut BERT differently, so the parts are separate modules over any embedded sequence:

* ALBEF/TCL (``TextTower``): embeddings -> :class:`LayerStack` (text) -> :class:`CrossLayerStack` (fusion, cross-
  attending to image tokens) -> :class:`MLMHead` tied to the word embeddings;
* UNITER: [text embeddings ; region embeddings] -> one :class:`LayerStack` (single stream);
* MVPTR: text and visual :class:`LayerStack`\\ s from BERT layers 0-5, a cross :class:`LayerStack` from layers 6-11,
  and a word+phrase embedding table whose :class:`MLMHead` decodes only the word rows (:meth:`MLMHead.tie` with
  ``rows``).

Every layer is a transformers ``BertLayer`` (RoBERTa's layers are the same modules, names and math; only the
embeddings differ), so a stack's keys are ``layer.N.{attention, crossattention, intermediate, output}.*`` exactly as
in a HF checkpoint's ``encoder.`` and the official xbert; ``vlp.blocks.bert_pretrained`` loads them with a layer
offset.

Attention masks are additive with ``MASK_VALUE = -10000`` (the official xbert value) in the hidden states' dtype. For a
row with at least one visible key this equals HF's dtype-min masks exactly in fp32 (exp(-10000) underflows to 0);
a fully masked row gets uniform attention over its keys instead of NaN, as in the official code.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MASK_VALUE", "additive_mask", "text_embeddings", "bert_layer", "BertStack", "LayerStack",
           "CrossLayerStack", "MLMHead"]

MASK_VALUE = -10000.0
ARCHS = ("bert", "roberta")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] keep-mask (1/True = attend) -> [B, 1, 1, N] additive mask (0 or ``MASK_VALUE``)."""
    if mask.dim() != 2:
        raise ValueError(f"attention mask must be [batch, length], got shape {tuple(mask.shape)}")
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def text_embeddings(hf_config) -> nn.Module:
    """transformers' ``BertEmbeddings`` or ``RobertaEmbeddings`` (by ``hf_config.model_type``): word + position +
    token-type embeddings, LayerNorm, dropout. Keys ``{word,position,token_type}_embeddings.weight``, ``LayerNorm.*``
    (the position/token-type id buffers are not persistent). ``forward(input_ids [B, T], token_type_ids=None,
    position_ids=None) -> [B, T, H]``; RoBERTa derives positions from the non-pad tokens (pad + 1 + index)."""
    from transformers.models.bert.modeling_bert import BertEmbeddings
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    if hf_config.model_type not in ARCHS:
        raise ValueError(f"text embeddings: model_type must be one of {ARCHS}, got {hf_config.model_type!r}")
    return (BertEmbeddings if hf_config.model_type == "bert" else RobertaEmbeddings)(hf_config)


def bert_layer(hf_config, layer_idx: int | None = None, cross_width: int | None = None) -> nn.Module:
    """One post-LN transformers ``BertLayer``: bidirectional self-attention + FFN, and with ``cross_width`` a
    cross-attention between them whose K/V read ``cross_width``-wide encoder tokens (``Linear(cross_width ->
    hidden)``; query and output stay ``hidden`` wide). ``hf_config`` is used as is for a plain layer of an encoder
    config (``vlp.blocks.text.build_hf_config`` makes one), otherwise copied with the decoder switches set and, when
    the config names no attention implementation, PyTorch's SDPA."""
    from transformers.models.bert.modeling_bert import BertLayer

    if hf_config._attn_implementation is None:  # a bare BertConfig(...): the layers would warn and run eager
        hf_config = copy.deepcopy(hf_config)
        hf_config._attn_implementation = "sdpa"
    if cross_width is None:
        if hf_config.is_decoder or hf_config.add_cross_attention:
            hf_config = copy.deepcopy(hf_config)
            hf_config.is_decoder = hf_config.add_cross_attention = False
        return BertLayer(hf_config, layer_idx=layer_idx)
    cross_cfg = copy.deepcopy(hf_config)
    cross_cfg.is_decoder = True  # BertLayer only builds cross-attention for decoder configs ...
    cross_cfg.add_cross_attention = True
    layer = BertLayer(cross_cfg, layer_idx=layer_idx)
    layer.attention.self.is_causal = False  # ... but our self-attention stays bidirectional
    if cross_width != hf_config.hidden_size:
        xattn = layer.crossattention.self
        xattn.key = nn.Linear(cross_width, xattn.all_head_size)
        xattn.value = nn.Linear(cross_width, xattn.all_head_size)
    return layer


def _has_cross(layer: nn.Module) -> bool:
    return hasattr(layer, "crossattention")


class BertStack(nn.Module):
    """A sequence of ``BertLayer``\\ s (keys ``layer.N.*``), some of which may cross-attend to encoder tokens.

    :meth:`run` is the one loop every stack shares: the [B, L] keep-masks become additive masks once, each layer
    runs under activation checkpointing when ``grad_checkpointing`` is on in training with grad enabled, and
    ``all_layers`` returns every layer's output. :class:`LayerStack` and :class:`CrossLayerStack` build their layers
    and give ``forward`` its signature; :meth:`concat` joins stacks into one numbering (``TextTower``'s
    ``encoder.layer.N``: text layers then fusion layers).
    """

    def __init__(self, layers: Iterable[nn.Module], grad_checkpointing: bool = False):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.grad_checkpointing = grad_checkpointing

    @staticmethod
    def concat(*stacks: "BertStack", grad_checkpointing: bool | None = None) -> "BertStack":
        """One stack of the stacks' layers in order (the same modules, renumbered from 0)."""
        layers = [layer for stack in stacks for layer in stack.layer]
        if grad_checkpointing is None:
            grad_checkpointing = any(stack.grad_checkpointing for stack in stacks)
        return BertStack(layers, grad_checkpointing)

    @property
    def depth(self) -> int:
        return len(self.layer)

    @property
    def cross_layers(self) -> list[int]:
        """Indices of the layers that cross-attend."""
        return [i for i, layer in enumerate(self.layer) if _has_cross(layer)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run(self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int = 0, end: int | None = None,
            encoder_tokens: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
            all_layers: bool = False):
        """Layers ``start .. end-1`` on ``hidden`` [B, L, H] with keep-mask ``mask`` [B, L] (None: all visible).
        Cross-attending layers read ``encoder_tokens`` [B, N, D] under ``encoder_mask`` [B, N]; the others ignore
        them. Returns the last output [B, L, H] (``hidden`` itself for an empty slice), or with ``all_layers`` the
        tuple of every layer's output."""
        end = self.depth if end is None else end
        if not 0 <= start <= end <= self.depth:
            raise ValueError(f"layer slice {start}:{end} outside 0:{self.depth}")
        if encoder_tokens is None:
            needs = [i for i in self.cross_layers if start <= i < end]
            if needs:
                raise ValueError(f"layers {needs[0]}..{needs[-1]} cross-attend: pass encoder_tokens")
        add_mask = None if mask is None else additive_mask(mask, hidden.dtype)
        enc_mask = None if encoder_mask is None else additive_mask(encoder_mask, hidden.dtype)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        outputs = []
        for i in range(start, end):
            layer = self.layer[i]
            cross = _has_cross(layer)
            enc = encoder_tokens if cross else None
            enc_m = enc_mask if cross else None
            if use_ckpt:
                hidden = checkpoint(layer, hidden, add_mask, enc, enc_m, use_reentrant=False)
            else:
                hidden = layer(hidden, add_mask, enc, enc_m)
            outputs.append(hidden)
        return tuple(outputs) if all_layers else hidden

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                encoder_tokens: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                all_layers: bool = False, start: int = 0, end: int | None = None):
        return self.run(hidden, mask, start, end, encoder_tokens, encoder_mask, all_layers)


class LayerStack(BertStack):
    """``num_layers`` plain post-LN BERT layers (self-attention + FFN) over any embedded sequence: words, regions, or
    their concatenation (UNITER's single stream, MVPTR's three stacks).

    ``forward(hidden [B, L, H], mask [B, L] | None, all_layers=False, start=0, end=None) -> [B, L, H]`` (or the
    tuple of every layer's output). ``layer_offset`` only numbers the layers' ``layer_idx`` (transformers' cache
    bookkeeping, unused here); load weights with ``vlp.blocks.bert_pretrained.load_bert_layers``.
    """

    def __init__(self, hf_config, num_layers: int, grad_checkpointing: bool = False, layer_offset: int = 0):
        if num_layers < 0:
            raise ValueError(f"LayerStack: num_layers must be >= 0, got {num_layers}")
        super().__init__([bert_layer(hf_config, layer_offset + i) for i in range(num_layers)], grad_checkpointing)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, all_layers: bool = False,
                start: int = 0, end: int | None = None):
        return self.run(hidden, mask, start, end, all_layers=all_layers)


class CrossLayerStack(BertStack):
    """``num_layers`` ALBEF/xbert fusion layers: self-attention, cross-attention to encoder tokens (K/V
    ``Linear(encoder_width -> hidden)``), FFN, each post-LN.

    ``forward(hidden [B, L, H], mask [B, L] | None, encoder_tokens [B, N, encoder_width], encoder_mask [B, N] | None,
    all_layers=False, start=0, end=None) -> [B, L, H]``.
    """

    def __init__(self, hf_config, num_layers: int, encoder_width: int | None = None,
                 grad_checkpointing: bool = False, layer_offset: int = 0):
        if num_layers < 0:
            raise ValueError(f"CrossLayerStack: num_layers must be >= 0, got {num_layers}")
        self.encoder_width = encoder_width or hf_config.hidden_size
        layers = [bert_layer(hf_config, layer_offset + i, cross_width=self.encoder_width) for i in range(num_layers)]
        super().__init__(layers, grad_checkpointing)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, encoder_tokens: torch.Tensor,
                encoder_mask: torch.Tensor | None = None, all_layers: bool = False, start: int = 0,
                end: int | None = None):
        if encoder_tokens.shape[-1] != self.encoder_width:
            raise ValueError(f"encoder tokens are {encoder_tokens.shape[-1]} wide, the cross layers expect "
                             f"encoder_width={self.encoder_width}")
        return self.run(hidden, mask, start, end, encoder_tokens, encoder_mask, all_layers)


class MLMHead(nn.Module):
    """BERT's MLM head (``BertOnlyMLMHead`` math): ``decoder(LN(act(dense(h)))) + bias`` over ``vocab_size`` rows.

    ``forward(hidden [..., H]) -> [..., vocab_size]``. Keys ``bias``, ``transform.{dense, LayerNorm}.*``,
    ``decoder.weight``; ``decoder`` has no bias of its own (HF/xbert tie ``decoder.bias`` to ``bias``; one parameter
    here). :meth:`tie` makes the decoder weight an embedding table (BERT/ALBEF), or a table whose first
    ``vocab_size`` rows are the decoded vocabulary (MVPTR: word rows, then phrase rows that are never predicted).
    """

    def __init__(self, hidden: int, vocab_size: int, ln_eps: float = 1e-12, act: str = "gelu"):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.vocab_size = vocab_size
        self.transform = BertPredictionHeadTransform(
            BertConfig(hidden_size=hidden, vocab_size=vocab_size, layer_norm_eps=ln_eps, hidden_act=act))
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def tied(self) -> bool:
        """Whether the decoder weight is an embedding table set by :meth:`tie` (not a weight of its own)."""
        return getattr(self, "_tied", False)

    def tie(self, table: nn.Embedding | nn.Parameter, rows: int | None = None) -> None:
        """Decode with ``table``'s weight [R, H] itself (same Parameter, so the same storage and gradient).

        ``rows=None``: the table must have exactly ``vocab_size`` rows. ``rows``: decode rows ``[0, rows)`` only
        (``rows`` must equal ``vocab_size`` and be <= R); the decoder weight is then the whole table and the
        logits are ``vocab_size`` wide."""
        weight = table.weight if isinstance(table, nn.Embedding) else table
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(f"MLMHead.tie: expected an nn.Embedding or a 2-D Parameter, got {type(table).__name__}")
        n_rows, width = weight.shape
        if width != self.decoder.in_features:
            raise ValueError(f"MLMHead.tie: the table is {width} wide, the head {self.decoder.in_features}")
        if rows is None and n_rows != self.vocab_size:
            raise ValueError(f"MLMHead.tie: the table has {n_rows} rows, the head decodes vocab_size="
                             f"{self.vocab_size}; pass rows={self.vocab_size} to decode the first rows only")
        if rows is not None and (rows != self.vocab_size or rows > n_rows):
            raise ValueError(f"MLMHead.tie: rows={rows} must equal vocab_size={self.vocab_size} and be <= the "
                             f"table's {n_rows} rows")
        self.decoder.weight = weight
        self._tied = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.decoder.weight
        if weight.shape[0] != self.vocab_size:
            weight = weight[: self.vocab_size]  # [V, H] view of a tied word+phrase table
        return F.linear(self.transform(hidden_states), weight) + self.bias
