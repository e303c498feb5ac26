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

The model contract (``vlp.models.base``): ``encode_image`` / ``encode_text`` return the K uni-modal layers the
bridges read, stacked as ``Encoded.states`` [B, K, tokens, width] (a retrieval cache holds K layers per item: base,
6 x 325 x 768 floats per image, ~6 MB), with the ITC embedding when the ITC heads exist; ``fuse`` runs the
cross-modal encoder (``Fused.pooled`` = ``cls_feats``); ``match_logits`` is the ITM head; the VQA head is the shared
one (``num_answers`` > 0). ``forward(pixel_values, input_ids, attention_mask) -> BridgeTowerOutput(text_feats,
image_feats, cls_feats)`` is transformers' ``BridgeTowerModel`` output, for parity tests.

Retrieval follows the official protocol (``retrieval_protocol``): with ITC heads, rank by ITC, re-rank the top-k with
ITM and take the element-wise max of the two directions (``irtr_itm_itc``); without them, ITM over all pairs. The
cosine of uni-modal [CLS] states that no objective aligned is never used to rank.

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
from torch import nn

from vlp.blocks.fusion import BRIDGE_KINDS, CoAttentionStack
from vlp.blocks.heads import ITMHead, Pooler, Projection, init_bert_weights
from vlp.blocks.text import MLMHead, TextConfig, TextEncoder, explicit_text_config
from vlp.blocks.vision import VisionConfig, VisionTower
from vlp.config import OptimConfig
from vlp.losses.contrastive import Temperature, info_nce
from vlp.data.masking import MaskingConfig
from vlp.data.visual import Visual
from vlp.losses.matching import itm_loss, itm_triplets, sample_negatives, swap_images_for_itm
from vlp.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp.models.base import (Encoded, Fused, PretrainModule, RetrievalProtocol, Step, Text, example_pixels,
                             example_text)
from vlp.utils.fsdp import stack_layers

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
    # ITM negatives: "random" (the paper's pre-training: half the pairs get a uniformly drawn image) or "local-hard"
    # (the official ITC variant, task_mlm_itm_itc_hard: 1 positive + 2 negatives per pair drawn from the ITC
    # similarities of this rank's batch; needs ITC)
    itm_negatives: str = "random"
    # local-hard only from this optimizer step on; random before (hard negatives drawn from an ITC that has not
    # learned yet are random ones in a 1 : 2 layout whose class prior ITM settles on). 0: from the start.
    hard_negatives_from_step: int = 0
    temp: float = 0.07
    num_answers: int = 0  # VQA classes (3129 for VQAv2); 0: no VQA head
    vqa_hidden_scale: int = 2  # VQA head: Linear(2H, 2H * scale), LayerNorm, GELU, Linear(2H * scale, answers)
    # ViLT/BridgeTower use transformers' collator: 15 %, 80/10/10, no special token masked, random ids from the vocab.
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(protect="special", random_tokens="vocab"))
    mlm_masked_only: bool = True  # the MLM head scores masked tokens only (same loss, less compute; one host sync)
    reuse_image_states: bool = True  # the ITM pass indexes the MLM pass's image states (in-batch negatives)
    grad_checkpointing: bool = False  # per-layer activation checkpointing in both towers and the cross stack
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0, "itc": 0.0})

    @classmethod
    def tiny(cls, **overrides) -> "BridgeTowerConfig":
        """Seconds-sized BridgeTower for tests (the model contract tests build every model's ``tiny()``): the
        defaults (32 px CLIP 2 x 64, RoBERTa 2 x 64, 2 cross layers) with the ITC heads on."""
        return cls(**{**dict(itc_embed_dim=16, loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0}), **overrides})

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
        if self.itm_negatives not in ("random", "local-hard"):
            raise ValueError(f"itm_negatives must be random or local-hard, got {self.itm_negatives!r}")
        if self.itm_negatives == "local-hard" and not self.loss_weights.get("itc", 0) > 0:
            raise ValueError("itm_negatives=local-hard draws the negatives from the ITC similarities: it needs "
                             "loss_weights.itc > 0")
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
        self.text = TextEncoder(dataclasses.replace(cfg.text, mlm_head=False, fusion_layers=0,
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
        self.build_vqa_head(cfg.num_answers, cfg.vqa_hidden_scale)
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
        text = explicit_text_config(self.cfg.text, hf, mlm_head=False)
        vision = dataclasses.replace(self.cfg.vision, pretrained=False, checkpoint=None)
        stack = self.cross_modal.text_layers[0]
        return dataclasses.replace(
            self.cfg, vision=vision, text=text, hidden=self.hidden,
            cross_heads=stack.attention.self.num_attention_heads,
            cross_intermediate=stack.intermediate.dense.out_features)

    def fsdp_blocks(self) -> list[nn.Module]:
        return stack_layers(self.vision, self.text, self.cross_modal)

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

    def cross_modal_forward(self, image_layers, text_layers, attention_mask: torch.Tensor,
                            image_mask: torch.Tensor | None = None, need_image_output: bool = True):
        """The cross-modal encoder on uni-modal states (lists from :meth:`image_layers` / :meth:`text_layers`, or
        tensors [B, K, ., D] stacked along dim 1). Returns the last layer's ``(text_feats, image_feats)``."""
        if isinstance(image_layers, torch.Tensor):
            image_layers = image_layers.unbind(1)
        if isinstance(text_layers, torch.Tensor):
            text_layers = text_layers.unbind(1)
        text_type, image_type = self.token_type_embeddings.weight
        text_in = [self.cross_modal_text_transform(t) + text_type for t in text_layers]
        image_in = [self.cross_modal_image_transform(v) + image_type for v in image_layers]
        return self.cross_modal(text_in, image_in, attention_mask, image_mask, need_image_output=need_image_output)

    def cls_feats(self, text_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cross_modal_text_pooler(text_feats), self.cross_modal_image_pooler(image_feats)], -1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> BridgeTowerOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_feats, image_feats = self.cross_modal_forward(self.image_layers(pixel_values),
                                                           self.text_layers(input_ids, attention_mask), attention_mask)
        return BridgeTowerOutput(text_feats, image_feats, self.cls_feats(text_feats, image_feats))

    # -- the contract (vlp.models.base) -------------------------------------------------------------------------------
    @property
    def has_contrastive_head(self) -> bool:
        return hasattr(self, "itc_image_head")

    @property
    def retrieval_protocol(self) -> RetrievalProtocol:
        return RetrievalProtocol("contrastive", "max") if self.has_contrastive_head else RetrievalProtocol("all_pairs",
                                                                                                          "itm")

    @property
    def pooled_dim(self) -> int:
        return 2 * self.hidden

    def encode_image(self, visual: Visual) -> Encoded:
        """The K CLIP layers that feed the bridges, [B, K, N, Dv], and the ITC embedding of the last one's CLS."""
        layers = self.image_layers(visual.require("pixels", model="BridgeTower").pixels)
        mask = torch.ones(layers[-1].shape[:2], dtype=torch.long, device=layers[-1].device)
        emb = self.itc_image_head(layers[-1][:, 0]) if self.has_contrastive_head else None
        return Encoded(torch.stack(layers, 1), mask, emb)

    def encode_text(self, text: Text) -> Encoded:
        """The K RoBERTa layers that feed the bridges, [B, K, T, Dt], and the ITC embedding of the last one's <s>."""
        layers = self.text_layers(text.input_ids, text.attention_mask)
        emb = self.itc_text_head(layers[-1][:, 0]) if self.has_contrastive_head else None
        return Encoded(torch.stack(layers, 1), text.attention_mask, emb)

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        text_feats, image_feats = self.cross_modal_forward(image.states, text.states, text.mask, image.mask)
        return Fused(text_feats, self.cls_feats(text_feats, image_feats))

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[Visual, Text]:
        return (example_pixels(self.vision.config.img_size, batch_size, seed),
                example_text(self.text.hf_config.vocab_size, batch_size, seed=seed))

    def match_logits(self, fused: Fused) -> torch.Tensor:
        return self.itm_head(fused.pooled)

    # -- pre-training --------------------------------------------------------------------------------------------------
    def pretrain_outputs(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every loss of one step and the logits behind them.

        Batch keys: ``image`` [B, 3, S, S], ``input_ids`` / ``attention_mask`` [B, T], ``mlm_input_ids`` /
        ``mlm_labels`` (the collator masks with ``masking``), optional ``image_ids`` [B] (ITM never pairs a caption with an image of
        the same id), ``itm_image_index`` / ``itm_labels`` [B] (fixed ITM pairs, e.g. for tests).
        """
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out: dict[str, torch.Tensor] = {}
        image_layers = self.image_layers(image)
        clean_text_layers = None

        if self.enabled("mlm"):
            if "mlm_input_ids" not in batch:
                raise ValueError("BridgeTower's MLM needs the batch keys mlm_input_ids / mlm_labels (the data "
                                 "collator masks with model.masking)")
            mlm_ids, labels = batch["mlm_input_ids"], batch["mlm_labels"]
            text_feats, _ = self.cross_modal_forward(image_layers, self.text_layers(mlm_ids, mask), mask,
                                                     need_image_output=False)
            if self.cfg.mlm_masked_only:
                selected = labels != IGNORE_INDEX
                logits, targets = self.mlm_head(text_feats[selected]), labels[selected]
            else:
                logits, targets = self.mlm_head(text_feats), labels
            out["mlm"] = mlm_loss(logits, targets)
            out["mlm_logits"], out["mlm_targets"] = logits, targets

        sim_i2t = None
        if self.enabled("itc"):
            clean_text_layers = self.text_layers(ids, mask)
            image_emb = self.itc_image_head(image_layers[-1][:, 0])
            text_emb = self.itc_text_head(clean_text_layers[-1][:, 0])
            temp = self.itc_temp()
            out["itc"] = (info_nce(image_emb, text_emb, temp, gather=True)
                          + info_nce(text_emb, image_emb, temp, gather=True)) / 2
            sim_i2t = (image_emb @ text_emb.T / temp).detach()  # this rank's block: what hard negatives come from

        if self.enabled("itm"):
            text_index = None
            if "itm_image_index" in batch:
                image_index, itm_labels = batch["itm_image_index"], batch["itm_labels"]
            elif self.cfg.itm_negatives == "local-hard" and self.current_step() >= self.cfg.hard_negatives_from_step:
                # the official ITC variant: each pair, a negative image for its text and a negative text for its
                # image, drawn from softmax of the ITC similarities (same-id candidates excluded)
                neg_img, neg_txt = sample_negatives(sim_i2t, sim_i2t.T, "local-hard", image_ids=batch.get("image_ids"),
                                                    generator=generator)
                image_index, text_index, itm_labels = itm_triplets(neg_img, neg_txt)
            else:
                image_index, itm_labels = swap_images_for_itm(image.shape[0], batch.get("image_ids"), generator,
                                                              device=image.device)
            if self.cfg.reuse_image_states:
                itm_image_layers = [v[image_index] for v in image_layers]
            else:
                itm_image_layers = self.image_layers(image[image_index])
            if clean_text_layers is None:
                clean_text_layers = self.text_layers(ids, mask)
            itm_text_layers, itm_mask = clean_text_layers, mask
            if text_index is not None:
                itm_text_layers, itm_mask = [t[text_index] for t in clean_text_layers], mask[text_index]
            text_feats, image_feats = self.cross_modal_forward(itm_image_layers, itm_text_layers, itm_mask)
            logits = self.itm_head(self.cls_feats(text_feats, image_feats))
            out["itm"] = itm_loss(logits, itm_labels)
            out["itm_logits"], out["itm_labels"] = logits, itm_labels
        return out

    def step(self, batch: dict) -> Step:
        out = self.pretrain_outputs(batch)
        metrics = {}
        with torch.no_grad():
            if "mlm_logits" in out and out["mlm_targets"].numel():
                sel = out["mlm_targets"] != IGNORE_INDEX
                hits = (out["mlm_logits"].argmax(-1) == out["mlm_targets"]) & sel
                metrics["mlm_acc"] = hits.sum() / sel.sum().clamp(min=1)
            if "itm_logits" in out:
                metrics["itm_acc"] = (out["itm_logits"].argmax(-1) == out["itm_labels"]).float().mean()
            if "itc" in out:
                metrics["temp"] = self.itc_temp().detach().squeeze()
        return Step({k: out[k] for k in _LOSSES if k in out}, metrics)
