"""VQA fine-tuning: ``VQATask`` wraps any pre-trained model through the model contract (``vlp.models.base``):
``fuse(encode_image(visual), encode_text(question))`` then the shared VQA head on ``Fused.pooled``
(``vqa_logits``: Linear, LayerNorm, GELU, Linear as BridgeTower's classifier, UNITER's order by config) and the
shared loss (``vqa_loss``: BCE x number of answers, the official ``compute_vqa``), on ``data.task: vqa`` batches
(see ``vlp.data.collate``). Pixels or regions: the task never looks inside the visual input.

* Data: a VQA shard sample is an image with all its questions. Training visits an image once per pass of the stream
  and uses ONE of its questions, chosen deterministically from (seed, key, visit) so that every n consecutive visits
  of an image with n questions use each question once (``SampleProcessor.question_index``); this keeps the stream's
  exact resume. A source's ``weight`` is its passes per epoch: weight = questions per image (~5.4 for VQA v2) makes
  an epoch see as many (image, question) examples as the split has questions, as the paper's epochs do.
  Evaluation reads every question of the split once, in order.
* Initialisation: ``vlp.tasks.common.load_pretrained`` reads a vlp checkpoint (``vlp pretrain``'s ``last.ckpt`` or ``vlp convert``'s
  output, with ``weights_only=True``) and reports which weights were loaded, which are new (the VQA head) and which
  were dropped (pre-training heads VQA does not use); anything else missing is an error (``finetune.strict``).
* Parameters that the VQA forward never reaches (pre-training heads) are frozen at build time (``freeze_unused``), so
  DDP needs no ``find_unused_parameters`` and the optimizer leaves them alone.
* Optimisation: AdamW groups of ``vlp.models.base.param_groups`` with ``optim.lr_mult`` (paper: ``vqa_head`` x50,
  ``cross_modal`` x5), the warm-up + linear schedule of ``vlp.models.base.lr_lambda``.
* Metrics: ``train/loss``, ``train/vqa_score`` (batch), ``val/vqa_score`` (when validation runs) and, after
  training, the VQA score on ``data.<eval.split>`` (``vlp.eval.vqa.VQAScore``: the soft score of the argmax answer,
  percent) in ``<run>/results.json`` as ``{"vqa": {"score", "split", "step", ...}}``, plus the predictions as
  ``<run>/vqa_<split>_predictions.json`` ([{question_id, answer}], the eval.ai format) for test-dev submissions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings

import lightning as L
import torch

from vlp.config import ConfigError, OptimConfig
from vlp.data.visual import Visual
from vlp.eval.vqa import VQAScore
from vlp.models.base import Text, configure_adamw
from vlp.tasks.common import freeze_unreached, group_keys, init_from_checkpoint, log_learning_rate

log = logging.getLogger("vlp")

__all__ = ["VQATask", "prepare", "build", "evaluate_run"]

HEAD_PREFIX = "vqa_head."  # the model's VQA head: new when fine-tuning starts from a pre-training checkpoint


# -- the task ---------------------------------------------------------------------------------------------------------
class VQATask(L.LightningModule):
    """VQA fine-tuning of ``model`` (see the module docstring). ``answers``: the vocabulary (index = label), for the
    predictions file; ``eval_chunk``: most (image, question) rows per forward in evaluation."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig | None = None, *, answers: list[str] | None = None,
                 eval_chunk: int = 128):
        super().__init__()
        for method in ("encode_image", "encode_text", "fuse", "vqa_logits", "vqa_loss", "example_inputs"):
            if not callable(getattr(model, method, None)):
                raise TypeError(f"{type(model).__name__} has no {method}() (vlp.models.base contract): it cannot be "
                                "fine-tuned for VQA")
        self.model = model
        self.optim_cfg = optim or OptimConfig()
        self.answers = list(answers) if answers is not None else None
        self.eval_chunk = eval_chunk
        self.init_from: str | None = None  # the start (ckpt or "scratch"), kept in its checkpoints for resumes
        self.total_steps: int | None = None  # set by the entry point from max_steps or the loader length
        self.eval_split = "test"  # the name the evaluation after training logs under
        self.val_score = VQAScore()
        self.test_score = VQAScore()
        self.predictions: dict[int, int] = {}  # question_id -> answer index, from the last test run (this rank)
        self.last_eval: dict = {}
        hp = dict(getattr(model, "hparams", {}) or {})
        self.save_hyperparameters({"task": "vqa", "model": hp.get("model"), "answers": self.answers})

    # -- model side ---------------------------------------------------------------------------------------------------
    @staticmethod
    def question_visuals(batch: dict) -> Visual:
        """The image (pixels or regions) of every (image, question) row: the batch's own when each image has one
        question."""
        visual, index = Visual.from_batch(batch), batch["question_image"]
        return visual if index.shape[0] == visual.batch_size else visual.select(index)

    def forward(self, visual: Visual, text: Text) -> torch.Tensor:
        m = self.model
        return m.vqa_logits(m.fuse(m.encode_image(visual), m.encode_text(text)))

    def answer_logits(self, batch: dict) -> torch.Tensor:
        """Logits [Q, A] of every row of an evaluation batch, at most ``eval_chunk`` rows per forward."""
        visual, index, text = Visual.from_batch(batch), batch["question_image"], Text.from_batch(batch)
        out = []
        for s in range(0, index.shape[0], self.eval_chunk):
            rows = torch.arange(s, min(s + self.eval_chunk, index.shape[0]), device=index.device)
            out.append(self(visual.select(index[rows]), text.select(rows)))
        return torch.cat(out)

    def freeze_unused(self) -> list[str]:
        """Freeze the parameters one VQA forward/backward does not reach, and return their names. Probes with the
        model's ``example_inputs`` (its own input sizes; questions with padding)."""
        device = next(self.model.parameters()).device
        visual, text = self.model.example_inputs(2)
        return freeze_unreached(self.model, lambda: self(visual.to(device), text.to(device)).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(self.question_visuals(batch), Text.from_batch(batch))
        targets = batch["vqa_targets"]
        loss = self.model.vqa_loss(logits, targets)
        bs = logits.shape[0]
        if self._trainer is None:  # called outside a Trainer (tests, notebooks): nothing to log to
            return loss
        with torch.no_grad():
            score = 100.0 * targets.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/vqa_score", score, prog_bar=True, batch_size=bs)
        if "n_corrupt" in batch:
            self.log("data/corrupt", float(batch["n_corrupt"]), reduce_fx="max", batch_size=bs)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        log_learning_rate(self)

    def _eval_step(self, batch: dict, metric: VQAScore) -> torch.Tensor:
        logits = self.answer_logits(batch)
        answered = batch["vqa_answered"]
        if bool(answered.any()):
            metric.update(logits[answered], batch["vqa_targets"][answered])
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_score)
        self.log("val/vqa_score", self.val_score, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vlp_init_from"] = self.init_from

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.init_from = checkpoint.get("vlp_init_from", self.init_from)

    def on_test_epoch_start(self) -> None:
        self.predictions = {}
        self.test_score.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.test_score)
        self.predictions.update(zip(batch["question_ids"].tolist(), logits.argmax(1).tolist()))

    def on_test_epoch_end(self) -> None:
        answered = int(self.test_score.count)  # this rank's (every rank reads the whole split)
        score = self.test_score.compute() if answered else torch.tensor(float("nan"))
        self.last_eval = {"score": float(score) if answered else None, "questions": len(self.predictions),
                          "answered": answered}
        if answered:
            self.log(f"{self.eval_split}/vqa_score", score.to(self.device), batch_size=1)

    def configure_optimizers(self):
        return configure_adamw(self, self.optim_cfg, self.total_steps)


# -- what `vlp finetune` calls (vlp.tasks protocol) -------------------------------------------------------------------
def prepare(cfg, dm):
    """``model.num_answers`` from the data's answer vocabulary (0 in the config: take it; else they must agree)."""
    if cfg.model is None:
        raise ConfigError("the experiment has no 'model' section")
    if not hasattr(cfg.model, "num_answers"):
        raise ConfigError(f"model {cfg.model.name!r} has no VQA head (no num_answers field)")
    n = dm.num_answers
    if cfg.model.num_answers not in (0, n):
        raise ConfigError(f"model.num_answers={cfg.model.num_answers} but the answer vocabulary has {n} answers; "
                          "set model.num_answers=0 to take it from the data")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_answers=n))


def build(cfg, dm, init: bool = True) -> VQATask:
    """The task on ``cfg.model``; with ``init``, weights from ``cfg.ckpt`` (required unless
    ``finetune.from_scratch``). Parameters the VQA forward does not use are frozen."""
    from vlp.models import build as build_model

    model = build_model(cfg.model, cfg.optim)
    task = VQATask(model, cfg.optim, answers=dm.answers, eval_chunk=cfg.data.eval_batch_size)
    if init:
        task.init_from = cfg.ckpt or "scratch"
        init_from_checkpoint(model, cfg, new_prefixes=(HEAD_PREFIX,))
    frozen = task.freeze_unused()
    if frozen:
        print(f"frozen (not used by VQA): {group_keys(frozen)}")
    return task


def evaluate_run(cfg, task: VQATask, dm, trainer) -> dict:
    """VQA score on ``data.<eval.split>`` with the trainer (its devices and precision), merged into
    ``<run>/results.json`` as ``{"vqa": {score, split, step, questions, ...}}``; predictions written (rank 0)."""
    from vlp.eval.results import write_results
    from vlp.utils.io import atomic_write_text

    split = cfg.eval.split
    if not getattr(cfg.data, split, None):
        warnings.warn(f"no evaluation: data.{split} is not set (eval.split={split})", stacklevel=2)
        return {}
    t0 = time.time()
    task.eval_split = split
    trainer.test(task, dataloaders=dm.eval_dataloader(split), verbose=False)
    if not trainer.is_global_zero:
        return {}
    res = task.last_eval
    step = trainer.global_step
    section = {"score": res["score"], "split": split, "step": step, "questions": res["questions"],
               "answered": res["answered"], "init": task.init_from or cfg.ckpt or "scratch", "seconds": round(time.time() - t0, 1)}
    if cfg.finetune.predictions and task.answers is not None:
        path = cfg.run_dir / f"vqa_{split}_predictions.json"
        preds = [{"question_id": q, "answer": task.answers[a]} for q, a in sorted(task.predictions.items())]
        atomic_write_text(path, json.dumps(preds) + "\n")
        section["predictions"] = path.name
    results = write_results(cfg.run_dir, {"vqa": section}, model=cfg.model.name, step=step)
    if res["score"] is None:
        print(f"VQA on {split}: {res['questions']} questions, none with answers: submit "
              f"{section.get('predictions', 'the predictions')} to the evaluation server")
    else:
        print(f"VQA score on {split} ({res['answered']} questions, step {step}): {res['score']:.2f}")
    return results
