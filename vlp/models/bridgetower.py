"""BridgeTower: Building Bridges Between Encoders in Vision-Language Representation Learning (Xu et al., AAAI 2023).

A CLIP ViT encodes the image and a RoBERTa the caption, each with L layers. A cross-modal encoder of K co-attention
layers per stream (text stream and image stream: self-attention, cross-attention to the other stream's input of the
same layer, FFN) sits on top of them, and the top K uni-modal layers feed it, one each, through *bridge* layers.
As the official code (``microsoft/BridgeTower`` ``BTTransformer.infer``) does it, with ``T_k`` the output of text
layer k and ``V_k = ln_post(output of CLIP block k)`` (one ``ln_post`` shared by every layer):

* ``x_k = W_t T_k + e_text`` and ``v_k = W_v V_k + e_image``: one shared projection per modality
  (``cross_modal_text_transform``, ``cross_modal_image_transform``) plus a token-type embedding (0 text, 1 image);
* cross layer 1 reads ``X = LN_t(x_{L-K+1})``, ``Y = LN_v(v_{L-K+1})`` (base: layer 7 of 12);
* cross layer l = 2..K reads ``bridge(x_{L-K+l}, X_{l-1})`` and ``bridge(v_{L-K+l}, Y_{l-1})``, bridge = ``LN(x + y)``
  (layers 8..12 enter through K-1 = 5 bridges per modality);
* ``cls_feats = [tanh(W X_K[<s>]) ; tanh(W' Y_K[CLS])]`` (2H) feeds the ITM head (and the VQA head);
  the MLM head reads the text stream ``X_K``.

Bridges ``scaled_add`` / ``interpolate`` (transformers' variants) and ``none`` (METER: the top uni-modal layer feeds
cross layer 1, and cross layer l reads only cross layer l-1) are config values (``bridge``); the blocks are
``vlp.blocks.fusion``.

Pre-training (``compute_losses``), as in the official code: two passes per step, summed with weight 1,

* **MLM**: masked caption + its true image; cross-entropy over the vocabulary at masked tokens;
* **ITM**: clean caption + half of the images swapped for another image of the batch (label 0), the other half
  kept (label 1); cross-entropy of ``itm_head(cls_feats)``;
* optional **ITC** (``loss_weights.itc > 0``, off in the paper's pre-training): InfoNCE between the uni-modal CLS
  features through ``itc_*_head``, keys gathered from every rank with gradient, ``(i2t + t2i) / 2``.

Interface (DESIGN §5): ``forward(pixel_values, input_ids, attention_mask) -> BridgeTowerOutput(text_feats,
image_feats, cls_feats)``; ``match_logits(pixel_values, input_ids, attention_mask)`` -> ITM logits [B, 2]; retrieval: ``embed_images`` /
``embed_texts`` -> (normalised embedding, the per-layer uni-modal states the bridges read, [B, K, tokens, width])
and ``match_states(image_states, text_states, mask)``, as for every model; VQA: ``vqa_logits``,
``vqa_loss``. Cached retrieval states hold K layers per item (base: 6 x 325 x 768 floats per image, ~6 MB).

Where we differ from the official code, on purpose:

* ITM negatives come from the batch (``swap_images_for_itm``: never an image with the same image id) instead of an
  extra random image from the dataset, so the ITM pass re-uses the MLM pass's uni-modal image states
  (``reuse_image_states``): one ViT forward per step instead of two (the ViT has no dropout; the result is the
  same as running it again);
* the MLM head scores masked positions only (``mlm_masked_only``; the loss is the same), and the MLM pass skips the
  last image-stream cross layer, whose output nothing reads;
* the temperature and the bridges' scalars are 1-element vectors (FSDP2), excluded from weight decay by the 1-d
  rule; the official optimizer decays CLIP's LayerNorm weights and the embeddings (its no-decay list is by name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks.fusion import BRIDGE_KINDS, CoAttentionStack
from vlp.blocks.heads import ITMHead, Pooler, Projection, init_bert_weights, mlp_head
from vlp.blocks.text import MLMHead, TextConfig, TextTower
from vlp.blocks.vision import VisionConfig, VisionTower
from vlp.config import OptimConfig
from vlp.losses.contrastive import Temperature, info_nce
from vlp.losses.matching import itm_loss, swap_images_for_itm
from vlp.losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from vlp.models.base import PretrainModule

__all__ = ["BridgeTowerConfig", "BridgeTower", "BridgeTowerOutput"]

_LOSSES = ("mlm", "itm", "itc")


def _tiny_vision() -> VisionConfig:
    return VisionConfig.clip(img_size=32, patch_size=8, width=64, depth=2, heads=2)


def _tiny_text() -> TextConfig:
    return TextConfig(arch="roberta", vocab_size=100, hidden=64, layers=2, heads=2, intermediate=128, max_position=40,
                      type_vocab_size=1, ln_eps=1e-5, pad_token_id=1, dropout=0.1, fusion_layers=0, mlm_head=False)


@dataclass
class BridgeTowerConfig:
    name: str = "bridgetower"
    vision: VisionConfig = field(default_factory=_tiny_vision)  # CLIP ViT (VisionConfig.clip)
    text: TextConfig = field(default_factory=_tiny_text)  # RoBERTa; fusion_layers 0 (the MLM head lives here)
    num_cross_layers: int = 2  # K co-attention layers per stream (paper: 6); fed by the top K uni-modal layers
    hidden: Optional[int] = None  # cross-modal width H (None: the text width)
    cross_heads: Optional[int] = None  # None: the text tower's
    cross_intermediate: Optional[int] = None  # None: the text tower's
    cross_dropout: float = 0.1
    cross_ln_eps: float = 1e-12  # cross layers (official: a fresh RobertaConfig's 1e-12; transformers: text eps)
    bridge: str = "add"  # add | scaled_add | interpolate | none (METER)
    bridge_ln_eps: float = 1e-5  # bridges and the first-layer LayerNorms
    mlm_ln_eps: float = 1e-12  # the MLM head's transform LayerNorm
    attn_implementation: str = "sdpa"  # sdpa | eager, for the cross-modal layers
    itc_embed_dim: int = 256  # ITC heads are built when loss_weights.itc > 0
    temp: float = 0.07
    num_answers: int = 0  # VQA classes (3129 for VQAv2); 0: no VQA head
    vqa_hidden_scale: int = 2  # VQA head: Linear(2H, 2H * scale), LayerNorm, GELU, Linear(2H * scale, answers)
    mlm_probability: float = 0.15
    mlm_masked_only: bool = True  # the MLM head scores masked tokens only (same loss, less compute; one host sync)
    reuse_image_states: bool = True  # the ITM pass indexes the MLM pass's image states (in-batch negatives)
    grad_checkpointing: bool = False  # per-layer activation checkpointing in both towers and the cross stack
    # Special-token ids for in-model masking (when the batch brings no mlm_input_ids); null: from the tokenizer
    # (sep: not protected when null). RoBERTa: <s>=0 <pad>=1 </s>=2 <mask>=50264.
    pad_token_id: Optional[int] = 1
    cls_token_id: Optional[int] = 0
    sep_token_id: Optional[int] = 2
    mask_token_id: Optional[int] = 50264
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0, "itc": 0.0})

    def __post_init__(self):
        if self.bridge not in BRIDGE_KINDS:
            raise ValueError(f"bridge must be one of {', '.join(BRIDGE_KINDS)}, got {self.bridge!r}")
        if self.num_cross_layers < 1:
            raise ValueError(f"num_cross_layers must be >= 1, got {self.num_cross_layers}")
        if self.text.fusion_layers:
            raise ValueError("text.fusion_layers must be 0 for BridgeTower: its cross-modal layers are separate "
                             "(num_cross_layers)")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        unknown = set(self.loss_weights) - set(_LOSSES)
        if unknown:
            raise ValueError(f"loss_weights: unknown losses {sorted(unknown)}; BridgeTower has {', '.join(_LOSSES)}")


class BridgeTowerOutput(NamedTuple):
    text_feats: torch.Tensor  # [B, T, H] text stream after the last cross layer
    image_feats: torch.Tensor  # [B, N, H] image stream after the last cross layer
    cls_feats: torch.Tensor  # [B, 2H] [text pooler ; image pooler]


class BridgeTower(PretrainModule):
    def __init__(self, cfg: BridgeTowerConfig | None = None, optim: OptimConfig | None = None):
        cfg = cfg or BridgeTowerConfig()
        super().__init__(optim, cfg.loss_weights)
        self.cfg = cfg
        self.vision = VisionTower(dataclasses.replace(cfg.vision, grad_checkpointing=cfg.grad_checkpointing
                                                      or cfg.vision.grad_checkpointing))
        self.text = TextTower(dataclasses.replace(cfg.text, mlm_head=False, fusion_layers=0,
                                                  grad_checkpointing=cfg.grad_checkpointing
                                                  or cfg.text.grad_checkpointing))
        hf = self.text.hf_config
        k = cfg.num_cross_layers
        if k > min(self.text.num_layers, self.vision.depth):
            raise ValueError(f"num_cross_layers={k} exceeds the uni-modal depth (text {self.text.num_layers}, "
                             f"vision {self.vision.depth}): the top K layers of each tower feed the cross layers")
        h = cfg.hidden or self.text.hidden
        self.hidden = h

        # Cross-modal encoder: shared projections, token types, two co-attention stacks joined by bridges, poolers.
        self.cross_modal_text_transform = nn.Linear(self.text.hidden, h)
        self.cross_modal_image_transform = nn.Linear(self.vision.width, h)
        self.token_type_embeddings = nn.Embedding(2, h)
        self.cross_modal = CoAttentionStack(
            k, h, cfg.cross_heads or hf.num_attention_heads, cfg.cross_intermediate or hf.intermediate_size,
            dropout=cfg.cross_dropout, ln_eps=cfg.cross_ln_eps, bridge=cfg.bridge, bridge_eps=cfg.bridge_ln_eps,
            attn_implementation=cfg.attn_implementation, grad_checkpointing=cfg.grad_checkpointing)
        self.cross_modal_text_pooler = Pooler(h)
        self.cross_modal_image_pooler = Pooler(h)

        # Heads.
        self.mlm_head = MLMHead(h, hf.vocab_size, cfg.mlm_ln_eps)
        self.itm_head = ITMHead(2 * h)
        if self.enabled("itc"):
            self.itc_text_head = Projection(self.text.hidden, cfg.itc_embed_dim)
            self.itc_image_head = Projection(self.vision.width, cfg.itc_embed_dim)
            self.itc_temp = Temperature(cfg.temp)
        if cfg.num_answers > 0:
            self.vqa_head = mlp_head(2 * h, 2 * h * cfg.vqa_hidden_scale, cfg.num_answers)
        for module in (self.cross_modal_text_transform, self.cross_modal_image_transform, self.token_type_embeddings,
                       self.cross_modal, self.cross_modal_text_pooler, self.cross_modal_image_pooler, self.mlm_head,
                       self.itm_head, getattr(self, "itc_text_head", None), getattr(self, "itc_image_head", None),
                       getattr(self, "vqa_head", None)):
            if module is not None:
                init_bert_weights(module, 0.02)
        # The checkpoint records the architecture as built (sizes resolved, no hub name, no weight loading), so
        # vlp.models.load rebuilds it offline from the checkpoint alone.
        self.save_hyperparameters({"model": dataclasses.asdict(self.resolved_config())})

    def resolved_config(self) -> BridgeTowerConfig:
        """``cfg`` with every size made explicit and no pretrained-weight loading: what this module is."""
        hf = self.text.hf_config
        text = dataclasses.replace(
            self.cfg.text, name=None, pretrained=False, arch=self.text.arch, vocab_size=hf.vocab_size,
            hidden=hf.hidden_size, layers=hf.num_hidden_layers, heads=hf.num_attention_heads,
            intermediate=hf.intermediate_size, max_position=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size, ln_eps=hf.layer_norm_eps, pad_token_id=hf.pad_token_id,
            dropout=hf.hidden_dropout_prob, mlm_head=False)
        vision = dataclasses.replace(self.cfg.vision, pretrained=False, checkpoint=None)
        stack = self.cross_modal.text_layers[0]
        return dataclasses.replace(
            self.cfg, vision=vision, text=text, hidden=self.hidden,
            cross_heads=stack.attention.self.num_attention_heads,
            cross_intermediate=stack.intermediate.dense.out_features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in (self.vision, self.text, self.cross_modal):
            module.set_grad_checkpointing(enable)

    # -- the architecture ----------------------------------------------------------------------------------------------
    @property
    def num_bridged(self) -> int:
        """How many uni-modal layers per tower feed the cross-modal encoder (K with bridges, 1 without)."""
        return self.cross_modal.num_inputs

    def image_layers(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``ln_post`` of the CLIP blocks that feed the cross-modal encoder (blocks L-K+1 .. L; block L without
        bridges), each [B, N, Dv]; the last one's CLS is the uni-modal image feature."""
        hidden = self.vision(pixel_values).hidden_states
        return [self.vision.final_norm(h) for h in hidden[len(hidden) - self.num_bridged:]]

    def text_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the RoBERTa layers that feed the cross-modal encoder, each [B, T, Dt]."""
        hidden = self.text.run_layers(self.text.embed(input_ids), attention_mask, all_layers=True)
        return list(hidden[len(hidden) - self.num_bridged:])

    def fuse(self, image_layers, text_layers, attention_mask: torch.Tensor, need_image_output: bool = True):
        """The cross-modal encoder on uni-modal states (lists from :meth:`image_layers` / :meth:`text_layers`, or
        tensors [B, K, ., D] stacked along dim 1). Returns the last layer's ``(text_feats, image_feats)``."""
        if isinstance(image_layers, torch.Tensor):
            image_layers = image_layers.unbind(1)
        if isinstance(text_layers, torch.Tensor):
            text_layers = text_layers.unbind(1)
        text_type, image_type = self.token_type_embeddings.weight
        text_in = [self.cross_modal_text_transform(t) + text_type for t in text_layers]
        image_in = [self.cross_modal_image_transform(v) + image_type for v in image_layers]
        return self.cross_modal(text_in, image_in, attention_mask, need_image_output=need_image_output)

    def cls_feats(self, text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cross_modal_text_pooler(text_feats), self.cross_modal_image_pooler(image_feats)], -1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> BridgeTowerOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_feats, image_feats = self.fuse(self.image_layers(pixel_values),
                                            self.text_layers(input_ids, attention_mask), attention_mask)
        return BridgeTowerOutput(text_feats, image_feats, self.cls_feats(text_feats, image_feats))

    # -- the retrieval interface ---------------------------------------------------------------------------------------
    def _unimodal_embedding(self, cls: torch.Tensor, modality: str) -> torch.Tensor:
        head = getattr(self, f"itc_{modality}_head", None)
        if head is not None:
            return head(cls)
        if self.vision.width != self.text.hidden:  # no shared space: use the shared cross-modal projection
            transform = getattr(self, f"cross_modal_{modality}_transform")
            cls = transform(cls)
        return F.normalize(cls, dim=-1)

    def embed_images(self, images: torch.Tensor):
        """-> (embedding [B, E] (ITC head, else the normalised uni-modal CLS), states [B, K, N, Dv] for matching)."""
        layers = self.image_layers(images)
        return self._unimodal_embedding(layers[-1][:, 0], "image"), torch.stack(layers, 1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (embedding [B, E], states [B, K, T, Dt] for matching)."""
        layers = self.text_layers(input_ids, attention_mask)
        return self._unimodal_embedding(layers[-1][:, 0], "text"), torch.stack(layers, 1)

    def match_states(self, image_states: torch.Tensor, text_states: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] of aligned pairs from the states :meth:`embed_images` / :meth:`embed_texts` return."""
        text_feats, image_feats = self.fuse(image_states, text_states, attention_mask)
        return self.itm_head(self.cls_feats(text_feats, image_feats))

    def match_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits [B, 2] (index 1 = matched) of images [B, 3, S, S] and token ids [B, T]."""
        return self.itm_head(self(pixel_values, input_ids, attention_mask).cls_feats)

    # -- VQA -----------------------------------------------------------------------------------------------------------
    def vqa_logits(self, image: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits [B, num_answers] from ``cls_feats``."""
        if not hasattr(self, "vqa_head"):
            raise RuntimeError("this BridgeTower has no VQA head: set num_answers > 0")
        return self.vqa_head(self(image, input_ids, attention_mask).cls_feats)

    @staticmethod
    def vqa_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
        """The official VQA loss: ``BCEWithLogits(logits, soft scores)`` averaged over elements, times the number
        of answers."""
        return F.binary_cross_entropy_with_logits(logits.float(), target_scores.float()) * target_scores.shape[1]

    # -- pre-training --------------------------------------------------------------------------------------------------
    def _mlm_inputs(self, batch: dict, generator: torch.Generator | None):
        if "mlm_input_ids" in batch:
            return batch["mlm_input_ids"], batch["mlm_labels"]
        cfg = self.cfg
        missing = [n for n in ("pad_token_id", "cls_token_id", "mask_token_id") if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"the batch has no mlm_input_ids and the config leaves {missing} unset")
        vocab = self.text.hf_config.vocab_size
        if cfg.mask_token_id >= vocab:
            raise ValueError(f"mask_token_id={cfg.mask_token_id} is outside the vocabulary ({vocab}); set the "
                             f"special-token ids of your tokenizer")
        return mask_tokens(batch["input_ids"], vocab_size=vocab, mask_id=cfg.mask_token_id,
                           special_ids=[i for i in (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id)
                                        if i is not None],
                           probability=cfg.mlm_probability, generator=generator)

    def pretrain_outputs(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every loss of one step and the logits behind them.

        Batch keys: ``image`` [B, 3, S, S], ``input_ids`` / ``attention_mask`` [B, T]; optional ``mlm_input_ids`` /
        ``mlm_labels`` (masked in-model otherwise), ``image_ids`` [B] (ITM never pairs a caption with an image of
        the same id), ``itm_image_index`` / ``itm_labels`` [B] (fixed ITM pairs, e.g. for tests).
        """
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out: dict[str, torch.Tensor] = {}
        image_layers = self.image_layers(image)
        clean_text_layers = None

        if self.enabled("mlm"):
            mlm_ids, labels = self._mlm_inputs(batch, generator)
            text_feats, _ = self.fuse(image_layers, self.text_layers(mlm_ids, mask), mask, need_image_output=False)
            if self.cfg.mlm_masked_only:
                selected = labels != IGNORE_INDEX
                logits, targets = self.mlm_head(text_feats[selected]), labels[selected]
            else:
                logits, targets = self.mlm_head(text_feats), labels
            out["mlm"] = mlm_loss(logits, targets)
            out["mlm_logits"], out["mlm_targets"] = logits, targets

        if self.enabled("itm"):
            if "itm_image_index" in batch:
                index, itm_labels = batch["itm_image_index"], batch["itm_labels"]
            else:
                index, itm_labels = swap_images_for_itm(image.shape[0], batch.get("image_ids"), generator,
                                                        device=image.device)
            if self.cfg.reuse_image_states:
                itm_image_layers = [v[index] for v in image_layers]
            else:
                itm_image_layers = self.image_layers(image[index])
            clean_text_layers = self.text_layers(ids, mask)
            text_feats, image_feats = self.fuse(itm_image_layers, clean_text_layers, mask)
            logits = self.itm_head(self.cls_feats(text_feats, image_feats))
            out["itm"] = itm_loss(logits, itm_labels)
            out["itm_logits"], out["itm_labels"] = logits, itm_labels

        if self.enabled("itc"):
            if clean_text_layers is None:
                clean_text_layers = self.text_layers(ids, mask)
            image_emb = self.itc_image_head(image_layers[-1][:, 0])
            text_emb = self.itc_text_head(clean_text_layers[-1][:, 0])
            temp = self.itc_temp()
            out["itc"] = (info_nce(image_emb, text_emb, temp, gather=True)
                          + info_nce(text_emb, image_emb, temp, gather=True)) / 2
        return out

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.pretrain_outputs(batch)
        if self._trainer is not None:
            bs = batch["image"].shape[0]
            with torch.no_grad():
                if "mlm_logits" in out and out["mlm_targets"].numel():
                    sel = out["mlm_targets"] != IGNORE_INDEX
                    if bool(sel.any()):
                        acc = (out["mlm_logits"].argmax(-1)[sel] == out["mlm_targets"][sel]).float().mean()
                        self.log("train/mlm_acc", acc, batch_size=bs)
                if "itm_logits" in out:
                    acc = (out["itm_logits"].argmax(-1) == out["itm_labels"]).float().mean()
                    self.log("train/itm_acc", acc, batch_size=bs)
                if "itc" in out:
                    self.log("train/temp", self.itc_temp().detach(), batch_size=1)
        return {k: out[k] for k in _LOSSES if k in out}
