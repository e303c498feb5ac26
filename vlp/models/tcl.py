"""TCL: Vision-Language Pre-Training with Triple Contrastive Learning (Yang et al., CVPR 2022).

TCL is ALBEF plus two intra-modal objectives. An image goes through a ViT and a caption through the first layers of
a BERT; their [CLS] states are projected and L2-normalised into a shared space. A momentum (EMA) copy of every
encoder and projection, fed a second augmented view of the image, supplies keys, soft targets and a queue of past
features. The losses, as in the official code (``uta-smile/TCL`` ``models/model_pretrain.py``):

* **CMA** (cross-modal alignment): image-to-text and text-to-image InfoNCE against [momentum batch ; queue], with
  momentum-distilled soft targets ``alpha * softmax(momentum sims) + (1 - alpha) * one-hot``.
* **IMC** (intra-modal contrast): each image against the momentum features of its other view (and the image
  queue), each caption against its own momentum feature (and the text queue); hard targets.
* **LMI** (local mutual information): the global feature of an image (caption) against its own momentum local
  features — pooled patch tokens (token states) — with the locals of the other samples as negatives.
* The six alignment terms are averaged: ``ita = (i2t + t2i + i2i + t2t + lmi_img + lmi_txt) / 6``.
* **ITM** with hard negatives: the fusion layers score [positives ; (text, hard image) ; (hard text, image)],
  negatives drawn from the in-batch similarities.
* **MLM** with momentum distillation: masked tokens predicted from the fused states; the momentum model, given
  the second view, supplies soft targets.
* Total: ``ita + itm + mlm`` (each weight 1; ``loss_weights`` in the config).

ALBEF is this module with ``imc: false, lmi: false`` (``ita = (i2t + t2i) / 2``), one view for both encoders and
no TCL augmentations: ``experiments/tcl/ablations/albef.yaml``.

Where we differ from the official code, on purpose:
* The momentum update happens once per optimizer step (the same as the official code without gradient
  accumulation); ``alpha`` ramps over ``alpha_warmup_steps`` optimizer steps instead of over the first epoch.
* The temperature is a 1-element vector (FSDP2 cannot shard 0-d parameters) and therefore excluded from weight
  decay by the 1-d rule; the official 0-d ``temp`` is decayed (by 0.02 * lr per step: negligible).
* Hard negatives are drawn without the per-sample host sync, and pairs sharing an image id are never negatives.
* MLM masking happens in the data collator with the official rule (``masking``: [PAD] and [CLS] protected, so
  [SEP] can be masked; random replacements from the whole vocabulary); the batch must bring ``mlm_input_ids``.
* ITM negatives are drawn from this rank's batch (``local-hard``, the official rule, or ``random``). A global-hard
  variant would have to gather every rank's token states with gradients; the official code does not do it, so the
  option is not offered (``vlp.losses.matching.sample_negatives`` supports it for models that gather).
* LMI pooling: ``lmi_locals`` pooled regions for any square patch grid (the official pre-training code hard-codes
  a 16 x 16 grid); ``lmi_locals: null`` reproduces the official rule (kernel = int(sqrt(grid))).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from vlp.blocks.heads import ITMHead, Projection
from vlp.blocks.momentum import FeatureQueue, MomentumPair
from vlp.blocks.text import TextConfig, TextTower
from vlp.blocks.vision import VisionConfig, VisionTower
from vlp.config import OptimConfig
from vlp.data.masking import MaskingConfig
from vlp.data.visual import Visual
from vlp.losses.contrastive import Temperature, info_nce
from vlp.losses.matching import itm_loss, itm_triplets, sample_negatives
from vlp.losses.mlm import mlm_loss
from vlp.losses.mutual_info import in_batch_g2l_loss, patch_pooling
from vlp.models.base import Encoded, Fused, PretrainModule, Step, Text, example_pixels, example_text
from vlp.utils.fsdp import stack_layers

ITM_NEGATIVES = ("random", "local-hard")


@dataclass
class TCLConfig:
    name: str = "tcl"
    vision: VisionConfig = field(default_factory=VisionConfig.tiny)
    text: TextConfig = field(default_factory=TextConfig.tiny)
    embed_dim: int = 256
    temp: float = 0.07
    learn_temp: bool = True  # the official temperature is learnable (clamped to [0.001, 0.5])
    queue_size: int = 65536  # 0: no queue (in-batch negatives only)
    momentum: float = 0.995
    alpha: float = 0.4  # momentum-distillation weight (CMA soft targets and MLM)
    alpha_warmup_steps: int = 0  # linear ramp of alpha from 0 (official: over the first epoch)
    imc: bool = True  # intra-modal contrast (False with lmi False: ALBEF)
    lmi: bool = True  # local mutual information
    lmi_locals: Optional[int] = 16  # pooled image locals; null: the official kernel = int(sqrt(grid)) rule
    itm_negatives: str = "local-hard"  # random | local-hard (in-batch, as the official code)
    # The official mask(): 15 %, 80/10/10, [PAD] and [CLS] protected, random ids from the whole vocabulary.
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(protect="pad_cls", random_tokens="vocab"))
    num_answers: int = 0  # VQA answers (vlp finetune sets it from the data); 0: no VQA head
    vqa_hidden_scale: int = 2  # VQA head: Linear(H, 2H), LayerNorm, GELU, Linear(2H, answers)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ita": 1.0, "itm": 1.0, "mlm": 1.0})

    @classmethod
    def tiny(cls, **overrides) -> "TCLConfig":
        """Seconds-sized TCL for tests (the model contract tests build every model's ``tiny()``): 32 px, widths 32."""
        base = dict(vision=VisionConfig.tiny(img_size=32, patch_size=8, width=32, depth=1, heads=2),
                    text=TextConfig.tiny(hidden=32, layers=2, heads=2, intermediate=64, fusion_layers=1,
                                         encoder_width=32, max_position=40),
                    embed_dim=16, queue_size=0, momentum=0.9)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"itm_negatives must be one of {', '.join(ITM_NEGATIVES)}, got {self.itm_negatives!r}")
        unknown = set(self.loss_weights) - {"ita", "itm", "mlm"}
        if unknown:
            raise ValueError(f"loss_weights: unknown losses {sorted(unknown)}; TCL has ita, itm, mlm")


class TCL(PretrainModule):
    FSDP_FORWARD = "forward"  # step() runs the momentum update, then forward (see step)

    def __init__(self, cfg: TCLConfig | None = None, optim: OptimConfig | None = None):
        cfg = cfg or TCLConfig()
        super().__init__(optim, cfg.loss_weights)
        self.cfg = cfg
        self.save_hyperparameters({"model": dataclasses.asdict(cfg)})
        self.vision = VisionTower(cfg.vision)
        text_cfg = (cfg.text if cfg.text.encoder_width
                    else dataclasses.replace(cfg.text, encoder_width=self.vision.width))
        self.text = TextTower(text_cfg)
        self.vision_proj = Projection(self.vision.width, cfg.embed_dim)
        self.text_proj = Projection(self.text.hidden, cfg.embed_dim)
        self.itm_head = ITMHead(self.text.hidden)
        self.temp = Temperature(cfg.temp, learnable=cfg.learn_temp)
        self.momentum = MomentumPair(
            {"vision": self.vision, "vision_proj": self.vision_proj, "text": self.text, "text_proj": self.text_proj},
            momentum=cfg.momentum,
        )
        # queue_size 0: in-batch negatives only. From a random init the queue is harmful: while the features are still
        # collapsed, telling this step's keys from the stale queue is the easiest way to lower the loss.
        self.queue = FeatureQueue(cfg.embed_dim, cfg.queue_size, names=("image", "text")) if cfg.queue_size else None
        self.build_vqa_head(cfg.num_answers, cfg.vqa_hidden_scale)

    # -- the contract (vlp.models.base) ---------------------------------------------------------------------------------
    @property
    def has_contrastive_head(self) -> bool:
        return True

    @property
    def pooled_dim(self) -> int:
        return self.text.hidden

    def encode_image(self, visual: Visual) -> Encoded:
        """ViT tokens [B, 1 + P, D] and the projected [CLS]."""
        tokens = self.vision(visual.require("pixels", model="TCL").pixels).last_hidden_state
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return Encoded(tokens, mask, self.vision_proj(tokens[:, 0]))

    def encode_text(self, text: Text) -> Encoded:
        """The text-only BERT layers [B, T, H] and the projected [CLS]."""
        hidden = self.text.forward_text(text.input_ids, text.attention_mask)
        return Encoded(hidden, text.attention_mask, self.text_proj(hidden[:, 0]))

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        """The fusion layers over the text states, cross-attending to the image tokens; pooled = fused [CLS]."""
        fused = self.text.forward_fusion(text.states, text.mask, image.states, image.mask)
        return Fused(fused, fused[:, 0])

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[Visual, Text]:
        return (example_pixels(self.vision.config.img_size, batch_size, seed),
                example_text(self.text.hf_config.vocab_size, batch_size, seed=seed))

    def match_logits(self, fused: Fused) -> torch.Tensor:
        return self.itm_head(fused.pooled)

    # -- pre-training ------------------------------------------------------------------------------------------------
    def fsdp_blocks(self) -> list[torch.nn.Module]:
        m = self.momentum
        return stack_layers(self.vision, self.text, m["vision"], m["text"])

    def current_alpha(self) -> float:
        if self.cfg.alpha_warmup_steps <= 0:
            return self.cfg.alpha
        step = self.global_step if self._trainer is not None else self.cfg.alpha_warmup_steps
        return self.cfg.alpha * min(1.0, step / self.cfg.alpha_warmup_steps)

    def lmi_pool(self, patch_feats: torch.Tensor) -> torch.Tensor:
        n = self.cfg.lmi_locals
        if n is None:  # the official rule: kernel int(sqrt(g)) on a g x g grid
            g = math.isqrt(patch_feats.shape[1])
            k = math.isqrt(g)
            n = (g // k) ** 2
        return patch_pooling(patch_feats, n)

    def forward(self, batch: dict, alpha: float | None = None, update_momentum: bool = True,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All losses of one step (and the intermediate tensors the official-parity test checks)."""
        cfg = self.cfg
        alpha = self.current_alpha() if alpha is None else alpha
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        image_aug = batch.get("image_aug", image)
        temp = self.temp()
        bs = image.shape[0]

        # Online uni-modal features.
        image_embeds = self.vision(image).last_hidden_state
        image_feat = self.vision_proj(image_embeds[:, 0])
        text_embeds = self.text.forward_text(ids, mask)
        text_feat = self.text_proj(text_embeds[:, 0])

        # Momentum features: update first, then encode the second view (official order).
        with torch.no_grad():
            if update_momentum:
                self.momentum.update()
            m = self.momentum
            image_embeds_m = m.vision(image_aug).last_hidden_state
            image_feat_m = m.vision_proj(image_embeds_m[:, 0])
            text_embeds_m = m.text.forward_text(ids, mask)
            text_feat_m = m.text_proj(text_embeds_m[:, 0])
        image_queue = self.queue.features("image") if self.queue is not None else None
        text_queue = self.queue.features("text") if self.queue is not None else None

        # CMA: cross-modal InfoNCE with queue negatives and distilled targets.
        loss_i2t, sim_i2t = info_nce(image_feat, text_feat_m, temp, queue=text_queue, teacher_query=image_feat_m,
                                     alpha=alpha, return_logits=True)
        loss_t2i, sim_t2i = info_nce(text_feat, image_feat_m, temp, queue=image_queue, teacher_query=text_feat_m,
                                     alpha=alpha, return_logits=True)
        out = {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "image_embeds": image_embeds, "text_embeds": text_embeds,
               "image_feat": image_feat, "text_feat": text_feat}
        terms = [loss_i2t, loss_t2i]
        if cfg.imc:  # IMC: the same InfoNCE within a modality, hard targets
            out["loss_i2i"] = info_nce(image_feat, image_feat_m, temp, queue=image_queue)
            out["loss_t2t"] = info_nce(text_feat, text_feat_m, temp, queue=text_queue)
            terms += [out["loss_i2i"], out["loss_t2t"]]
        if cfg.lmi:  # LMI: global online feature vs momentum local features
            with torch.no_grad():
                image_locals = self.lmi_pool(m.vision_proj(image_embeds_m[:, 1:]))
                text_locals = m.text_proj(text_embeds_m[:, 1:])
            out["loss_lmi_image"] = in_batch_g2l_loss(image_locals, image_feat, temp)
            out["loss_lmi_text"] = in_batch_g2l_loss(text_locals, text_feat, temp, mask[:, 1:])
            terms += [out["loss_lmi_image"], out["loss_lmi_text"]]
        out["ita"] = sum(terms) / len(terms)
        if self.queue is not None:
            self.queue.enqueue(image_feat_m, text_feat_m)

        # ITM: positives, then (text, hard negative image), then (hard negative text, image), in one fusion pass.
        if self.enabled("itm"):
            with torch.no_grad():
                neg_img, neg_txt = sample_negatives(
                    sim_i2t[:, :bs].detach(), sim_t2i[:, :bs].detach(), mode=cfg.itm_negatives,
                    image_ids=batch.get("image_ids"), generator=generator,
                )
            neg_img, neg_txt = batch.get("neg_image_for_text", neg_img), batch.get("neg_text_for_image", neg_txt)
            image_index, text_index, labels = itm_triplets(neg_img, neg_txt)
            fused = self.text.forward_fusion(text_embeds[text_index], mask[text_index], image_embeds[image_index])
            logits = self.itm_head(fused[:, 0])
            out["itm"] = itm_loss(logits, labels)
            out.update(fused_pos=fused[:bs], itm_logits=logits, neg_image_for_text=neg_img, neg_text_for_image=neg_txt)

        # MLM with momentum distillation (the teacher sees the second view).
        if self.enabled("mlm"):
            if "mlm_input_ids" not in batch:
                raise ValueError("TCL's MLM needs the batch keys mlm_input_ids / mlm_labels (the data collator masks "
                                 "with model.masking)")
            mlm_ids, mlm_labels = batch["mlm_input_ids"], batch["mlm_labels"]
            soft = None
            if alpha > 0:
                with torch.no_grad():
                    soft = m.text.mlm_logits(m.text(mlm_ids, mask, image_embeds_m, mode="multimodal"))
            logits = self.text.mlm_logits(self.text(mlm_ids, mask, image_embeds, mode="multimodal"))
            out["mlm"] = mlm_loss(logits, mlm_labels, soft_logits=soft, alpha=alpha)
        return out

    def step(self, batch: dict) -> Step:
        # One EMA step per optimizer step: with gradient accumulation only the first micro-batch updates.
        update = self._trainer is None or self.global_step != getattr(self, "_momentum_step", None)
        if self._trainer is not None:
            self._momentum_step = self.global_step
        if update:  # before forward, the same values: under FSDP2 on the stored shards, not gathered copies
            self.momentum.update()
        out = self(batch, update_momentum=False)
        metrics = {f"ita_{k[5:]}": v.detach() for k, v in out.items() if k.startswith("loss_")}
        metrics.update(temp=self.temp().detach().squeeze(), alpha=self.current_alpha())
        if "itm_logits" in out:  # logits: B positives, then 2B negatives
            matched = torch.zeros(out["itm_logits"].shape[0], dtype=torch.long, device=out["itm_logits"].device)
            matched[: out["fused_pos"].shape[0]] = 1
            metrics["itm_acc"] = (out["itm_logits"].detach().argmax(-1) == matched).float().mean()
        # ita is always computed (its similarities choose the ITM hard negatives) but reported only when enabled.
        return Step({k: out[k] for k in ("ita", "itm", "mlm") if k in out and self.enabled(k)}, metrics)
