"""Text towers composed from the BERT parts of ``vlp.blocks.bert``: :class:`TextEncoder` (embeddings + a plain
BERT/RoBERTa layer stack) and :class:`TextTower` (ALBEF/TCL's xbert: the top ``fusion_layers`` layers cross-attend
to image tokens, plus an MLM head).

``TextTower`` = :func:`~vlp.blocks.bert.text_embeddings` -> :class:`~vlp.blocks.bert.LayerStack` (layers
``0 .. F-1``, F = L - fusion_layers = ``fusion_start``) -> :class:`~vlp.blocks.bert.CrossLayerStack` (layers
``F .. L-1``: self-attention, cross-attention to the image tokens with K/V ``Linear(encoder_width -> hidden)``,
FFN) -> :class:`~vlp.blocks.bert.MLMHead`. The two stacks are joined into one numbering (``encoder.layer.N``) so
that the keys stay those of the official xbert. Modes: ``text`` runs layers 0..F-1 on the embeddings, ``fusion``
runs F..L-1 from given text states with image tokens, ``multimodal`` runs all. :class:`TextEncoder` is the
text-only tower (BridgeTower's uni-modal RoBERTa): the same keys, no cross layers, no MLM head.

Parameter names (prefix-renames of the official xbert / HF ones):

    embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}.*
    encoder.layer.N.{attention, crossattention (N >= F), intermediate, output}.*
    mlm_head.{transform.dense, transform.LayerNorm, decoder, bias}      (decoder.weight tied to word embeddings)

official TCL/ALBEF ``text_encoder.bert.`` -> ``<tower>.``, ``text_encoder.cls.predictions.`` -> ``<tower>.mlm_head.``
(``cls.predictions.decoder.bias`` duplicates ``cls.predictions.bias`` and ``embeddings.position_ids`` is a constant,
non-persistent buffer here: both are dropped). HF checkpoints load by name or path with ``load_pretrained``, built on
``vlp.blocks.bert_pretrained`` (``bert.``/``roberta.`` -> ``""``, ``cls.predictions.`` / ``lm_head.`` ->
``mlm_head.``); its ``load_bert_layers`` loads any slice of a checkpoint's layers into a stack.

Attention masks are additive (``MASK_VALUE`` = -10000, :func:`additive_mask`; see ``vlp.blocks.bert``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .bert import ARCHS as _ARCHS
from .bert import MASK_VALUE, BertStack, CrossLayerStack, LayerStack, MLMHead, additive_mask, text_embeddings
from .bert_pretrained import BertCheckpoint, load_bert_embeddings, load_bert_layers, load_mlm_head
from .heads import init_bert_weights

__all__ = ["TextConfig", "TextEncoder", "TextTower", "MLMHead", "MASK_VALUE", "additive_mask", "build_hf_config"]

log = logging.getLogger(__name__)

MODES = ("text", "fusion", "multimodal")


@dataclass
class TextConfig:
    """Configuration of :class:`TextTower` (one field per constructor argument).

    Architecture fields left ``None`` come from ``name``'s HF config, or, with ``name=None``, from the defaults of
    transformers' ``BertConfig``/``RobertaConfig`` (BERT-base sizes).
    """

    name: Optional[str] = None  # HF model name or local path (config, and weights when pretrained=True)
    arch: Optional[str] = None  # bert | roberta; None: name's model_type, else bert
    pretrained: bool = False
    vocab_size: Optional[int] = None
    hidden: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    intermediate: Optional[int] = None
    max_position: Optional[int] = None
    type_vocab_size: Optional[int] = None
    ln_eps: Optional[float] = None
    pad_token_id: Optional[int] = None
    dropout: Optional[float] = None  # hidden and attention-probability dropout
    # Std of the normal init (HF initializer_range; BERT: 0.02). Narrow towers trained from scratch want ~1/sqrt(width):
    # at 0.02 a 128-wide tower starts with near-uniform attention and input-independent [CLS] states.
    init_std: Optional[float] = None
    # K: the LAST K layers cross-attend to image tokens. xbert's `fusion_layer` is the START index F instead:
    # fusion_layers = num_hidden_layers - fusion_layer (ALBEF/TCL base: 12 - 6 = 6).
    fusion_layers: int = 0
    encoder_width: Optional[int] = None  # width of the image tokens (None: hidden)
    mlm_head: bool = True
    tie_mlm: bool = True  # MLM decoder weight = word embeddings (BERT/ALBEF); False: own weight (BridgeTower-like)
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.arch is not None and self.arch not in _ARCHS:
            raise ValueError(f"text.arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.pretrained and not self.name:
            raise ValueError("text: pretrained=True needs name (an HF model name or a local path)")
        if self.fusion_layers < 0:
            raise ValueError(f"text.fusion_layers must be >= 0, got {self.fusion_layers}")

    @classmethod
    def tiny(cls, **overrides) -> "TextConfig":
        """BERT hidden 64, 4 layers (2 text-only + 2 fusion), 4 heads, FFN 128, vocab 100: tcl_tiny's xbert."""
        base = dict(arch="bert", vocab_size=100, hidden=64, layers=4, heads=4, intermediate=128, max_position=64,
                    type_vocab_size=2, ln_eps=1e-12, pad_token_id=0, dropout=0.1, fusion_layers=2, encoder_width=64)
        return cls(**{**base, **overrides})

    @classmethod
    def base(cls, **overrides) -> "TextConfig":
        """ALBEF/TCL's xbert: bert-base-uncased, layers 6..11 fusion, image tokens 768 wide."""
        return cls(**{**dict(name="bert-base-uncased", pretrained=True, fusion_layers=6, encoder_width=768),
                      **overrides})


def build_hf_config(cfg: TextConfig):
    """The transformers config (``BertConfig``/``RobertaConfig``) of the tower: ``name``'s or the class default,
    with ``cfg``'s non-None architecture fields applied; always an encoder (no decoder, no cross-attention)."""
    from transformers import AutoConfig, BertConfig, RobertaConfig

    if cfg.name:
        hf = AutoConfig.from_pretrained(cfg.name)
        if hf.model_type not in _ARCHS:
            raise ValueError(f"text.name {cfg.name!r} is a {hf.model_type!r} model; TextTower supports {_ARCHS}")
        if cfg.arch is not None and cfg.arch != hf.model_type:
            raise ValueError(f"text.arch={cfg.arch!r} but {cfg.name!r} is a {hf.model_type!r} model")
    else:
        hf = {"bert": BertConfig, "roberta": RobertaConfig}[cfg.arch or "bert"]()
    fields = dict(vocab_size="vocab_size", hidden="hidden_size", layers="num_hidden_layers",
                  heads="num_attention_heads", intermediate="intermediate_size", max_position="max_position_embeddings",
                  type_vocab_size="type_vocab_size", ln_eps="layer_norm_eps", pad_token_id="pad_token_id")
    for ours, theirs in fields.items():
        value = getattr(cfg, ours)
        if value is not None:
            setattr(hf, theirs, value)
    if cfg.dropout is not None:
        hf.hidden_dropout_prob = hf.attention_probs_dropout_prob = cfg.dropout
    if cfg.init_std is not None:
        hf.initializer_range = cfg.init_std
    hf.is_decoder = False
    hf.add_cross_attention = False
    hf._attn_implementation = "sdpa"
    return hf


def explicit_text_config(cfg: TextConfig, hf, **changes) -> TextConfig:
    """``cfg`` with every size taken from the built ``hf`` config and no hub name or weight loading: what a built
    tower is, so that ``vlp.models.load`` rebuilds it offline from a checkpoint's hyper-parameters alone."""
    import dataclasses

    return dataclasses.replace(
        cfg, name=None, pretrained=False, arch=hf.model_type, vocab_size=hf.vocab_size, hidden=hf.hidden_size,
        layers=hf.num_hidden_layers, heads=hf.num_attention_heads, intermediate=hf.intermediate_size,
        max_position=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size, ln_eps=hf.layer_norm_eps,
        pad_token_id=hf.pad_token_id, dropout=hf.hidden_dropout_prob, **changes)


def _resolve_config(config: TextConfig | None, fields: dict) -> TextConfig:
    cfg = config if config is not None else TextConfig()
    return dataclasses.replace(cfg, **fields) if fields else cfg


class _TextStates(nn.Module):
    """What both towers share: ``embeddings`` + ``encoder`` (a :class:`~vlp.blocks.bert.BertStack`), their sizes,
    activation checkpointing, and loading embeddings + every layer from one HF checkpoint."""

    config: TextConfig
    hf_config: object
    arch: str
    embeddings: nn.Module
    encoder: BertStack

    @property
    def num_layers(self) -> int:
        return self.encoder.depth

    @property
    def hidden(self) -> int:
        return self.hf_config.hidden_size

    @property
    def grad_checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, T, H] embeddings (word + position + token type, LayerNorm, dropout)."""
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def _load_checkpoint(self, name_or_path: str) -> BertCheckpoint:
        """Read ``name_or_path`` and load its embeddings and layers 0..L-1; returns the checkpoint for the heads."""
        ckpt = BertCheckpoint.load(name_or_path, arch=self.arch)
        if ckpt.num_layers != self.num_layers:
            raise ValueError(f"{name_or_path}: the checkpoint has {ckpt.num_layers} layers, the tower "
                             f"{self.num_layers} (text.layers); load a slice with "
                             f"vlp.blocks.bert_pretrained.load_bert_layers(stack, path, layers=range(a, b))")
        load_bert_embeddings(self.embeddings, ckpt)
        load_bert_layers(self.encoder, ckpt, range(self.num_layers))
        return ckpt


class TextEncoder(_TextStates):
    """Text-only BERT/RoBERTa encoder: embeddings + one plain :class:`~vlp.blocks.bert.LayerStack` (BridgeTower's
    uni-modal text tower). Keys ``embeddings.*``, ``encoder.layer.N.*`` as :class:`TextTower`'s; no cross layers, no
    MLM head (``TextConfig.mlm_head`` / ``tie_mlm`` / ``encoder_width`` are not used; ``fusion_layers`` must be 0).

    * ``embed(input_ids, token_type_ids=None, position_ids=None) -> [B, T, H]``
    * ``run_layers(hidden, attention_mask, start=0, end=None, all_layers=False)``: a slice of the stack, or with
      ``all_layers`` the tuple of every layer's output [B, T, H]
    * ``forward(input_ids, attention_mask, token_type_ids=None, position_ids=None) -> [B, T, H]`` (= ``forward_text``)
    """

    def __init__(self, config: TextConfig | None = None, **fields):
        super().__init__()
        cfg = _resolve_config(config, fields)
        if cfg.fusion_layers:
            raise ValueError(f"text.fusion_layers={cfg.fusion_layers}: TextEncoder has no fusion layers "
                             f"(use TextTower, or set fusion_layers=0)")
        self.config = cfg
        hf = build_hf_config(cfg)
        self.hf_config = hf
        self.arch = hf.model_type
        self.embeddings = text_embeddings(hf)
        self.encoder = LayerStack(hf, hf.num_hidden_layers, grad_checkpointing=cfg.grad_checkpointing)
        init_bert_weights(self, hf.initializer_range)
        if cfg.pretrained:
            self.load_pretrained(cfg.name)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0, end: int | None = None,
                   all_layers: bool = False):
        """Layers ``start .. end-1`` on ``hidden`` [B, T, H]; the last output or every layer's (``all_layers``)."""
        return self.encoder(hidden, attention_mask, all_layers=all_layers, start=start, end=end)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.run_layers(self.embed(input_ids, token_type_ids, position_ids), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_text(input_ids, attention_mask, token_type_ids, position_ids)

    def load_pretrained(self, name_or_path: str) -> None:
        """Load HF BERT/RoBERTa weights by hub name or local path into the embeddings and every layer (the
        checkpoint's MLM head, if any, is not used)."""
        self._load_checkpoint(name_or_path)


class TextTower(_TextStates):
    """BERT/RoBERTa text encoder with optional top fusion layers and MLM head. ``TextTower(config)`` or
    ``TextTower(**fields)`` or both (fields override the config).

    * ``embed(input_ids, token_type_ids=None, position_ids=None) -> [B, T, H]``
    * ``forward_text(input_ids, attention_mask, token_type_ids=None, position_ids=None) -> [B, T, H]``
    * ``forward_fusion(text_hidden, attention_mask, image_tokens, image_mask=None) -> [B, T, H]``
    * ``forward(input_ids, attention_mask, image_tokens=None, image_mask=None, mode=None, ...) -> [B, T, H]``
      (mode ``text`` | ``multimodal``; None: multimodal when image tokens are given and fusion layers exist)
    * ``run_layers(hidden, attention_mask, start, end, image_tokens=None, image_mask=None, all_layers=False)``:
      any slice of the stack, optionally returning every layer's output
    * ``mlm_logits(hidden) -> [B, T, vocab]``

    ``attention_mask`` / ``image_mask``: [B, T] / [B, N], 1 (or True) = attend.
    """

    def __init__(self, config: TextConfig | None = None, **fields):
        super().__init__()
        cfg = _resolve_config(config, fields)
        self.config = cfg
        hf = build_hf_config(cfg)
        self.hf_config = hf
        self.arch = hf.model_type
        n_layers = hf.num_hidden_layers
        if cfg.fusion_layers > n_layers:
            raise ValueError(f"text.fusion_layers={cfg.fusion_layers} exceeds the {n_layers} layers")
        self.fusion_start = n_layers - cfg.fusion_layers
        self.encoder_width = cfg.encoder_width or hf.hidden_size

        # Construction order (embeddings, text layers, fusion layers, head) fixes the init's random stream.
        self.embeddings = text_embeddings(hf)
        text = LayerStack(hf, self.fusion_start)
        fusion = CrossLayerStack(hf, cfg.fusion_layers, self.encoder_width, layer_offset=self.fusion_start)
        self.encoder = BertStack.concat(text, fusion, grad_checkpointing=cfg.grad_checkpointing)
        self.mlm_head = MLMHead(hf.hidden_size, hf.vocab_size, hf.layer_norm_eps, hf.hidden_act) if cfg.mlm_head \
            else None
        init_bert_weights(self, hf.initializer_range)
        if self.mlm_head is not None and cfg.tie_mlm:
            self.mlm_head.tie(self.embeddings.word_embeddings)
        if cfg.pretrained:
            self.load_pretrained(cfg.name)

    # ---------------------------------------------------------------------------------------------------------------
    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0, end: int | None = None,
                   image_tokens: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                   all_layers: bool = False):
        """Layers ``start .. end-1`` on ``hidden``. Fusion layers in the slice need ``image_tokens``; text-only
        layers ignore them. Returns the last output, or with ``all_layers`` the tuple of every layer's output."""
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer slice {start}:{end} outside 0:{self.num_layers}")
        if image_tokens is None and end > self.fusion_start and start < end:
            raise ValueError(f"layers {max(start, self.fusion_start)}..{end - 1} are fusion layers: pass image_tokens")
        if image_tokens is not None and image_tokens.shape[-1] != self.encoder_width:
            raise ValueError(f"image tokens are {image_tokens.shape[-1]} wide, the fusion layers expect "
                             f"encoder_width={self.encoder_width}")
        return self.encoder.run(hidden, attention_mask, start, end, image_tokens, image_mask, all_layers)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only layers ``0 .. fusion_start-1`` on the embeddings (xbert ``mode='text'``)."""
        hidden = self.embed(input_ids, token_type_ids, position_ids)
        return self.run_layers(hidden, attention_mask, 0, self.fusion_start)

    def forward_fusion(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
                       image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers ``fusion_start .. L-1`` from text states (xbert ``mode='fusion'``)."""
        if self.fusion_start == self.num_layers:
            raise RuntimeError("this TextTower has no fusion layers (fusion_layers=0)")
        return self.run_layers(text_hidden, attention_mask, self.fusion_start, self.num_layers, image_tokens,
                               image_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, mode: str | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if mode == "multi_modal":  # the official spelling
            mode = "multimodal"
        if mode is None:
            mode = "multimodal" if image_tokens is not None and self.fusion_start < self.num_layers else "text"
        if mode == "text":
            return self.forward_text(input_ids, attention_mask, token_type_ids, position_ids)
        if mode == "multimodal":
            if image_tokens is None:
                raise ValueError("mode='multimodal' needs image_tokens")
            text = self.forward_text(input_ids, attention_mask, token_type_ids, position_ids)
            return self.forward_fusion(text, attention_mask, image_tokens, image_mask)
        if mode == "fusion":
            raise ValueError("mode='fusion' starts from text states: call forward_fusion(text_hidden, ...)")
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mlm_head is None:
            raise RuntimeError("this TextTower was built without an MLM head (mlm_head=False)")
        return self.mlm_head(hidden)

    # ---------------------------------------------------------------------------------------------------------------
    def load_pretrained(self, name_or_path: str) -> None:
        """Load HF BERT/RoBERTa (masked-LM) weights by hub name or local path into the embeddings, all layers'
        self-attention and FFN, and the MLM head. Cross-attention keeps its fresh N(0, initializer_range) init (it
        is not in the checkpoint). A checkpoint without an MLM head gets transformers' fresh head."""
        ckpt = self._load_checkpoint(name_or_path)
        if self.mlm_head is not None:
            load_mlm_head(self.mlm_head, ckpt)
