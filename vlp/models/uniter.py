"""UNITER: UNiversal Image-TExt Representation Learning (Chen et al., ECCV 2020), single-stream, detector regions.

Architecture, as the official code (``ChenRocks/UNITER`` at 1dbfa62, ``model/model.py``, ``model/pretrain.py``):

* text: BERT embeddings of ``[CLS] words [SEP]`` (word + position ``arange(T)`` + token type 0, LN, dropout);
* regions: :class:`vlp.blocks.regions.RegionEmbedder` (feature Linear + LN, 7-d location Linear + LN, token type 1
  from the *text* embeddings' table, output LN, dropout; masked regions get the learned mask vector);
* one post-LN BERT :class:`~vlp.blocks.bert.LayerStack` over ``[text | regions]`` with a joint keep-mask. The
  official code gathers every sample into ``[txt_i | img_i | padding]`` (``gather_index``); we concatenate the
  padded blocks ``[txt padded to T | regions padded to N]`` instead. The encoder has no position embedding and every
  padded key is masked, so each real token's output is the same (the parity test compares them through the
  official ``gather_index``) and padding never mixes samples;
* pooled = BERT pooler (dense + tanh) on [CLS]; heads: MLM (``mlm_head``: dense-GELU-LN, decoder tied to the word
  embeddings, own bias), MRFR (``feat_regress``: Linear-GELU-LN, output tied to ``img_linear.weight`` transposed, own
  bias), MRC / MRC-kl (``region_classifier``: Linear-GELU-LN-Linear over the detector classes), ITM (``itm_head``,
  Linear(H, 2) on the pooler, 1 = matched); VQA: the shared head in UNITER's order (Linear, GELU, LN(1e-12), Linear).

The contract (``vlp.models.base``): ``encode_image`` returns the embedded regions (``Encoded`` with the region mask,
no contrastive embedding), ``encode_text`` the text embeddings; ``fuse`` runs the single stream; ``match_logits`` is
the ITM head; retrieval scores every pair with ITM (``all_pairs`` + ``itm``, the official protocol).

Pre-training, one task per optimizer step (official ``MetaLoader``): the task of optimizer step s is
:class:`TaskSampler` ``(task_seed, s)``, a categorical draw weighted by ``task_mix`` (paper all-data:
itm 3 : mlm 4 : mrfr 2 : mrc_kl 2), so it is the same on every rank, constant over the micro-batches of one
accumulation window (Lightning's ``global_step`` counts optimizer steps) and the same after a resume. ``step``
computes only that task's losses; the others are absent. Outside a Trainer (tests, probes) ``step`` computes every
active task on the batch. Each task masks ONE modality (conditional masking):

=========  =============================================  ==============================================================
task       input                                          loss (normalised as the official trainer: ``.mean()``)
=========  =============================================  ==============================================================
mlm        ``mlm_input_ids`` (collator, ``masking``);     CE at masked tokens, mean over them (``mlm``)
           regions intact
mrfr       text intact; regions masked (15 %, >= 1)       MSE, mean over n_masked x D elements (``mrfr``)
mrc        as mrfr                                        CE to argmax of ``cls_prob[1:]`` + 1, mean (``mrc``)
mrc_kl     as mrfr                                        KL(cls_prob || softmax), mean over n_masked x C (``mrc_kl``)
itm        each caption keeps its image with p = 0.5,     CE, mean over pairs (``itm``); WRA: IPOT distance of the
           else another image of the batch (another id)   word/region states, (sum D_pos - sum D_neg) / n (``ot``)
=========  =============================================  ==============================================================

``loss_weights`` weight the losses (paper: 1 each, ``ot`` = ``itm_ot_lambda`` 0.1); a weight of 0 switches a loss off,
and a task with no loss left is never sampled. ``train/task`` logs the step's task as its index in ``TASKS``
(itm 0, mlm 1, mrfr 2, mrc 3, mrc_kl 4). Random draws in the model (region masks, ITM labels and negatives) come from a
fresh ``torch.Generator`` per call seeded from ``(task_seed, global_step, rank, call within the step, task)``: a pure
function of the run's position, so a resumed run draws what the uninterrupted one did (dropout follows
``vlp.utils.rng.StepSeeding``); batches may bring the draws instead (``region_masked`` [B, N] bool, ``itm_labels`` /
``itm_image_index`` [B]: tests, the official-parity replay).

Unused heads and DDP: a step uses one task's head only. The official trainer (horovod) all-reduces by hand the
gradients that exist, and its ``zero_grad`` leaves zero tensors, so after their first use the unused heads keep
being updated by Adam's momentum and weight decay. Here every sampled step adds ``0 x`` one element of each
trainable parameter to its loss (``touch_unused``): every parameter gets a (zero) gradient, so Lightning's DDP runs
with ``find_unused_parameters=False`` (no search of the graph for unused parameters; ``tests/test_uniter_ddp.py``), and
AdamW keeps decaying the unused heads' moments and weights as the official optimizer does after a head's first use
(here from step 0 on). ``touch_unused: false`` requires ``trainer.strategy: ddp_find_unused_parameters_true`` under
DDP; the unused heads are then left alone by AdamW (their gradient is None).

Where we differ from the official code, on purpose:

* batches are counted in samples, not in tokens (no ``TokenBucketSampler``), and examples longer than
  ``max_text_len`` are truncated by the collator instead of dropped;
* ITM negatives come from this rank's batch (an image with another ``image_id``) instead of from the whole
  dataset shard, and the ITM label is drawn per pair and per step instead of once per epoch;
* region masks are drawn in the model, per step (the official dataset draws them per example in ``__getitem__``);
* the OT distance stays fp32 and a pair with no real token on a side gives 0, not NaN;
* one loss scale for every task (the official apex AMP keeps one per task-dataset loader);
* DDP averages the gradients over ranks where the official all-reduce sums them (Adam hardly sees the scale, but the
  official clipping at 5 acts on the sum): ``optim.grad_reduction: sum`` scales the backward loss by the world size
  to reproduce the sum; the default ``mean`` is DDP's.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks.bert import LayerStack, MLMHead, text_embeddings
from vlp.blocks.heads import ITMHead, Pooler, init_bert_weights
from vlp.blocks.regions import RegionEmbedder
from vlp.blocks.text import TextConfig, build_hf_config, explicit_text_config
from vlp.config import OptimConfig
from vlp.data.masking import MaskingConfig
from vlp.data.stream import stable_hash
from vlp.data.visual import Visual
from vlp.losses.matching import itm_loss, valid_negative_mask
from vlp.losses.mlm import IGNORE_INDEX, mlm_loss
from vlp.losses.optimal_transport import ot_distance, wra_loss
from vlp.losses.regions import mrc_kl_elements, mrc_loss, mrc_targets, mrfr_elements, region_mask
from vlp.models.base import Encoded, Fused, PretrainModule, RetrievalProtocol, Step, Text, example_text
from vlp.utils.fsdp import is_shard, stack_layers

__all__ = ["UNITERConfig", "UNITER", "TaskSampler", "TASKS", "TASK_LOSSES", "draw_itm_pairs",
           "RegionFeatureRegression", "RegionClassification"]

TASKS = ("itm", "mlm", "mrfr", "mrc", "mrc_kl")
TASK_LOSSES = {"itm": ("itm", "ot"), "mlm": ("mlm",), "mrfr": ("mrfr",), "mrc": ("mrc",), "mrc_kl": ("mrc_kl",)}
LOSSES = tuple(name for t in TASKS for name in TASK_LOSSES[t])
REGION_TASKS = ("mrfr", "mrc", "mrc_kl")


def _bert_base_cased() -> TextConfig:
    return TextConfig(name="bert-base-cased", pretrained=True)


def _uniter_masking() -> MaskingConfig:
    # data/mlm.py random_word: 15 %, 80/10/10, random ids in v_range = [id('!'), |vocab|) = [106, 28996) for
    # bert-base-cased; [CLS]/[SEP] are added after masking (never targets); at least one masked token.
    return MaskingConfig(protect="special", random_tokens="range", random_range=[106, 28996], min_masked=1)


@dataclass
class UNITERConfig:
    name: str = "uniter"
    text: TextConfig = field(default_factory=_bert_base_cased)  # BERT: embeddings, the single stream, MLM head
    region_dim: int = 2048  # detector feature width D (BUTD: 2048); must match the data's regions.npz
    region_classes: int = 1601  # detector classes C incl. background at 0 (VG: 1601); MRC targets
    region_dropout: Optional[float] = None  # region embedding dropout; None: the text tower's
    # Task -> sampling weight per optimizer step (official mix_ratio, all-data base: 3 : 4 : 2 : 2); 0 or absent: off.
    task_mix: dict[str, float] = field(default_factory=lambda: {"itm": 3.0, "mlm": 4.0, "mrfr": 2.0, "mrc_kl": 2.0})
    task_seed: int = 0  # seeds the task sequence and the model's draws (region masks, ITM pairs)
    mrm_probability: float = 0.15  # region masking (official mrm_prob), at least one region per sample
    itm_neg_prob: float = 0.5  # probability that a caption's image is replaced (official itm_neg_prob)
    ot_beta: float = 0.5  # IPOT proximal weight
    ot_iterations: int = 50
    mrc_skip_background: bool = True  # MRC hard label excludes class 0 (the detector's background)
    touch_unused: bool = True  # zero-weight touch of every parameter on sampled steps (DDP without unused params)
    masking: MaskingConfig = field(default_factory=_uniter_masking)
    num_answers: int = 0  # VQA answers (vlp finetune sets it); 0: no VQA head
    vqa_hidden_scale: int = 2  # UNITER's vqa_output: Linear(H, 2H), GELU, LayerNorm, Linear(2H, answers)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"itm": 1.0, "ot": 0.1, "mlm": 1.0, "mrfr": 1.0, "mrc_kl": 1.0})

    @classmethod
    def tiny(cls, **overrides) -> "UNITERConfig":
        """Seconds-sized UNITER for tests (the model contract tests build every model's ``tiny()``): BERT 2 x 32 from
        scratch, 16-d region features, 8 detector classes, every task (MRC too) in the mix."""
        base = dict(
            text=TextConfig(arch="bert", vocab_size=100, hidden=32, layers=2, heads=2, intermediate=64,
                            max_position=64, type_vocab_size=2, ln_eps=1e-12, pad_token_id=0, dropout=0.1),
            region_dim=16, region_classes=8, ot_iterations=10,
            task_mix={"itm": 3.0, "mlm": 4.0, "mrfr": 2.0, "mrc": 1.0, "mrc_kl": 2.0},
            masking=MaskingConfig(protect="special", random_tokens="non_special", min_masked=1),
            loss_weights={"itm": 1.0, "ot": 0.1, "mlm": 1.0, "mrfr": 1.0, "mrc": 1.0, "mrc_kl": 1.0})
        return cls(**{**base, **overrides})

    def __post_init__(self):
        unknown = set(self.task_mix) - set(TASKS)
        if unknown:
            raise ValueError(f"task_mix: unknown tasks {sorted(unknown)}; UNITER has {', '.join(TASKS)}")
        if any(v < 0 for v in self.task_mix.values()) or not any(v > 0 for v in self.task_mix.values()):
            raise ValueError(f"task_mix: weights must be >= 0 with at least one > 0, got {self.task_mix}")
        unknown = set(self.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"loss_weights: unknown losses {sorted(unknown)}; UNITER has {', '.join(LOSSES)}")
        if not 0.0 <= self.mrm_probability <= 1.0 or not 0.0 <= self.itm_neg_prob <= 1.0:
            raise ValueError(f"mrm_probability={self.mrm_probability} and itm_neg_prob={self.itm_neg_prob} must be "
                             "in [0, 1]")
        if self.region_dim < 1 or self.region_classes < 1:
            raise ValueError(f"region_dim={self.region_dim} and region_classes={self.region_classes} must be >= 1")


# -- task sampling ----------------------------------------------------------------------------------------------------
class TaskSampler:
    """The task of optimizer step ``s``: a categorical draw over ``tasks`` weighted by ``mix`` from the uniform
    ``stable_hash(seed, s) / 2^63``: a pure function of (seed, s), the same on every rank, micro-batch and resume
    (the official ``MetaLoader`` draws from a pool holding each task ``mix_ratio`` times, broadcast from rank 0)."""

    def __init__(self, mix: dict[str, float], seed: int = 0, tasks=TASKS):
        self.tasks = [t for t in tasks if mix.get(t, 0.0) > 0]
        if not self.tasks:
            raise ValueError(f"TaskSampler: no task with a positive weight in {mix}")
        total = float(sum(mix[t] for t in self.tasks))
        self.probs = {t: mix[t] / total for t in self.tasks}
        self.seed = int(seed)
        acc, self._edges = 0.0, []
        for t in self.tasks:
            acc += self.probs[t]
            self._edges.append(acc)

    def uniform(self, step: int) -> float:
        return stable_hash("uniter-task", self.seed, int(step)) / float(1 << 63)

    def __call__(self, step: int) -> str:
        i = bisect.bisect_right(self._edges, self.uniform(step))
        return self.tasks[min(i, len(self.tasks) - 1)]


def draw_itm_pairs(batch_size: int, image_ids: torch.Tensor | None, neg_prob: float,
                   generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """UNITER's ITM pairs over a batch: each caption keeps its image (label 1) with probability ``1 - neg_prob``, else
    gets a uniformly drawn image of the batch with another image id (label 0); a row without such an image stays
    positive. Returns ``(image_index, labels)``, long [B]."""
    gen_device = generator.device if generator is not None else "cpu"
    ids = image_ids.to(gen_device) if image_ids is not None else torch.arange(batch_size, device=gen_device)
    labels = (torch.rand(batch_size, generator=generator, device=gen_device) >= neg_prob).long()
    valid = valid_negative_mask(batch_size, batch_size, 0, ids, ids, device=gen_device)
    has = valid.any(dim=1)
    labels = torch.where(has, labels, torch.ones_like(labels))
    weights = torch.where(has.unsqueeze(1), valid.float(), torch.eye(batch_size, device=gen_device))
    negatives = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    own = torch.arange(batch_size, device=gen_device)
    index = torch.where(labels.bool(), own, negatives)
    device = device if device is not None else (image_ids.device if image_ids is not None else gen_device)
    return index.to(device), labels.to(device)


# -- heads ------------------------------------------------------------------------------------------------------------
class RegionFeatureRegression(nn.Module):
    """MRFR head: ``F.linear(LN(GELU(Linear(h))), W_img^T, bias)`` with ``W_img`` the region embedder's
    ``img_linear.weight`` [H, D] (the same Parameter: key ``weight``) and its own zero-initialised ``bias`` [D]."""

    def __init__(self, hidden: int, feat_dim: int, img_linear_weight: nn.Parameter, ln_eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=ln_eps))
        if tuple(img_linear_weight.shape) != (hidden, feat_dim):
            raise ValueError(f"MRFR: img_linear weight {tuple(img_linear_weight.shape)} is not [{hidden}, {feat_dim}]")
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(hidden), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC / MRC-kl head: ``Linear(H, H) -> GELU -> LN -> Linear(H, C)`` (keys ``net.{0, 2, 3}``)."""

    def __init__(self, hidden: int, num_classes: int, ln_eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=ln_eps),
                                 nn.Linear(hidden, num_classes))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


# -- the module -------------------------------------------------------------------------------------------------------
class UNITER(PretrainModule):
    READS = frozenset({"regions"})

    def __init__(self, cfg: UNITERConfig | None = None, optim: OptimConfig | None = None):
        cfg = cfg or UNITERConfig()
        super().__init__(optim, cfg.loss_weights)
        self.cfg = cfg
        hf = build_hf_config(cfg.text)
        if hf.model_type != "bert":
            raise ValueError(f"UNITER is built on BERT; text is a {hf.model_type!r} model")
        if hf.type_vocab_size < 2:
            raise ValueError("UNITER needs text.type_vocab_size >= 2 (regions use token type 1)")
        self.hf_config = hf
        h = hf.hidden_size
        dropout = hf.hidden_dropout_prob if cfg.region_dropout is None else cfg.region_dropout
        self.embeddings = text_embeddings(hf)
        self.img_embeddings = RegionEmbedder(cfg.region_dim, h, dropout=dropout, ln_eps=hf.layer_norm_eps)
        self.encoder = LayerStack(hf, hf.num_hidden_layers, grad_checkpointing=cfg.text.grad_checkpointing)
        self.pooler = Pooler(h)
        self.mlm_head = MLMHead(h, hf.vocab_size, hf.layer_norm_eps, hf.hidden_act)
        self.feat_regress = RegionFeatureRegression(h, cfg.region_dim, self.img_embeddings.img_linear.weight,
                                                    hf.layer_norm_eps)
        self.region_classifier = RegionClassification(h, cfg.region_classes, hf.layer_norm_eps)
        self.itm_head = ITMHead(h)
        self.build_vqa_head(cfg.num_answers, cfg.vqa_hidden_scale, act_before_norm=True, ln_eps=1e-12)
        init_bert_weights(self, hf.initializer_range)  # the official init_weights on every module
        with torch.no_grad():
            self.img_embeddings.mask_embedding.weight[0].zero_()
        self.mlm_head.tie(self.embeddings.word_embeddings)
        if cfg.text.pretrained:
            self.load_pretrained(cfg.text.name)
        self.task_sampler = TaskSampler(
            {t: w for t, w in cfg.task_mix.items() if any(self.enabled(k) for k in TASK_LOSSES[t])}, cfg.task_seed)
        self.save_hyperparameters({"model": dataclasses.asdict(self.resolved_config())})

    def resolved_config(self) -> UNITERConfig:
        """``cfg`` with every text size explicit and no pretrained-weight loading: what this module is (so that
        ``vlp.models.load`` rebuilds it offline from the checkpoint)."""
        hf = self.hf_config
        text = explicit_text_config(self.cfg.text, hf)
        return dataclasses.replace(self.cfg, text=text)

    def load_pretrained(self, name_or_path: str) -> None:
        """BERT weights (hub name or local path) into the text embeddings, every layer of the stream, the MLM head
        and the pooler (``uniter-base-init.pt`` is BERT-base cased renamed); region embedder and region/ITM heads
        keep their init, as in the official ``from_pretrained``."""
        from transformers import BertModel

        from vlp.blocks.bert_pretrained import BertCheckpoint, load_bert_embeddings, load_bert_layers, load_mlm_head

        ckpt = BertCheckpoint.load(name_or_path, arch="bert")
        if ckpt.num_layers != self.encoder.depth:
            raise ValueError(f"{name_or_path}: {ckpt.num_layers} layers, UNITER's stream has {self.encoder.depth}")
        load_bert_embeddings(self.embeddings, ckpt)
        load_bert_layers(self.encoder, ckpt, range(self.encoder.depth))
        load_mlm_head(self.mlm_head, ckpt)
        pooler = BertModel.from_pretrained(name_or_path).pooler  # the masked-LM checkpoint drops the pooler
        if pooler is not None:
            self.pooler.dense.load_state_dict(pooler.dense.state_dict())

    def fsdp_blocks(self) -> list[nn.Module]:
        return stack_layers(self.encoder)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    # -- the contract (vlp.models.base) -------------------------------------------------------------------------------
    @property
    def retrieval_protocol(self) -> RetrievalProtocol:
        return RetrievalProtocol("all_pairs", "itm")

    @property
    def pooled_dim(self) -> int:
        return self.hf_config.hidden_size

    def encode_text(self, text: Text) -> Encoded:
        """Text embeddings [B, T, H] of ``[CLS] words [SEP]`` (token type 0, positions 0..T-1)."""
        return Encoded(self.embeddings(input_ids=text.input_ids), text.attention_mask, None)

    def encode_image(self, visual: Visual, masked: torch.Tensor | None = None) -> Encoded:
        """Region embeddings [B, N, H] and the region mask; ``masked`` [B, N]: regions replaced by the mask vector."""
        v = visual.require("features", "boxes", "mask", model="UNITER")
        type_embedding = self.embeddings.token_type_embeddings.weight[1]
        states = self.img_embeddings(v.features, v.boxes, type_embedding, masked)
        return Encoded(states, v.mask, None)

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        """The single stream over ``[text | regions]`` (joint keep-mask); pooled = the pooler on [CLS]."""
        states = torch.cat([text.states, image.states.to(text.states.dtype)], dim=1)
        mask = torch.cat([text.mask.long(), image.mask.long()], dim=1)
        hidden = self.encoder(states, mask)
        return Fused(hidden, self.pooler(hidden))

    def match_logits(self, fused: Fused) -> torch.Tensor:
        return self.itm_head(fused.pooled)

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[Visual, Text]:
        """Random regions (row i has ``6 - i`` real ones, at least 2; valid xyxy boxes; detector distributions) and
        random texts of different lengths."""
        g = torch.Generator().manual_seed(seed + 2)
        n, d, c = 6, self.cfg.region_dim, self.cfg.region_classes
        counts = [max(2, n - i) for i in range(batch_size)]
        mask = torch.arange(n).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
        corners = torch.rand(batch_size, n, 2, 2, generator=g).sort(dim=2).values  # [B, N, (lo, hi), (x, y)]
        boxes = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)
        features = torch.randn(batch_size, n, d, generator=g).relu()
        cls_prob = torch.randn(batch_size, n, c, generator=g).mul(2).softmax(-1)
        keep = mask.unsqueeze(-1).float()
        visual = Visual(features=features * keep, boxes=boxes * keep, mask=mask, cls_prob=cls_prob * keep)
        return visual, example_text(self.hf_config.vocab_size, batch_size, seed=seed)

    # -- pre-training -------------------------------------------------------------------------------------------------
    def sampling(self) -> bool:
        """Whether this call samples one task (training under a Trainer) or computes every active one."""
        return self._trainer is not None and self.training

    def active_tasks(self) -> list[str]:
        """The tasks that can be sampled: positive mix weight and at least one enabled loss."""
        return list(self.task_sampler.tasks)

    def task_of_step(self, step: int) -> str:
        return self.task_sampler(step)

    def _generator(self, task: str) -> torch.Generator:
        """This call's draws: ``step_generator`` salted with the task."""
        return self.step_generator("uniter-draws", self.cfg.task_seed, task)

    def task_outputs(self, batch: dict, task: str, generator: torch.Generator | None = None) -> dict:
        """One task's losses (enabled ones) and the tensors behind them (per-element losses, logits, states)."""
        if task not in TASKS:
            raise ValueError(f"unknown UNITER task {task!r}; expected one of {', '.join(TASKS)}")
        visual = Visual.from_batch(batch).require("features", "boxes", "mask", model="UNITER")
        ids, attn = batch["input_ids"], batch["attention_mask"]
        t_len = ids.shape[1]
        out: dict = {}

        if task == "mlm":
            if "mlm_input_ids" not in batch:
                raise ValueError("UNITER's MLM needs the batch keys mlm_input_ids / mlm_labels (the data collator "
                                 "masks with model.masking)")
            labels = batch["mlm_labels"]
            hidden = self.fuse(self.encode_image(visual), self.encode_text(Text(batch["mlm_input_ids"], attn))).states
            selected = labels != IGNORE_INDEX
            logits = self.mlm_head(hidden[:, :t_len][selected])
            targets = labels[selected]
            out.update(mlm=mlm_loss(logits, targets), mlm_logits=logits, mlm_targets=targets, states=hidden,
                       mlm_elements=F.cross_entropy(logits.detach().float(), targets, reduction="none"))
            return out

        if task in REGION_TASKS:
            masked = batch.get("region_masked")
            if masked is None:
                masked = region_mask(visual.mask, self.cfg.mrm_probability, generator)
            masked = masked.bool() & visual.mask.bool()
            hidden = self.fuse(self.encode_image(visual, masked), self.encode_text(Text(ids, attn))).states
            region_states = hidden[:, t_len:][masked]
            out.update(states=hidden, region_masked=masked)
            if task == "mrfr":
                pred = self.feat_regress(region_states)
                elements = mrfr_elements(pred, visual.features[masked])
                out.update(mrfr=elements.mean() if elements.numel() else elements.sum(), mrfr_elements=elements,
                           mrfr_pred=pred)
                return out
            if visual.cls_prob is None:
                raise ValueError(f"UNITER's {task} needs the detector's class probabilities (batch key "
                                 "region_cls_prob: regions.npz cls_prob)")
            logits = self.region_classifier(region_states)
            target = visual.cls_prob[masked]
            if task == "mrc_kl":
                elements = mrc_kl_elements(logits, target)
                out.update(mrc_kl=elements.mean() if elements.numel() else elements.sum(), mrc_kl_elements=elements)
            else:
                out["mrc"] = mrc_loss(logits, target, self.cfg.mrc_skip_background)
            out["mrc_logits"], out["mrc_target"] = logits, target
            return out

        # itm (+ WRA)
        if "itm_labels" in batch:
            labels = batch["itm_labels"]
            index = batch.get("itm_image_index", torch.arange(ids.shape[0], device=ids.device))
        else:
            index, labels = draw_itm_pairs(ids.shape[0], batch.get("image_ids"), self.cfg.itm_neg_prob, generator,
                                           device=ids.device)
        image = self.encode_image(visual.select(index))
        fused = self.fuse(image, self.encode_text(Text(ids, attn)))
        logits = self.itm_head(fused.pooled)
        out.update(itm_logits=logits, itm_labels=labels, itm_image_index=index, states=fused.states)
        if self.enabled("itm"):
            out["itm"] = itm_loss(logits, labels)
        if self.enabled("ot"):
            dist = ot_distance(fused.states[:, :t_len], fused.states[:, t_len:], attn, image.mask,
                               self.cfg.ot_beta, self.cfg.ot_iterations)
            out.update(ot=wra_loss(dist, labels), ot_distance=dist)
        return out

    def tasks_for_call(self) -> list[str]:
        """The sampled task of this optimizer step under a Trainer, else every active task."""
        if self.sampling():
            return [self.task_of_step(int(self.global_step))]
        return self.active_tasks()

    def step(self, batch: dict) -> Step:
        losses, metrics = {}, {}
        tasks = self.tasks_for_call()
        for task in tasks:
            out = self.task_outputs(batch, task, self._generator(task))
            losses.update({k: out[k] for k in TASK_LOSSES[task] if k in out and self.enabled(k)})
            with torch.no_grad():
                if task == "mlm" and out["mlm_targets"].numel():
                    metrics["mlm_acc"] = (out["mlm_logits"].argmax(-1) == out["mlm_targets"]).float().mean()
                if task == "itm":
                    metrics["itm_acc"] = (out["itm_logits"].argmax(-1) == out["itm_labels"]).float().mean()
                    if "ot_distance" in out:
                        pos = out["itm_labels"].bool()
                        if pos.any():
                            metrics["ot_pos"] = out["ot_distance"][pos].mean()
                        if (~pos).any():
                            metrics["ot_neg"] = out["ot_distance"][~pos].mean()
                if task in ("mrc", "mrc_kl") and out["mrc_target"].numel():
                    # mrc: the hard label it trains on; mrc_kl: the detector's argmax (background included)
                    hard = (mrc_targets(out["mrc_target"], self.cfg.mrc_skip_background) if task == "mrc"
                            else out["mrc_target"].argmax(-1))
                    metrics[f"{task}_acc"] = (out["mrc_logits"].argmax(-1) == hard).float().mean()
        if self.sampling():
            metrics["task"] = float(TASKS.index(tasks[0]))
            if self.cfg.touch_unused and losses:
                first = next(iter(losses))
                # Under FSDP2 the blocks' parameters are shards (DTensors) here and every task runs every block;
                # the heads a task may leave unused are the step's gathered copies, touched as under DDP.
                touch = sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad and not is_shard(p))
                losses[first] = losses[first] + 0.0 * touch
        return Step(losses, metrics)
