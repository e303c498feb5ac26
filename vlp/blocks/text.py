"""Text tower: HF BERT / RoBERTa layers, the top ``fusion_layers`` of which cross-attend to image tokens (ALBEF/TCL's
xbert), plus an MLM head.

One stack of L transformers ``BertLayer``s. Layers ``0 .. F-1`` (F = L - fusion_layers, ``fusion_start``) are
text-only; layers ``F .. L-1`` are fusion layers: self-attention, cross-attention to the image tokens (K/V
``Linear(encoder_width -> hidden)``), FFN. Modes: ``text`` runs layers 0..F-1 on the embeddings, ``fusion`` runs
F..L-1 from given text states with image tokens, ``multimodal`` runs all. With ``fusion_layers=0`` it is a plain
BERT/RoBERTa encoder (BridgeTower's uni-modal text tower).

Parameter names (prefix-renames of the official xbert / HF ones):

    embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}.*
    encoder.layer.N.{attention, crossattention (N >= F), intermediate, output}.*
    mlm_head.{transform.dense, transform.LayerNorm, decoder, bias}      (decoder.weight tied to word embeddings)

official TCL/ALBEF ``text_encoder.bert.`` -> ``<tower>.``, ``text_encoder.cls.predictions.`` -> ``<tower>.mlm_head.``
(``cls.predictions.decoder.bias`` duplicates ``cls.predictions.bias`` and ``embeddings.position_ids`` is a constant,
non-persistent buffer here: both are dropped). HF checkpoints load by name or path with :meth:`TextTower.load_pretrained`
(``bert.``/``roberta.`` -> ``""``, ``cls.predictions.`` / ``lm_head.`` -> ``mlm_head.``).

Attention masks are additive with ``MASK_VALUE = -10000`` (the official xbert value) in the hidden states' dtype. For a
row with at least one visible key this equals HF's dtype-min masks exactly in fp32 (exp(-10000) underflows to 0);
a fully masked row gets uniform attention over its keys instead of NaN, as in the official code.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .heads import init_bert_weights

__all__ = ["TextConfig", "TextTower", "MLMHead", "MASK_VALUE", "additive_mask"]

log = logging.getLogger(__name__)

MASK_VALUE = -10000.0
_ARCHS = ("bert", "roberta")
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


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] keep-mask (1/True = attend) -> [B, 1, 1, N] additive mask (0 or ``MASK_VALUE``)."""
    if mask.dim() != 2:
        raise ValueError(f"attention mask must be [batch, length], got shape {tuple(mask.shape)}")
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


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


class MLMHead(nn.Module):
    """BERT's MLM head (``BertOnlyMLMHead`` math): ``decoder(LN(act(dense(h)))) + bias``.

    ``decoder`` has no bias of its own (HF/xbert tie ``decoder.bias`` to ``bias``; one parameter here). Tie the
    decoder weight by assigning it (``TextTower`` does when ``tie_mlm``)."""

    def __init__(self, hidden: int, vocab_size: int, ln_eps: float = 1e-12, act: str = "gelu"):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(
            BertConfig(hidden_size=hidden, vocab_size=vocab_size, layer_norm_eps=ln_eps, hidden_act=act))
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states)) + self.bias


class _LayerStack(nn.Module):
    """Holds ``layer`` (a ModuleList) so that keys read ``encoder.layer.N.*`` as in BERT."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextTower(nn.Module):
    """BERT/RoBERTa text encoder with optional top fusion layers and MLM head. ``TextTower(config)`` or
    ``TextTower(**fields)`` or both (fields override the config).

    * ``embed(input_ids, token_type_ids=None, position_ids=None) -> [B, T, H]``
    * ``forward_text(input_ids, attention_mask, token_type_ids=None, position_ids=None) -> [B, T, H]``
    * ``forward_fusion(text_hidden, attention_mask, image_tokens, image_mask=None) -> [B, T, H]``
    * ``forward(input_ids, attention_mask, image_tokens=None, image_mask=None, mode=None, ...) -> [B, T, H]``
      (mode ``text`` | ``multimodal``; None: multimodal when image tokens are given and fusion layers exist)
    * ``run_layers(hidden, attention_mask, start, end, image_tokens=None, image_mask=None, all_layers=False)``:
      any slice of the stack, optionally returning every layer's output (BridgeTower's per-layer text states)
    * ``mlm_logits(hidden) -> [B, T, vocab]``

    ``attention_mask`` / ``image_mask``: [B, T] / [B, N], 1 (or True) = attend.
    """

    def __init__(self, config: TextConfig | None = None, **fields):
        super().__init__()
        cfg = config if config is not None else TextConfig()
        cfg = dataclasses.replace(cfg, **fields) if fields else cfg
        self.config = cfg
        hf = build_hf_config(cfg)
        self.hf_config = hf
        self.arch = hf.model_type
        n_layers = hf.num_hidden_layers
        if cfg.fusion_layers > n_layers:
            raise ValueError(f"text.fusion_layers={cfg.fusion_layers} exceeds the {n_layers} layers")
        self.fusion_start = n_layers - cfg.fusion_layers
        self.hidden = hf.hidden_size
        self.encoder_width = cfg.encoder_width or hf.hidden_size

        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
        from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

        self.embeddings = (BertEmbeddings if self.arch == "bert" else RobertaEmbeddings)(hf)
        # RoBERTa's layers are BERT's layers (same modules, names and math); only the embeddings differ.
        cross_cfg = copy.deepcopy(hf)
        cross_cfg.is_decoder = True  # BertLayer only builds cross-attention for decoder configs ...
        cross_cfg.add_cross_attention = True
        layers = []
        for i in range(n_layers):
            if i < self.fusion_start:
                layers.append(BertLayer(hf, layer_idx=i))
                continue
            layer = BertLayer(cross_cfg, layer_idx=i)
            layer.attention.self.is_causal = False  # ... but our self-attention stays bidirectional
            if self.encoder_width != self.hidden:
                xattn = layer.crossattention.self
                xattn.key = nn.Linear(self.encoder_width, xattn.all_head_size)
                xattn.value = nn.Linear(self.encoder_width, xattn.all_head_size)
            layers.append(layer)
        self.encoder = _LayerStack(layers)
        self.mlm_head = MLMHead(hf.hidden_size, hf.vocab_size, hf.layer_norm_eps, hf.hidden_act) if cfg.mlm_head \
            else None
        init_bert_weights(self, hf.initializer_range)
        if self.mlm_head is not None and cfg.tie_mlm:
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.grad_checkpointing = cfg.grad_checkpointing
        if cfg.pretrained:
            self.load_pretrained(cfg.name)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

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
        mask = additive_mask(attention_mask, hidden.dtype)
        img_mask = None if image_mask is None else additive_mask(image_mask, hidden.dtype)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        outputs = []
        for i in range(start, end):
            layer = self.encoder.layer[i]
            enc = image_tokens if i >= self.fusion_start else None
            enc_mask = img_mask if i >= self.fusion_start else None
            if use_ckpt:
                hidden = checkpoint(layer, hidden, mask, enc, enc_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask, enc, enc_mask)
            outputs.append(hidden)
        return tuple(outputs) if all_layers else hidden

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
        from transformers import BertForMaskedLM, RobertaForMaskedLM

        hf_cls = BertForMaskedLM if self.arch == "bert" else RobertaForMaskedLM
        hf_model = hf_cls.from_pretrained(name_or_path)
        base = "bert." if self.arch == "bert" else "roberta."
        head_map = ({"cls.predictions.transform.": "mlm_head.transform.", "cls.predictions.": "mlm_head."}
                    if self.arch == "bert" else
                    {"lm_head.dense.": "mlm_head.transform.dense.",
                     "lm_head.layer_norm.": "mlm_head.transform.LayerNorm.", "lm_head.": "mlm_head."})
        mapped = {}
        for key, value in hf_model.state_dict().items():
            if key.startswith(base + "pooler.") or key.endswith("decoder.bias"):
                continue
            if key.startswith(base):
                mapped[key[len(base):]] = value
                continue
            if self.mlm_head is None:
                continue
            for src, dst in head_map.items():
                if key.startswith(src):
                    mapped[dst + key[len(src):]] = value
                    break
            else:
                raise KeyError(f"{name_or_path}: unexpected key {key!r}")
        own = self.state_dict()
        for key, value in mapped.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f"{name_or_path}: {key} has shape {tuple(value.shape)}, the tower expects "
                                 f"{tuple(own[key].shape)} (check the TextConfig size fields)")
        if self.config.tie_mlm and self.mlm_head is not None:
            mapped.pop("mlm_head.decoder.weight", None)  # tied: the word embeddings are loaded
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if ".crossattention." not in k
                   and not (self.config.tie_mlm and k == "mlm_head.decoder.weight")]
        if missing or unexpected:
            raise ValueError(f"{name_or_path}: missing {missing}, unexpected {unexpected}")
        del hf_model
