"""The model contract (DESIGN §5) and what every pre-training LightningModule shares: parameter groups, the
learning-rate schedule, loss weighting, logging, the VQA head.

Every paper's module, whether it reads pixels or detector regions, is used by the rest of the suite (retrieval, VQA,
the contract tests) only through this interface::

    reads                         which inputs the model needs: {"pixels"} or {"regions", ...} (``READS``)
    encode_image(visual) -> Encoded   visual: vlp.data.visual.Visual (pixels, or padded regions)
    encode_text(text)    -> Encoded   text: Text(input_ids, attention_mask)
    fuse(image, text)    -> Fused     the joint states and the pooled vector the heads read
    match_logits(fused)  -> [B, 2]    ITM logits, index 1 = matched (converters absorb a paper's own convention)
    vqa_logits(fused)    -> [B, A]    the shared VQA head on ``fused.pooled`` (when ``num_answers`` > 0)
    step(batch)          -> Step      {name: loss} and {name: metric} apart; ``compute_losses`` = its losses
    has_contrastive_head              ``Encoded.embedding`` is a trained contrastive embedding
    retrieval_protocol                the paper's default (first stage, combination) for ``vlp.eval``

``encode_image``/``encode_text`` are what retrieval caches once per image and text; ``fuse`` is what it runs per
candidate pair. A single-stream model (UNITER) returns embedded, not yet encoded, tokens from the ``encode_*`` methods
and does all its work in ``fuse``; a two-stream model returns its uni-modal encoders' states.

Random draws (DESIGN §7). A model draws from torch's (or numpy's, Python's) global generators -- dropout, ITM
negatives (``sample_negatives``), BridgeTower's image swap (``swap_images_for_itm``), in-model masking -- or from a
``torch.Generator`` it is handed, and keeps no generator of its own. ``vlp.train`` re-seeds the global generators
before every training micro-batch from (seed, global step, rank, micro-batch index in the accumulation window)
(``vlp.utils.rng.StepSeeding``), so every draw of a step is a pure function of those and a resumed run is bitwise
equal to an uninterrupted one; no model does anything for it. Data-side randomness (augmentation, caption choice,
collator masking) is seeded per sample in ``vlp.data.collate``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Optional

import lightning as L
import torch
from torch import nn

from vlp.config import OptimConfig
from vlp.data.visual import Visual
from vlp.losses.vqa import vqa_bce_loss


def param_groups(module: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: weight decay except on 1-d tensors and biases (the ALBEF/TCL rule), and per-name lr multipliers.

    ``optim.lr_mult`` maps a name substring to a multiplier (BridgeTower: ``cross_modal: 5``); the first matching
    substring wins, in the order written. Frozen parameters (momentum twins) are left out.
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = optim.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias"))
        wd = 0.0 if no_decay else optim.weight_decay
        mult = next((m for key, m in optim.lr_mult.items() if key in name), 1.0)
        groups.setdefault((wd, mult), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr": optim.lr * mult, "lr_mult": mult}
        for (wd, mult), ps in sorted(groups.items())
    ]


def _tcl_official_lambda(optim: OptimConfig):
    """Step -> multiplier of the peak lr for ``schedule: tcl_official``: the official TCL/ALBEF pre-training
    schedule, i.e. its timm ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1)`` stepped as ``Pretrain.py`` steps it:

    * epoch 0, iteration i: after the optimizer step of every i that is a multiple of ``warmup_step_size`` (S) up
      to ``warmup_epochs * S``, ``scheduler.step(i // S)``; so iteration i runs at tick t = min(W, (i - 1) // S)
      (t = 0 for i = 0, the value the scheduler starts with);
    * epoch e > 0: ``scheduler.step(e + warmup_epochs)`` before the epoch, so the whole epoch runs at tick W + e;
    * tick t: ``warmup_lr + t (lr - warmup_lr) / W`` while t < W, then the cosine at c = t - W:
      ``min_lr + (lr - min_lr)(1 + cos(pi c / epochs)) / 2`` while c < epochs, and ``min_lr`` once c >= epochs
      (timm ends its single cycle there). ``decay_rate`` scales only cycles after the first, which one cycle never
      reaches: the official ``decay_rate: 1`` has no effect, so there is no such field.

    As every schedule here it multiplies each parameter group's peak (``lr`` x its ``lr_mult``; the official code
    has one group lr), so warmup_lr / min_lr scale with a group's multiplier."""
    for key in ("epochs", "steps_per_epoch", "warmup_step_size"):
        if getattr(optim, key) < 1:
            raise ValueError(f"optim.{key}: schedule tcl_official needs a positive value, got {getattr(optim, key)} "
                             f"(steps_per_epoch 0 is filled from the training loader by vlp.train)")
    if optim.warmup_epochs < 0:
        raise ValueError(f"optim.warmup_epochs: expected >= 0 warm-up ticks, got {optim.warmup_epochs}")
    ticks, size, epochs = optim.warmup_epochs, optim.warmup_step_size, optim.epochs
    start, floor = optim.warmup_start_lr / optim.lr, optim.min_lr / optim.lr

    def at_tick(t: int) -> float:  # timm's _get_lr(t) / lr
        if t < ticks:
            return start + t * (1.0 - start) / ticks
        c = t - ticks
        return floor if c >= epochs else floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * c / epochs))

    def fn(step: int) -> float:
        epoch, i = divmod(step, optim.steps_per_epoch)
        return at_tick(min(ticks, max(0, (i - 1) // size)) if epoch == 0 else epoch + ticks)

    return fn


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Step -> multiplier of the peak lr: linear warm-up from ``warmup_start_lr``, then cosine/linear to ``min_lr``;
    or the official TCL schedule, stepped per epoch (``schedule: tcl_official``, see ``_tcl_official_lambda``)."""
    if optim.schedule == "tcl_official":
        return _tcl_official_lambda(optim)
    warmup = optim.warmup_steps or int(round(optim.warmup_ratio * total_steps))
    start = optim.warmup_start_lr / optim.lr
    floor = optim.min_lr / optim.lr

    def fn(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / max(1, warmup)
        if optim.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if optim.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}; expected cosine, linear, constant or "
                         f"tcl_official")

    return fn


def configure_adamw(module: L.LightningModule, optim: OptimConfig, total_steps: int | None) -> dict:
    """AdamW over ``param_groups`` with the warm-up + decay schedule stepped per optimizer step (Lightning's
    ``configure_optimizers`` return value); ``total_steps`` falls back to ``trainer.max_steps``."""
    opt = torch.optim.AdamW(param_groups(module, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    total = total_steps or max(1, module.trainer.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# -- the contract's types ---------------------------------------------------------------------------------------------
READS = ("pixels", "regions", "tags", "phrases")


class Text(NamedTuple):
    """Token ids and their keep-mask, [B, T] each (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict, ids_key: str = "input_ids") -> "Text":
        return cls(batch[ids_key], batch["attention_mask"])

    def select(self, index: torch.Tensor) -> "Text":
        return Text(self.input_ids.index_select(0, index), self.attention_mask.index_select(0, index))

    def to(self, device) -> "Text":
        return Text(self.input_ids.to(device), self.attention_mask.to(device))


class Encoded(NamedTuple):
    """One modality, encoded. ``states`` [B, N, D], or [B, K, N, D] when a model keeps K layers per item
    (BridgeTower's bridges): the token axis is always -2. ``mask`` [B, N], True/1 on real tokens. ``embedding``
    [B, E]: the L2-normalised contrastive embedding, or None for a model without a contrastive head."""

    states: torch.Tensor
    mask: torch.Tensor
    embedding: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> "Encoded":
        index = index.to(self.states.device)
        emb = None if self.embedding is None else self.embedding.index_select(0, index)
        return Encoded(self.states.index_select(0, index), self.mask.index_select(0, index), emb)

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        """Concatenate along the batch, zero-padding the token axis to the longest part (the padding is masked out),
        so batches with different region counts or text lengths stack into one cache."""
        if not parts:
            raise ValueError("Encoded.cat: nothing to concatenate")
        n = max(p.states.shape[-2] for p in parts)
        states, masks = [], []
        for p in parts:
            pad = n - p.states.shape[-2]
            states.append(torch.nn.functional.pad(p.states, (0, 0, 0, pad)) if pad else p.states)
            masks.append(torch.nn.functional.pad(p.mask, (0, pad)) if pad else p.mask)
        embs = [p.embedding for p in parts]
        emb = None if any(e is None for e in embs) else torch.cat(embs)
        return Encoded(torch.cat(states), torch.cat(masks), emb)


class Fused(NamedTuple):
    """The joint encoding of aligned (image, text) pairs: ``states`` [B, L, H] (the text stream of a two-stream
    model, the whole joint sequence of a single-stream one) and ``pooled`` [B, P], what the ITM and VQA heads read."""

    states: torch.Tensor
    pooled: torch.Tensor


class Step(NamedTuple):
    """One training step's output: the losses to weight and sum, and metrics to log (never summed)."""

    losses: dict
    metrics: dict


class RetrievalProtocol(NamedTuple):
    """How a model ranks in retrieval (``vlp.eval``): ``first_stage`` ``contrastive`` (rank by the contrastive
    embedding, re-rank the top-k with ITM) or ``all_pairs`` (ITM on every pair); ``combine`` ``itm`` (the re-ranked
    ITM scores, each direction apart: ALBEF/TCL), ``itc`` (the contrastive similarity alone) or ``max`` (BridgeTower:
    the element-wise max of the two re-ranked directions, ``S = max(S_i2t, S_t2i^T)``)."""

    first_stage: str = "contrastive"
    combine: str = "itm"


class PretrainModule(L.LightningModule):
    """Base of the paper modules: the contract above, plus loss weighting (a weight of 0 switches a loss off),
    logging, AdamW with the warm-up + decay schedule, and the shared VQA head.

    A subclass sets ``READS`` and implements ``encode_image``, ``encode_text``, ``fuse``, ``match_logits``,
    ``pooled_dim`` and ``step``; it calls :meth:`build_vqa_head` once its ``pooled_dim`` is known."""

    READS: ClassVar[frozenset] = frozenset({"pixels"})
    # Under FSDP2 (vlp.utils.fsdp) the method that runs one training step is the root unit's forward: ``step``, or
    # ``forward`` for a model whose ``step`` calls it (TCL: its momentum update runs in ``step``, outside it).
    FSDP_FORWARD: ClassVar[str] = "step"

    def __init__(self, optim: OptimConfig | None = None, loss_weights: dict[str, float] | None = None):
        super().__init__()
        self.optim_cfg = optim or OptimConfig()
        self.loss_weights = dict(loss_weights or {})
        self.total_steps: int | None = None  # set by the trainer entry point from max_steps or the loader length

    # -- the contract (see the module docstring) ------------------------------------------------------------------------
    @property
    def reads(self) -> frozenset:
        return self.READS

    @property
    def has_contrastive_head(self) -> bool:
        return False

    @property
    def retrieval_protocol(self) -> RetrievalProtocol:
        return RetrievalProtocol("contrastive" if self.has_contrastive_head else "all_pairs", "itm")

    @property
    def pooled_dim(self) -> int:
        """Width of ``Fused.pooled``."""
        raise NotImplementedError

    def encode_image(self, visual: Visual) -> Encoded:
        raise NotImplementedError

    def encode_text(self, text: Text) -> Encoded:
        raise NotImplementedError

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        raise NotImplementedError

    def match_logits(self, fused: Fused) -> torch.Tensor:
        raise NotImplementedError

    def step(self, batch: dict) -> Step:
        raise NotImplementedError

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The named losses of one step (unweighted; ``loss_weights`` applies in ``training_step``)."""
        return self.step(batch).losses

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[Visual, Text]:
        """Small valid inputs of the model's own sizes (what it ``reads``): the probe of ``vlp.tasks`` (which
        parameters a task reaches), the contract tests and FLOP counting. Texts have different lengths (padding)."""
        raise NotImplementedError

    def pair_logits(self, visual: Visual, text: Text) -> torch.Tensor:
        """ITM logits [B, 2] of aligned (image, text) pairs: the contract end to end."""
        return self.match_logits(self.fuse(self.encode_image(visual), self.encode_text(text)))

    # -- the shared VQA head --------------------------------------------------------------------------------------------
    def build_vqa_head(self, num_answers: int, hidden_scale: int = 2, act_before_norm: bool = False,
                       ln_eps: float = 1e-5) -> None:
        """``vqa_head`` = ``mlp_head(P, P * hidden_scale, num_answers)`` on ``Fused.pooled`` (P = ``pooled_dim``):
        BridgeTower's classifier with the defaults, UNITER's with ``hidden_scale=2, act_before_norm=True,
        ln_eps=1e-12``. No head when ``num_answers`` is 0."""
        from vlp.blocks.heads import mlp_head

        if num_answers > 0:
            p = self.pooled_dim
            self.vqa_head = mlp_head(p, p * hidden_scale, num_answers, ln_eps=ln_eps, act_before_norm=act_before_norm)

    def vqa_logits(self, fused: Fused) -> torch.Tensor:
        """Answer logits [B, num_answers] from ``fused.pooled``."""
        head = getattr(self, "vqa_head", None)
        if head is None:
            raise RuntimeError(f"this {type(self).__name__} has no VQA head: set model.num_answers > 0")
        return head(fused.pooled)

    vqa_loss = staticmethod(vqa_bce_loss)

    # -- the model's own draws ---------------------------------------------------------------------------------------
    def current_step(self) -> int:
        """The optimizer step being trained (0 outside a Trainer): what step-dependent choices may depend on."""
        return int(self.global_step) if self._trainer is not None else 0

    def step_generator(self, prefix: str, seed: int, *salt) -> torch.Generator:
        """A fresh CPU generator for one call's draws (negatives, picks, masks), seeded from ``(prefix, seed,
        global_step, rank, call within the step, *salt)``: a pure function of the run's position, so a resumed run
        draws what the uninterrupted one did. The call counter restarts at every optimizer step, so the
        micro-batches of one accumulation window draw apart."""
        from vlp.data.stream import stable_hash

        step = self.current_step()
        last, count = getattr(self, "_draw_counter", (-1, 0))
        count = count + 1 if last == step else 0
        self._draw_counter = (step, count)
        rank = int(self.global_rank) if self._trainer is not None else 0
        return torch.Generator().manual_seed(stable_hash(prefix, seed, step, rank, count, *salt))

    # -- weighting ------------------------------------------------------------------------------------------------------
    def weight(self, name: str) -> float:
        return float(self.loss_weights.get(name, 1.0))

    def enabled(self, name: str) -> bool:
        return self.weight(name) != 0.0

    # -- Lightning ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        total = sum(self.weight(k) * v for k, v in out.losses.items() if self.enabled(k))
        bs = batch["input_ids"].shape[0] if "input_ids" in batch else None
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)

        self.log_dict({f"train/{k}": v.detach() for k, v in out.losses.items()}, batch_size=bs)
        self.log_dict({f"train/{k}": (v.detach() if isinstance(v, torch.Tensor) else float(v))
                       for k, v in out.metrics.items()}, batch_size=bs)
        if "n_corrupt" in batch:  # the data pipeline counts skipped corrupt samples
            self.log("data/corrupt", float(batch["n_corrupt"]), reduce_fx="max", batch_size=bs)
        return total * self.grad_scale()

    def grad_scale(self) -> float:
        """The factor on the backward loss: the world size with ``optim.grad_reduction: sum`` (DDP averages the ranks'
        gradients, so this makes them a sum, as UNITER's official all-reduce), else 1. The logged loss is unscaled."""
        if self.optim_cfg.grad_reduction == "sum" and self._trainer is not None:
            return float(self.trainer.world_size)
        return 1.0

    def configure_optimizers(self):
        return configure_adamw(self, self.optim_cfg, self.total_steps)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        if self.fsdp_sharded:  # outside the step: the stored shards, not the step's gathered copies
            from vlp.utils.fsdp import clamp_stored

            clamp_stored(self)

    # -- FSDP2 (trainer.strategy: fsdp2; vlp.utils.fsdp) ---------------------------------------------------------------
    def fsdp_blocks(self) -> list[nn.Module]:
        """The transformer blocks FSDP2 shards one unit each: every layer of every stack, the momentum twins'
        included (``vlp.utils.fsdp.stack_layers``); everything else is the root unit."""
        raise NotImplementedError(f"{type(self).__name__} does not list its FSDP2 blocks (fsdp_blocks)")

    @property
    def fsdp_sharded(self) -> bool:
        from vlp.utils.fsdp import is_sharded

        return is_sharded(self)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer.strategy: fsdp2``): FSDP2 over the data-parallel
        mesh, one unit per block of ``fsdp_blocks()`` and the rest as the root, in the precision's mixed-precision
        policy (``vlp.utils.fsdp``). Other strategies: nothing."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from vlp.utils.fsdp import mixed_precision_policy, shard_model

        shard_model(self, self.fsdp_blocks(), mesh=self.device_mesh["data_parallel"],
                    mp_policy=mixed_precision_policy(self.trainer.precision), forward_method=self.FSDP_FORWARD)


def example_text(vocab_size: int, batch_size: int, length: int = 8, seed: int = 0, first_id: int = 5) -> Text:
    """Random ids in ``[first_id, vocab_size)`` (clear of the usual special ids), row ``i`` padded after
    ``length - i`` tokens (at least 2), pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(first_id, vocab_size - 1), vocab_size, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for i in range(batch_size):
        mask[i, max(2, length - i):] = 0
    return Text(ids.masked_fill(mask == 0, 0), mask)


def example_pixels(image_size: int, batch_size: int, seed: int = 0) -> Visual:
    g = torch.Generator().manual_seed(seed + 1)
    return Visual(pixels=torch.randn(batch_size, 3, image_size, image_size, generator=g))

