"""MVPTR: Multi-level Semantic Alignment for Vision-Language Pre-Training (Li et al., ACM MM 2022).

Architecture, as the official code (``Junction4Nako/mvp_pytorch`` at c401680, ``oscar/modeling/modeling_vlbert.py``,
``BiBertImgModel`` / ``BiBertImgForPreTraining``):

* **Concepts on both sides.** The text is ``[CLS] words phrases [SEP]``: each phrase (an object, object-attribute
  or subject-relation-object tuple of the caption) is one token, a row of the word table after the tokenizer's
  words (``vlp.data.concepts``: vocabulary, insertion, corruption). The visual side starts with the image's object
  tags, ``[CLS] tags [SEP]``, embedded by the same embeddings (token type 1, positions from 0 again).
* **Stage 1, uni-modal.** ``txt_encoder`` over the text; ``vis_encoder`` over ``[tags ; regions]``, a region being
  ``Dropout(LN(W [feature || x1, y1, x2, y2, w, h] + b))`` (:class:`~vlp.blocks.regions.ConcatRegionEmbedder`,
  no position or type embedding). Three independent post-LN BERT stacks of ``text.layers // 2`` layers each.
* **Stage 2, cross-modal.** ``mul_encoder`` over ``[text states ; region states]``: the tags and the visual
  [CLS] are dropped after stage 1. Pooled = BERT pooler on the text [CLS] of the joint sequence.
* **Heads.** MLM (``mlm_head``, the official ``cls.predictions``) and MCR (``mcr_head``, ``half_mlm``): BERT LM heads
  decoding only the word rows of the word+phrase table; ITM (``itm_head``: Linear(H, 2) on the pooler, 1 = matched:
  the converter swaps the official pre-training rows, where 0 = matched); VSC projections ``txt_proj`` /
  ``vis_proj`` (raw [H, E] matrices, ``x @ P``, no bias) and a learnable ``logit_scale`` (init ln(1/0.07), not
  clamped unless ``logit_scale_max`` is set); VQA: the shared head on the cross-modal [CLS] state (not the pooler).

Pre-training computes all five losses in ONE forward over the corrupted inputs (words masked, phrases corrupted,
tags masked: the collator) and sums them, weight 1 each (``loss_weights``):

=====  =======================================================================================================
mcr    masked concept (tag) recovery: CE at the masked tags of the visual encoder's output (``mcr_head``)
vsc    visual-semantic contrast: symmetric InfoNCE of ``norm(txt_cls @ txt_proj)`` and ``norm(vis_cls @ vis_proj)``
       at ``exp(logit_scale)``, this rank's batch (``vsc_gather``: keys from every rank, with gradient)
itm    the B positives and B hardest in-batch negatives (:func:`~vlp.losses.matching.hardest_negatives`: half
       text-anchored, half image-anchored, by a random permutation), only the cross-modal encoder re-run on the
       stage-1 states; CE over 2B pairs
mlm    CE at the masked words of the positive pairs' cross-modal text states (``mlm_head``)
wpg    weakly-supervised phrase grounding (``vlp.losses.grounding``) on the positive pairs' cross-modal states
=====  =======================================================================================================

Random draws in the model (the ITM permutation, WPG's negative images and top-3 picks) come from
:meth:`~vlp.models.base.PretrainModule.step_generator` ``("mvptr-draws", draw_seed)``: a pure function of (seed,
step, rank, call), so a resumed run draws what the uninterrupted one did. A batch may bring them instead
(``itm_order`` [B], ``wpg_neg_image`` [B], ``wpg_pick_pos`` / ``wpg_pick_neg`` [B, P] as top-k indices: the
official-parity replay).

Where we differ from the official code, on purpose:

* WPG is vectorised with padding masks, and an image with fewer than 3 regions picks among the ones it has (the
  official ``topk(3)`` fails on it); the negative image of a text is uniform over the *other* rows as officially,
  and a batch of one sample has no WPG term;
* a hardest negative never shares the anchor's ``image_id`` when the batch carries image ids (a second caption of
  the same image is not a negative); the official ``S - 2I`` argmax only excludes the pair itself;
* the text is ``[CLS] words phrases [SEP]`` padded to the batch's longest, and tags to the batch's most tags
  (official: fixed lengths); padded positions are masked, so the real tokens' outputs are the same;
* initialisation from a BERT checkpoint (``text.name``): txt and vis stacks from layers 0 .. L/2-1, the cross-modal
  stack from layers L/2 .. L-1 (the official script loads a prepared checkpoint whose origin the code does not
  say; this is the ALBEF-style split the paper's "two stages of 6 layers" suggests), both LM heads from BERT's
  MLM head, the pooler from BERT's pooler; phrase rows, region embedding, projections and ITM keep their init;
* ``logit_scale`` is a 1-element vector (FSDP2 cannot shard a 0-d parameter); a 0-d one (the official file, older
  checkpoints) loads into it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks.bert import LayerStack, MLMHead, text_embeddings
from vlp.blocks.heads import ITMHead, Pooler, init_bert_weights
from vlp.blocks.regions import ConcatRegionEmbedder
from vlp.blocks.text import TextConfig, build_hf_config, explicit_text_config
from vlp.config import OptimConfig
from vlp.data.masking import MaskingConfig
from vlp.data.visual import Visual
from vlp.losses.contrastive import info_nce
from vlp.losses.grounding import draw_wpg_choices, gather_rows, wpg_loss
from vlp.losses.matching import hardest_negatives, itm_loss
from vlp.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp.models.base import Encoded, Fused, PretrainModule, RetrievalProtocol, Step, Text, example_text
from vlp.utils.fsdp import stack_layers

__all__ = ["MVPTRConfig", "MVPTR", "LOSSES"]

LOSSES = ("mcr", "vsc", "itm", "mlm", "wpg")


def _bert_base_uncased() -> TextConfig:
    return TextConfig(name="bert-base-uncased", pretrained=True)


def _mvptr_masking() -> MaskingConfig:
    # oscar_tsv4.random_word: 15 %, 80/10/10, random ids over the whole word vocabulary; [CLS]/[SEP] never
    # targets. The same rule masks the tags and (with its probability and ratios) corrupts the phrases.
    return MaskingConfig(protect="special", random_tokens="vocab")


@dataclass
class MVPTRConfig:
    name: str = "mvptr"
    text: TextConfig = field(default_factory=_bert_base_uncased)  # layers = the official num_hidden_layers (3 x /2)
    region_dim: int = 2048  # detector feature width D (VinVL: 2048); must match the data's regions.npz
    box_values: bool = True  # append (x1, y1, x2, y2, w, h) to each feature; false: the features hold them already
    region_layernorm: bool = True  # official use_img_layernorm (pre-training script default 0, retrieval 1)
    region_dropout: Optional[float] = None  # None: the text config's dropout
    phrase_vocab_size: Optional[int] = None  # new phrase rows of the word table; None: from the data (0: none)
    embed_dim: Optional[int] = None  # VSC projection width; None: hidden (official)
    temperature: float = 0.07  # logit_scale starts at ln(1 / temperature)
    logit_scale_max: Optional[float] = None  # clamp of logit_scale (official: none; ln 100 = 4.6052 is CLIP's)
    vsc_gather: bool = False  # VSC against every rank's batch (official: this rank's only)
    wpg_margin: float = 0.2
    wpg_top_k: int = 3
    draw_seed: int = 0  # seeds the model's draws (ITM permutation, WPG choices)
    masking: MaskingConfig = field(default_factory=_mvptr_masking)
    num_answers: int = 0  # VQA answers (vlp finetune sets it); 0: no VQA head
    loss_weights: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in LOSSES})

    @classmethod
    def tiny(cls, **overrides) -> "MVPTRConfig":
        """Seconds-sized MVPTR for tests: BERT 32-wide with 2 layers per stack from scratch, 16-d region features,
        10 phrase rows."""
        base = dict(
            text=TextConfig(arch="bert", vocab_size=100, hidden=32, layers=4, heads=2, intermediate=64,
                            max_position=64, type_vocab_size=2, ln_eps=1e-12, pad_token_id=0, dropout=0.1),
            region_dim=16, phrase_vocab_size=10)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        unknown = set(self.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"loss_weights: unknown losses {sorted(unknown)}; MVPTR has {', '.join(LOSSES)}")
        if self.region_dim < 1:
            raise ValueError(f"region_dim={self.region_dim} must be >= 1")
        if self.phrase_vocab_size is not None and self.phrase_vocab_size < 0:
            raise ValueError(f"phrase_vocab_size={self.phrase_vocab_size} must be >= 0")
        if self.temperature <= 0 or self.wpg_top_k < 1:
            raise ValueError(f"temperature={self.temperature} must be > 0 and wpg_top_k={self.wpg_top_k} >= 1")


class MVPTR(PretrainModule):
    READS = frozenset({"regions", "tags", "phrases"})

    def __init__(self, cfg: MVPTRConfig | None = None, optim: OptimConfig | None = None):
        cfg = cfg or MVPTRConfig()
        super().__init__(optim, cfg.loss_weights)
        self.cfg = cfg
        hf = build_hf_config(cfg.text)
        if hf.model_type != "bert":
            raise ValueError(f"MVPTR is built on BERT; text is a {hf.model_type!r} model")
        if hf.num_hidden_layers % 2 or hf.num_hidden_layers < 2:
            raise ValueError(f"text.layers={hf.num_hidden_layers}: MVPTR splits it into stacks of layers // 2 "
                             "(stage 1 and stage 2); use an even number >= 2")
        if hf.type_vocab_size < 2:
            raise ValueError("MVPTR needs text.type_vocab_size >= 2 (tags use token type 1)")
        self.hf_config = hf
        self.word_vocab_size = hf.vocab_size
        self.phrase_rows = int(cfg.phrase_vocab_size or 0)
        h, half = hf.hidden_size, hf.num_hidden_layers // 2
        table = copy.deepcopy(hf)
        table.vocab_size = self.word_vocab_size + self.phrase_rows  # words, then phrases
        self.embeddings = text_embeddings(table)
        dropout = hf.hidden_dropout_prob if cfg.region_dropout is None else cfg.region_dropout
        self.img_embedding = ConcatRegionEmbedder(cfg.region_dim, h, cfg.box_values, cfg.region_layernorm, dropout,
                                                  hf.layer_norm_eps)
        ckpt = cfg.text.grad_checkpointing
        self.txt_encoder = LayerStack(hf, half, ckpt)
        self.vis_encoder = LayerStack(hf, half, ckpt)
        self.mul_encoder = LayerStack(hf, half, ckpt, layer_offset=half)
        self.pooler = Pooler(h)
        self.mlm_head = MLMHead(h, self.word_vocab_size, hf.layer_norm_eps, hf.hidden_act)
        self.mcr_head = MLMHead(h, self.word_vocab_size, hf.layer_norm_eps, hf.hidden_act)
        self.itm_head = ITMHead(h)
        self.build_vqa_head(cfg.num_answers, hidden_scale=1, act_before_norm=True, ln_eps=1e-12)
        init_bert_weights(self, hf.initializer_range)  # the official init_weights on every module
        e = cfg.embed_dim or h
        self.txt_proj = nn.Parameter(torch.randn(h, e) * h ** -0.5)  # official: scale * randn, untouched by init
        self.vis_proj = nn.Parameter(torch.randn(h, e) * h ** -0.5)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)))  # [1]: FSDP2
        self.mlm_head.tie(self.embeddings.word_embeddings, rows=self.word_vocab_size)
        self.mcr_head.tie(self.embeddings.word_embeddings, rows=self.word_vocab_size)
        if cfg.text.pretrained:
            self.load_pretrained(cfg.text.name)
        self.save_hyperparameters({"model": dataclasses.asdict(self.resolved_config())})

    def resolved_config(self) -> MVPTRConfig:
        """``cfg`` with every size explicit and no weight loading: what this module is (``vlp.models.load``)."""
        return dataclasses.replace(self.cfg, text=explicit_text_config(self.cfg.text, self.hf_config),
                                   phrase_vocab_size=self.phrase_rows)

    def load_pretrained(self, name_or_path: str) -> None:
        """BERT (hub name or local path): embeddings (word rows), txt/vis stacks <- layers 0..L/2-1, the cross-modal
        stack <- layers L/2..L-1, both LM heads <- the MLM head, pooler <- the pooler."""
        from transformers import BertModel

        from vlp.blocks.bert_pretrained import BertCheckpoint, load_bert_embeddings, load_bert_layers, load_mlm_head

        ckpt = BertCheckpoint.load(name_or_path, arch="bert")
        half = self.txt_encoder.depth
        if ckpt.num_layers != 2 * half:
            raise ValueError(f"{name_or_path}: {ckpt.num_layers} layers; MVPTR's stacks need {2 * half} "
                             f"(text.layers={2 * half})")
        load_bert_embeddings(self.embeddings, ckpt, extra_rows=True)
        load_bert_layers(self.txt_encoder, ckpt, range(half))
        load_bert_layers(self.vis_encoder, ckpt, range(half))
        load_bert_layers(self.mul_encoder, ckpt, range(half, 2 * half))
        load_mlm_head(self.mlm_head, ckpt)
        load_mlm_head(self.mcr_head, ckpt)
        pooler = BertModel.from_pretrained(name_or_path).pooler
        if pooler is not None:
            self.pooler.dense.load_state_dict(pooler.dense.state_dict())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"  # 0-d in the official file and in checkpoints from before it was [1]
        if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fsdp_blocks(self) -> list[nn.Module]:
        return stack_layers(self.txt_encoder, self.vis_encoder, self.mul_encoder)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stack in (self.txt_encoder, self.vis_encoder, self.mul_encoder):
            stack.set_grad_checkpointing(enable)

    # -- the contract (vlp.models.base) -------------------------------------------------------------------------------
    @property
    def has_contrastive_head(self) -> bool:
        return True

    @property
    def retrieval_protocol(self) -> RetrievalProtocol:
        return RetrievalProtocol("contrastive", "itm")  # ITC top-k, re-ranked by ITM (official 128 / 64)

    @property
    def pooled_dim(self) -> int:
        return self.hf_config.hidden_size

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` (0-d), clamped at ``exp(logit_scale_max)`` when set."""
        s = self.logit_scale.reshape(())
        if self.cfg.logit_scale_max is not None:
            s = s.clamp(max=self.cfg.logit_scale_max)
        return s.exp()

    def encode_text(self, text: Text) -> Encoded:
        """Stage 1, text: ``txt_encoder`` states [B, T, H] and ``norm(cls @ txt_proj)``."""
        states = self.txt_encoder(self.embeddings(input_ids=text.input_ids), text.attention_mask)
        return Encoded(states, text.attention_mask, F.normalize(states[:, 0] @ self.txt_proj, dim=-1))

    def visual_states(self, visual: Visual, tag_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Stage 1, image: ``vis_encoder`` over ``[tags ; regions]`` -> (states [B, T_tag + N, H], T_tag).
        ``tag_ids``: the (masked) tags to read instead of ``visual.tag_ids``."""
        v = visual.require("features", "boxes", "mask", "tag_ids", "tag_mask", model="MVPTR")
        ids = v.tag_ids if tag_ids is None else tag_ids
        tags = self.embeddings(input_ids=ids, token_type_ids=torch.ones_like(ids))
        regions = self.img_embedding(v.features.to(tags.dtype), v.boxes)
        mask = torch.cat([v.tag_mask.long(), v.mask.long()], dim=1)
        return self.vis_encoder(torch.cat([tags, regions], dim=1), mask), ids.shape[1]

    def image_part(self, states: torch.Tensor, n_tags: int, region_mask: torch.Tensor) -> Encoded:
        """What stage 2 reads of an image: the region states (tags and visual [CLS] dropped), and the VSC
        embedding ``norm(vis_cls @ vis_proj)``."""
        return Encoded(states[:, n_tags:], region_mask, F.normalize(states[:, 0] @ self.vis_proj, dim=-1))

    def encode_image(self, visual: Visual) -> Encoded:
        states, n_tags = self.visual_states(visual)
        return self.image_part(states, n_tags, visual.mask)

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        """Stage 2: ``mul_encoder`` over ``[text states ; region states]``; pooled = the pooler on the text [CLS]."""
        states = torch.cat([text.states, image.states.to(text.states.dtype)], dim=1)
        mask = torch.cat([text.mask.long(), image.mask.long()], dim=1)
        hidden = self.mul_encoder(states, mask)
        return Fused(hidden, self.pooler(hidden))

    def match_logits(self, fused: Fused) -> torch.Tensor:
        return self.itm_head(fused.pooled)

    def vqa_logits(self, fused: Fused) -> torch.Tensor:
        """The official ``BertVQAHeads`` on the cross-modal [CLS] state (not the pooler)."""
        head = getattr(self, "vqa_head", None)
        if head is None:
            raise RuntimeError("this MVPTR has no VQA head: set model.num_answers > 0")
        return head(fused.states[:, 0])

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[Visual, Text]:
        """Random regions (row i has ``6 - i`` real ones, at least 1), tags of different lengths, and texts of
        different lengths whose last real word is a phrase token (when the model has phrase rows)."""
        g = torch.Generator().manual_seed(seed + 3)
        n, d = 6, self.cfg.region_dim
        counts = [max(1, n - i) for i in range(batch_size)]
        mask = torch.arange(n).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
        corners = torch.rand(batch_size, n, 2, 2, generator=g).sort(dim=2).values
        boxes = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)
        keep = mask.unsqueeze(-1).float()
        features = torch.randn(batch_size, n, d, generator=g).relu() * keep
        tags = example_text(self.word_vocab_size, batch_size, length=5, seed=seed + 7)
        visual = Visual(features=features, boxes=boxes * keep, mask=mask, tag_ids=tags.input_ids,
                        tag_mask=tags.attention_mask)
        text = example_text(self.word_vocab_size, batch_size, seed=seed)
        if self.phrase_rows:
            ids = text.input_ids.clone()
            last = text.attention_mask.sum(1) - 1
            ids[torch.arange(batch_size), last] = self.word_vocab_size + torch.arange(batch_size) % self.phrase_rows
            text = Text(ids, text.attention_mask)
        return visual, text

    # -- pre-training -------------------------------------------------------------------------------------------------
    def pretrain_outputs(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Every loss of one pre-training step and the tensors behind them (one forward, corrupted inputs)."""
        visual = Visual.from_batch(batch)
        tag_ids = batch.get("tag_mlm_ids", visual.tag_ids)
        text = Text(batch.get("mlm_input_ids", batch["input_ids"]), batch["attention_mask"])
        t_len, b = text.input_ids.shape[1], text.input_ids.shape[0]
        out: dict = {}

        txt = self.encode_text(text)
        vis_states, n_tags = self.visual_states(visual, tag_ids)
        image = self.image_part(vis_states, n_tags, visual.mask)
        sim = txt.embedding @ image.embedding.t()
        scale = self.scale()
        out.update(txt_states=txt.states, vis_states=vis_states, sim=sim, logit_scale_exp=scale)

        if self.enabled("mcr") and "tag_mlm_labels" in batch:
            labels = batch["tag_mlm_labels"]
            selected = labels != IGNORE_INDEX
            logits = self.mcr_head(vis_states[:, :n_tags][selected])
            out.update(mcr=mlm_loss(logits, labels[selected]), mcr_logits=logits, mcr_targets=labels[selected])

        if self.enabled("vsc"):
            tau = 1.0 / scale
            out["vsc"] = 0.5 * (info_nce(txt.embedding, image.embedding, tau, gather=self.cfg.vsc_gather)
                                + info_nce(image.embedding, txt.embedding, tau, gather=self.cfg.vsc_gather))

        pos = self.fuse(image, txt)
        out.update(states=pos.states, pooled=pos.pooled)
        order = batch.get("itm_order")
        if order is None:
            order = torch.randperm(b, generator=generator).to(sim.device)
        if self.enabled("itm"):
            neg_t, neg_i = hardest_negatives(sim, order, batch.get("image_ids"))
            neg = self.fuse(image.select(neg_i), txt.select(neg_t))
            logits = self.itm_head(torch.cat([pos.pooled, neg.pooled]))
            labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)]).to(sim.device)
            out.update(itm=itm_loss(logits, labels), itm_logits=logits, itm_labels=labels, hard_states=neg.states,
                       hard_pooled=neg.pooled, hard_text_index=neg_t, hard_image_index=neg_i)

        if self.enabled("mlm") and "mlm_labels" in batch:
            labels = batch["mlm_labels"]
            selected = labels != IGNORE_INDEX
            logits = self.mlm_head(pos.states[:, :t_len][selected])
            out.update(mlm=mlm_loss(logits, labels[selected]), mlm_logits=logits, mlm_targets=labels[selected])

        if self.enabled("wpg") and "phrase_mask" in batch and bool(batch["phrase_mask"].any()):
            phrases, phrase_keep = gather_rows(pos.states[:, :t_len], batch["phrase_mask"][:, :t_len])
            if "wpg_neg_image" in batch:
                neg_image, pick_pos, pick_neg = batch["wpg_neg_image"], batch["wpg_pick_pos"], batch["wpg_pick_neg"]
            else:
                neg_image, pick_pos, pick_neg = draw_wpg_choices(b, phrases.shape[1], generator, sim.device)
            w = wpg_loss(phrases, phrase_keep, pos.states[:, t_len:], visual.mask, neg_image,
                         pick_pos[:, :phrases.shape[1]], pick_neg[:, :phrases.shape[1]], self.cfg.wpg_margin,
                         self.cfg.wpg_top_k)
            out.update(wpg=w["loss"], wpg_pos=w["pos"], wpg_neg=w["neg"], wpg_valid=w["valid"])
        return out

    def step(self, batch: dict) -> Step:
        out = self.pretrain_outputs(batch, self.step_generator("mvptr-draws", self.cfg.draw_seed))
        losses = {k: out[k] for k in LOSSES if k in out}
        metrics = {"logit_scale": out["logit_scale_exp"].detach()}
        with torch.no_grad():
            for name in ("mlm", "mcr"):
                if f"{name}_logits" in out and out[f"{name}_targets"].numel():
                    metrics[f"{name}_acc"] = (out[f"{name}_logits"].argmax(-1) == out[f"{name}_targets"]).float().mean()
            if "itm_logits" in out:
                metrics["itm_acc"] = (out["itm_logits"].argmax(-1) == out["itm_labels"]).float().mean()
            if "wpg_valid" in out and bool(out["wpg_valid"].any()):
                valid = out["wpg_valid"]
                metrics["wpg_pos"], metrics["wpg_neg"] = out["wpg_pos"][valid].mean(), out["wpg_neg"][valid].mean()
        return Step(losses, metrics)
