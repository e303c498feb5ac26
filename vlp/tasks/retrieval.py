"""Image-text retrieval fine-tuning: ``RetrievalTask`` trains any pre-trained model through the model contract
(``vlp.models.base``: ``encode_image``, ``encode_text``, ``fuse``, ``match_logits``) with its paper's retrieval
objective, on ``data.task: retrieval`` batches (image + caption pairs, nothing masked), then evaluates with the
model's own retrieval protocol (``vlp.eval.run.evaluate_retrieval_run``) into the run's results.json.

Objectives (``RetrievalObjective``; each model's paper default in ``OBJECTIVES``, changed field by field by the
config's ``finetune.retrieval``), built from the shared losses:

* ``itc_itm`` (TCL/ALBEF ``model_retrieval.py``, BridgeTower ``irtr_itm_itc``, MVPTR ``BiImageBertForRetrieval``):
  ``itc = (i2t + t2i) / 2``, InfoNCE of the contrastive embeddings at the model's temperature with every caption of
  the same image a positive (``info_nce(query_ids=image_ids)``, keys gathered from every rank with gradient), plus
  ``itm``, cross-entropy of ``match_logits`` over the positives and hard negatives mined from this rank's
  similarities: ``local-hard`` (ALBEF/TCL/BridgeTower: one negative image per text and one negative text per image,
  drawn from the softmax of the similarities, ``sample_negatives`` + ``itm_triplets``) or ``hardest`` (MVPTR: the
  argmax, half text-anchored, half image-anchored, ``hardest_negatives``). Loss = itc + itm.
* ``hinge`` (UNITER ``UniterForImageTextRetrievalHardNeg``): a pair's score is ``sigmoid(match_logits[:, 1])``
  (the official rank head is initialised from this ITM row, so the two start equal); for every text,
  ``candidates`` other images of the batch are drawn, scored without gradient in eval mode, and the ``hard_negatives``
  best kept, and likewise texts for every image; loss = ``hinge_rank_loss(pos, [hard images ; hard texts],
  margin)`` (``vlp.losses.ranking``).

Random draws (negatives, the MVPTR permutation, UNITER's candidates) come from the model's ``step_generator``: a
pure function of (seed, step, rank), so a resumed run draws what the uninterrupted one did.

Where we differ from the official code, on purpose:

* one objective through the contract for every model: TCL's retrieval fine-tuning also keeps its momentum
  encoders (distilled targets, the queue of features and image ids) and the intra-modal and local terms; here the
  momentum twins stay in the checkpoint unused, and the loss is ALBEF-style ITC + ITM without a queue;
* UNITER draws its candidates from the batch (the official sampler draws 399 from the whole split per anchor and
  trains on 31, one anchor per "batch" accumulated 8 times): a fine-tuning step here costs ``2 B candidates`` pair
  scores without gradient and ``B (1 + 2 hard_negatives)`` with;
* UNITER's rank score is the ITM head's matched logit instead of a new Linear(H, 1) copied from it: the same
  function at the start, and retrieval evaluation reads ``match_logits[:, 1]`` for every model.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import lightning as L
import torch

from vlp.config import ConfigError, OptimConfig
from vlp.data.visual import Visual
from vlp.losses.contrastive import Temperature, info_nce
from vlp.losses.matching import hardest_negatives, itm_loss, itm_triplets, sample_negatives, valid_negative_mask
from vlp.losses.ranking import draw_candidates, hardest_candidates, hinge_rank_loss
from vlp.models.base import Encoded, Step, Text, configure_adamw
from vlp.tasks.common import freeze_unreached, group_keys, init_from_checkpoint, log_learning_rate

__all__ = ["RetrievalObjective", "OBJECTIVES", "RetrievalTask", "contrastive_temperature",
           "prepare", "build", "evaluate_run"]

LOSSES = ("itc_itm", "hinge")
ITM_NEGATIVES = ("local-hard", "hardest")


@dataclass(frozen=True)
class RetrievalObjective:
    """What ``RetrievalTask`` minimises (see the module docstring)."""

    loss: str = "itc_itm"  # itc_itm | hinge
    itm_negatives: str = "local-hard"  # itc_itm: local-hard (sampled) | hardest (argmax)
    margin: float = 0.2  # hinge
    candidates: int = 7  # hinge: negatives drawn per anchor and direction, scored without gradient
    hard_negatives: int = 1  # hinge: the best-scored candidates trained on, per anchor and direction

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"retrieval objective: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"retrieval objective: itm_negatives must be one of {', '.join(ITM_NEGATIVES)}, got "
                             f"{self.itm_negatives!r}")
        if not 1 <= self.hard_negatives <= self.candidates:
            raise ValueError(f"retrieval objective: need 1 <= hard_negatives ({self.hard_negatives}) <= candidates "
                             f"({self.candidates})")


# Each paper's retrieval fine-tuning objective.
OBJECTIVES = {
    "tcl": RetrievalObjective("itc_itm", "local-hard"),
    "bridgetower": RetrievalObjective("itc_itm", "local-hard"),
    "mvptr": RetrievalObjective("itc_itm", "hardest"),
    "uniter": RetrievalObjective("hinge"),
}


def contrastive_temperature(model) -> torch.Tensor:
    """The temperature of the model's contrastive head: TCL's clamped ``temp``, BridgeTower's ``itc_temp``, MVPTR's
    ``1 / exp(logit_scale)``."""
    for name in ("temp", "itc_temp"):
        if isinstance(getattr(model, name, None), Temperature):
            return getattr(model, name)()
    if callable(getattr(model, "scale", None)):
        return 1.0 / model.scale()
    raise TypeError(f"{type(model).__name__} has no contrastive temperature (temp, itc_temp or scale())")


class RetrievalTask(L.LightningModule):
    """Retrieval fine-tuning of ``model`` with ``objective`` (see the module docstring); ``seed`` seeds its draws."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig | None = None,
                 objective: RetrievalObjective | None = None, *, seed: int = 0):
        super().__init__()
        for method in ("encode_image", "encode_text", "fuse", "match_logits", "example_inputs", "step_generator"):
            if not callable(getattr(model, method, None)):
                raise TypeError(f"{type(model).__name__} has no {method}() (vlp.models.base contract): it cannot be "
                                "fine-tuned for retrieval")
        self.objective = objective or RetrievalObjective()
        if self.objective.loss == "itc_itm" and not model.has_contrastive_head:
            raise ValueError(f"this {type(model).__name__} has no contrastive head, which the itc_itm retrieval "
                             "objective trains (BridgeTower: pre-train with model.loss_weights.itc > 0)")
        self.model = model
        self.optim_cfg = optim or OptimConfig()
        self.seed = int(seed)
        self.total_steps: int | None = None  # set by the entry point from max_steps or the loader length
        # The weights the run started from: kept in its checkpoints, since a resumed run's ckpt= is not read
        self.init_from: str | None = None
        hp = dict(getattr(model, "hparams", {}) or {})
        self.save_hyperparameters({"task": "retrieval", "model": hp.get("model"),
                                   "objective": dataclasses.asdict(self.objective)})

    # -- the objectives -----------------------------------------------------------------------------------------------
    def step(self, visual: Visual, text: Text, image_ids: torch.Tensor,
             generator: torch.Generator | None = None) -> Step:
        """The losses and metrics of one batch of aligned (image i, text i) pairs; ``image_ids`` [B] tell which
        pairs show the same image (never negatives of each other); ``generator`` drives every draw."""
        image, txt = self.model.encode_image(visual), self.model.encode_text(text)
        image_ids = image_ids.to(txt.states.device)
        if self.objective.loss == "hinge":
            return self._hinge(image, txt, image_ids, generator)
        return self._itc_itm(image, txt, image_ids, generator)

    def _itc_itm(self, image: Encoded, text: Encoded, image_ids: torch.Tensor, generator) -> Step:
        m, b = self.model, image_ids.shape[0]
        temp = contrastive_temperature(m)
        itc = (info_nce(image.embedding, text.embedding, temp, gather=True, query_ids=image_ids)
               + info_nce(text.embedding, image.embedding, temp, gather=True, query_ids=image_ids)) / 2
        with torch.no_grad():
            sim_i2t = image.embedding.detach().float() @ text.embedding.detach().float().t() / temp.detach()
            if self.objective.itm_negatives == "local-hard":
                neg_image, neg_text = sample_negatives(sim_i2t, sim_i2t.t(), "local-hard", image_ids, generator)
                image_index, text_index, labels = itm_triplets(neg_image, neg_text)
            else:
                order = torch.randperm(b, generator=generator).to(image_ids.device)
                neg_text, neg_image = hardest_negatives(sim_i2t.t(), order, image_ids)
                rows = torch.arange(b, device=image_ids.device)
                image_index, text_index = torch.cat([rows, neg_image]), torch.cat([rows, neg_text])
                labels = (torch.arange(2 * b, device=image_ids.device) < b).long()
        logits = m.match_logits(m.fuse(image.select(image_index), text.select(text_index)))
        itm = itm_loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return Step({"itc": itc, "itm": itm}, {"itm_acc": acc, "temp": temp.detach().reshape(())})

    def _pair_scores(self, image: Encoded, text: Encoded, image_index: torch.Tensor,
                     text_index: torch.Tensor) -> torch.Tensor:
        m = self.model
        return torch.sigmoid(m.match_logits(m.fuse(image.select(image_index), text.select(text_index)))[:, 1].float())

    def _hinge(self, image: Encoded, text: Encoded, image_ids: torch.Tensor, generator) -> Step:
        o, b, device = self.objective, image_ids.shape[0], image_ids.device
        valid = valid_negative_mask(b, b, 0, image_ids, image_ids, device=device)  # symmetric: both directions
        n = min(o.candidates, int(valid.sum(1).min()))
        if n < o.hard_negatives:
            raise ValueError(f"retrieval hinge: a batch row has only {n} valid negatives, fewer than "
                             f"hard_negatives={o.hard_negatives} (batch of {b} pairs)")
        rows = torch.arange(b, device=device)
        with torch.no_grad():
            cand_image = draw_candidates(valid, n, generator)  # [B, n]: images for text i
            cand_text = draw_candidates(valid, n, generator)  # [B, n]: texts for image j
            was_training = self.model.training
            self.model.eval()  # the official scores its candidates in eval mode (no dropout)
            try:
                anchors = rows.repeat_interleave(n)
                s_image = self._pair_scores(image, text, cand_image.reshape(-1), anchors).view(b, n)
                s_text = self._pair_scores(image, text, anchors, cand_text.reshape(-1)).view(b, n)
            finally:
                self.model.train(was_training)
            k = o.hard_negatives
            hard_image = hardest_candidates(s_image, cand_image, k)
            hard_text = hardest_candidates(s_text, cand_text, k)
            anchors = rows.repeat_interleave(k)
            image_index = torch.cat([rows, hard_image.reshape(-1), anchors])
            text_index = torch.cat([rows, anchors, hard_text.reshape(-1)])
        scores = self._pair_scores(image, text, image_index, text_index)
        pos = scores[:b]
        neg = torch.cat([scores[b: b + b * k].view(b, k), scores[b + b * k:].view(b, k)], dim=1)
        with torch.no_grad():
            acc = (pos.unsqueeze(1) > neg).all(1).float().mean()
        return Step({"rank": hinge_rank_loss(pos, neg, o.margin)}, {"rank_acc": acc})

    def probe_loss(self) -> torch.Tensor:
        """The objective on the model's own ``example_inputs`` (4 pairs of different images): what
        ``freeze_unreached`` back-propagates."""
        visual, text = self.model.example_inputs(4)
        device = next(self.model.parameters()).device
        step = self.step(visual.to(device), text.to(device), torch.arange(4), torch.Generator().manual_seed(0))
        return sum(step.losses.values())

    # -- Lightning ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = self.model.step_generator("retrieval-draws", self.seed)
        out = self.step(Visual.from_batch(batch), Text.from_batch(batch), batch["image_ids"], generator)
        loss = sum(out.losses.values())
        if self._trainer is None:  # called outside a Trainer (tests, notebooks): nothing to log to
            return loss
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.losses.items()}, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in out.metrics.items()}, batch_size=bs)
        if "n_corrupt" in batch:
            self.log("data/corrupt", float(batch["n_corrupt"]), reduce_fx="max", batch_size=bs)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        log_learning_rate(self)

    def configure_optimizers(self):
        return configure_adamw(self, self.optim_cfg, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vlp_init_from"] = self.init_from

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.init_from = checkpoint.get("vlp_init_from", self.init_from)


# -- what `vlp finetune` calls (vlp.tasks protocol) -------------------------------------------------------------------
def objective_for(cfg) -> RetrievalObjective:
    """The model's paper objective (``OBJECTIVES``) with the fields ``finetune.retrieval`` sets."""
    if cfg.model is None:
        raise ConfigError("the experiment has no 'model' section")
    if cfg.model.name not in OBJECTIVES:
        raise ConfigError(f"model {cfg.model.name!r} has no retrieval objective; known: {', '.join(OBJECTIVES)}")
    chosen = {k: v for k, v in dataclasses.asdict(cfg.finetune.retrieval).items() if v is not None}
    try:
        return dataclasses.replace(OBJECTIVES[cfg.model.name], **chosen)
    except ValueError as e:
        raise ConfigError(f"finetune.retrieval: {e}") from None


def prepare(cfg, dm):
    """Nothing the data decides; checks that the model has a retrieval objective."""
    objective_for(cfg)
    return cfg


def build(cfg, dm, init: bool = True) -> RetrievalTask:
    """The task on ``cfg.model``; with ``init``, every weight from ``cfg.ckpt`` (required unless
    ``finetune.from_scratch``; retrieval adds no head). Parameters the objective does not reach are frozen."""
    from vlp.models import build as build_model

    model = build_model(cfg.model, cfg.optim)
    task = RetrievalTask(model, cfg.optim, objective_for(cfg), seed=cfg.seed)
    if init:
        task.init_from = cfg.ckpt or "scratch"
        init_from_checkpoint(model, cfg)
    frozen = freeze_unreached(model, task.probe_loss)
    if frozen:
        print(f"frozen (not used by retrieval): {group_keys(frozen)}")
    return task


def evaluate_run(cfg, task: RetrievalTask, dm, trainer) -> dict:
    """Retrieval on ``data.<eval.split>`` by the model's protocol (``vlp.eval.run``), in ``<run>/results.json`` as
    ``retrieval`` (this run's ``data.task: retrieval`` tells it from a zero-shot evaluation in ``vlp compare``), with
    the checkpoint it started from and the objective."""
    from vlp.eval.results import write_results
    from vlp.eval.run import evaluate_retrieval_run

    if not getattr(cfg.data, cfg.eval.split, None):
        warnings.warn(f"no evaluation: data.{cfg.eval.split} is not set (eval.split={cfg.eval.split})", stacklevel=2)
        return {}
    results = evaluate_retrieval_run(cfg, task.model, dm, trainer)
    if trainer is not None and not trainer.is_global_zero:
        return {}
    extra = {"retrieval_init": task.init_from or cfg.ckpt or "scratch", "retrieval_objective": dataclasses.asdict(task.objective)}
    return write_results(cfg.run_dir, extra, model=cfg.model.name, step=results.get("step"))
