"""The one MLM masker, configured by a paper's rule (``MaskingConfig``, part of each model's config).

Every caller masks through :class:`Masker`: the data collator (per-sample seeds, so a sample's mask is a pure
function of its seed whatever worker or rank makes it) and a model that masks inside its forward (a
``torch.Generator``, or torch's global RNG). The rule has three separate parts, each a plain tensor step:

1. **draws** (:class:`MaskDraws`): three uniforms per token in [0, 1): ``select``, ``action``, ``replace`` (and
   ``single`` for whole-word masking, see below), from :func:`hashed_uniforms` of the row seeds or from a generator;
2. **maskable**: attention 1 and not protected (``protect``: ``special`` = every special id of the tokenizer;
   ``pad_cls`` = only [PAD] and [CLS], so [SEP] can be masked);
3. **decision** (:meth:`Masker.apply`, deterministic given the draws): a token is selected where
   ``select < probability`` (whole-word: the draw of its word); ``action < mask_ratio`` -> [MASK],
   ``action < mask_ratio + random_ratio`` -> a random id ``pool[floor(replace x |pool|)]`` (``random_tokens``:
   ``vocab`` = ``[0, V)``, ``non_special`` = the non-special ids, ``range`` = ``[lo, hi)``), else unchanged; then
   ``min_masked`` forces the first still-unselected maskable tokens (whole words) of a row that has fewer selected
   tokens, and a forced token always becomes [MASK] (UNITER's ``random_word``: "at least mask 1", ``tokens[0] =
   mask``; its tokens exclude [CLS], so this is the first maskable token).

The papers' rules (their official code):

==============  ==========  ==============  ==========  ==========================================================
paper           protect     random_tokens   min_masked  source
==============  ==========  ==============  ==========  ==========================================================
ALBEF / TCL     pad_cls     vocab           0           ``ALBEF.mask()``: Bernoulli(0.15) per token, PAD and CLS
                                                        excluded; 0.8 [MASK], then Bernoulli(0.5) random from
                                                        ``randint(vocab_size)``
BridgeTower     special     vocab           0           ViLT/BridgeTower use HF ``DataCollatorForLanguageModeling``
                                                        (special-tokens mask, ``randint(len(tokenizer))``)
UNITER          special     range           1           ``data/mlm.py::random_word``: [CLS]/[SEP] added after
                                                        masking, random id in ``v_range = [id('!'), |vocab|)``
==============  ==========  ==============  ==========  ==========================================================

Where we differ from the official code: the draws are uniforms compared with thresholds instead of chained
Bernoullis (the same distribution: P(random) = P(action in [0.8, 0.9)) = 0.1 = 0.2 x Bernoulli(0.5)), so that a
seeded row does not depend on the other rows or on the padded length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from vlp.losses.mlm import IGNORE_INDEX

__all__ = ["MaskingConfig", "Masker", "MaskDraws", "hashed_uniforms", "IGNORE_INDEX"]

PROTECT = ("special", "pad_cls")
RANDOM_TOKENS = ("vocab", "non_special", "range")


@dataclass
class MaskingConfig:
    """A paper's BERT masking rule: select tokens with ``probability``; of those, ``mask_ratio`` become [MASK],
    ``random_ratio`` a random token, the rest stay.

    * ``protect``: ``special`` (every special token of the tokenizer can never be selected: HF's collator,
      BridgeTower/ViLT) or ``pad_cls`` (only [PAD] and [CLS]: ALBEF/TCL's ``mask()``, where [SEP] can be masked);
    * ``random_tokens``: ``vocab`` (uniform over ``[0, V)``, special ids included: ALBEF/TCL, HF), ``non_special``
      (only non-special ids), or ``range`` (``[random_range[0], random_range[1])``: UNITER's ``vocab_range``);
    * ``whole_word``: a word is selected as a whole (needs a fast tokenizer);
    * ``min_masked``: at least this many selected tokens per caption (UNITER: 1).
    """

    probability: float = 0.15
    protect: str = "special"
    random_tokens: str = "vocab"
    random_range: Optional[list[int]] = None
    whole_word: bool = False
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    min_masked: int = 0

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"masking.probability={self.probability} must be in [0, 1]")
        if self.protect not in PROTECT:
            raise ValueError(f"masking.protect={self.protect!r}: expected one of {', '.join(PROTECT)}")
        if self.random_tokens not in RANDOM_TOKENS:
            raise ValueError(f"masking.random_tokens={self.random_tokens!r}: expected one of "
                             f"{', '.join(RANDOM_TOKENS)}")
        if self.random_tokens == "range" and (self.random_range is None or len(self.random_range) != 2
                                              or not 0 <= self.random_range[0] < self.random_range[1]):
            raise ValueError(f"masking.random_range={self.random_range}: random_tokens=range needs [lo, hi) with "
                             "0 <= lo < hi")
        if not (0.0 <= self.mask_ratio <= 1.0 and 0.0 <= self.random_ratio <= 1.0 - self.mask_ratio + 1e-12):
            raise ValueError(f"masking: need 0 <= mask_ratio and 0 <= random_ratio <= 1 - mask_ratio, got "
                             f"{self.mask_ratio}, {self.random_ratio}")
        if self.min_masked < 0:
            raise ValueError(f"masking.min_masked={self.min_masked} must be >= 0")


# ---------------------------------------------------------------------------------------------------------------------
# draws

_INT63 = (1 << 63) - 1
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def hashed_uniforms(seeds: Sequence[int], n: int, stream: int = 0) -> Tensor:
    """Uniforms in [0, 1), float64 [len(seeds), n]: entry (i, t) is splitmix64 of (seeds[i], stream, t) alone, so a
    row does not depend on the other rows or on ``n`` (the padded length). Vectorised: no generator per row."""
    s = np.asarray([int(x) & _INT63 for x in seeds], dtype=np.uint64)[:, None]
    t = np.arange(1, n + 1, dtype=np.uint64)[None, :] + np.uint64(stream) * np.uint64(1 << 32)
    with np.errstate(over="ignore"):
        z = s + t * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


class MaskDraws(NamedTuple):
    """The random numbers behind one mask, uniforms in [0, 1) of shape [B, L].

    ``select`` decides selection (with whole-word masking, column ``w`` is the draw of word ``w``); ``action``
    [MASK] / random / keep; ``replace`` which random id; ``single`` the selection draw of a maskable token that has
    no word (whole-word masking with ``protect=pad_cls``: [SEP]).
    """

    select: Tensor
    action: Tensor
    replace: Tensor
    single: Tensor

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], length: int) -> "MaskDraws":
        """Row ``i`` from ``seeds[i]`` alone (streams 0-3 of :func:`hashed_uniforms`)."""
        return cls(*(hashed_uniforms(seeds, length, stream) for stream in range(4)))

    @classmethod
    def from_generator(cls, shape: tuple[int, int], generator: Optional[torch.Generator] = None,
                       device=None) -> "MaskDraws":
        """Four ``torch.rand`` draws over ``shape``, on the generator's device (else ``device``, torch's global RNG)."""
        if generator is not None:
            device = generator.device
        return cls(*(torch.rand(shape, generator=generator, device=device) for _ in range(4)))


# ---------------------------------------------------------------------------------------------------------------------
# the masker


class Masker:
    """``MaskingConfig`` bound to a vocabulary: ``masker(input_ids, attention_mask, seeds=... | generator=...)
    -> (mlm_input_ids, mlm_labels)`` (labels: the original id where selected, -100 elsewhere).

    ``special_ids``: every special id of the tokenizer (``protect=special`` never selects them,
    ``random_tokens=non_special`` never draws them); [PAD], [CLS] and [MASK] are always counted among them.
    """

    def __init__(self, cfg: MaskingConfig, *, vocab_size: int, mask_token_id: int, pad_token_id: int,
                 cls_token_id: int, special_ids: Sequence[int] = ()):
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"Masker: mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")
        self.cfg, self.vocab_size, self.mask_token_id = cfg, int(vocab_size), int(mask_token_id)
        self.pad_token_id, self.cls_token_id = int(pad_token_id), int(cls_token_id)
        self.special_ids = sorted({int(i) for i in special_ids} | {self.pad_token_id, self.cls_token_id,
                                                                    self.mask_token_id})
        self.protected_ids = (self.special_ids if cfg.protect == "special"
                              else sorted({self.pad_token_id, self.cls_token_id}))
        self.pool = self._random_pool()

    @classmethod
    def from_tokenizer(cls, cfg: MaskingConfig, tokenizer) -> "Masker":
        """The masker of a Hugging Face tokenizer (``V = len(tokenizer)``, its ``all_special_ids``)."""
        missing = [n for n in ("mask_token_id", "pad_token_id", "cls_token_id") if getattr(tokenizer, n) is None]
        if missing:
            raise ValueError(f"MLM masking needs a tokenizer with {', '.join(missing)} set (its [MASK]/[PAD]/[CLS] "
                             "tokens)")
        return cls(cfg, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                   pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                   special_ids=tokenizer.all_special_ids)

    def _random_pool(self) -> Tensor:
        """The ids a random replacement is drawn from (uniformly), as a long tensor."""
        cfg = self.cfg
        if cfg.random_tokens == "vocab":
            return torch.arange(self.vocab_size)
        if cfg.random_tokens == "range":
            lo, hi = cfg.random_range
            if hi > self.vocab_size:
                raise ValueError(f"masking.random_range={cfg.random_range} reaches past the vocabulary "
                                 f"({self.vocab_size} ids)")
            return torch.arange(lo, hi)
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[torch.tensor(self.special_ids)] = False
        return torch.nonzero(keep).flatten()

    # -- the three steps ---------------------------------------------------------------------------------------------
    def maskable(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """bool [B, L]: the tokens the rule may select (real tokens that are not protected)."""
        ok = ~torch.isin(input_ids, torch.tensor(self.protected_ids, device=input_ids.device))
        if attention_mask is not None:
            ok &= attention_mask.to(input_ids.device).bool()
        return ok

    def draws(self, input_ids: Tensor, *, seeds: Optional[Sequence[int]] = None,
              generator: Optional[torch.Generator] = None) -> MaskDraws:
        """Seeded per row when ``seeds`` are given (one per row), else from ``generator`` / torch's global RNG."""
        b, length = input_ids.shape
        if seeds is not None:
            if len(seeds) != b:
                raise ValueError(f"Masker: {len(seeds)} seeds for {b} rows of input_ids")
            return MaskDraws.from_seeds(seeds, length)
        return MaskDraws.from_generator((b, length), generator, device=input_ids.device)

    def apply(self, input_ids: Tensor, draws: MaskDraws, maskable: Tensor,
              word_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The deterministic decision (module docstring, step 3); ``word_ids`` [B, L] (-1: no word) is required
        with ``whole_word``."""
        cfg = self.cfg
        device = input_ids.device
        select, action, replace, single = (d.to(device) for d in draws)
        if cfg.whole_word:
            if word_ids is None:
                raise ValueError("masking.whole_word=true needs word_ids (tokenize with a fast tokenizer)")
            word_ids = word_ids.to(device)
            per_word = torch.gather(select, 1, word_ids.clamp(min=0, max=select.shape[1] - 1))
            select = torch.where(word_ids >= 0, per_word, single)
        chosen = (select < cfg.probability) & maskable
        to_mask = chosen & (action < cfg.mask_ratio)
        to_random = chosen & ~to_mask & (action < cfg.mask_ratio + cfg.random_ratio)
        forced = self._forced(chosen, maskable, word_ids if cfg.whole_word else None)
        chosen, to_mask, to_random = chosen | forced, to_mask | forced, to_random & ~forced

        pool = self.pool.to(device)
        idx = (replace * len(pool)).long().clamp_(0, len(pool) - 1)
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(to_random, pool[idx].to(input_ids.dtype), out)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return out, labels

    def _forced(self, chosen: Tensor, maskable: Tensor, word_ids: Optional[Tensor]) -> Tensor:
        """bool [B, L]: the tokens ``min_masked`` adds: in a row with ``n < min_masked`` selected tokens, the first
        ``min_masked - n`` maskable unselected ones (with whole-word masking, all tokens of their words)."""
        k = self.cfg.min_masked
        if k == 0:
            return torch.zeros_like(chosen)
        need = (k - chosen.sum(1, keepdim=True)).clamp(min=0)
        free = maskable & ~chosen
        forced = free & (free.cumsum(1) <= need)
        if word_ids is not None:  # the rest of a forced word comes along
            same = (word_ids.unsqueeze(2) == word_ids.unsqueeze(1)) & (word_ids >= 0).unsqueeze(2)
            forced = forced | (free & (same & forced.unsqueeze(1)).any(2))
        return forced

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 seeds: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                 word_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(mlm_input_ids, mlm_labels)``, both like ``input_ids``; the input is not modified."""
        if input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"Masker: input_ids must be an integer tensor, got {input_ids.dtype}")
        draws = self.draws(input_ids, seeds=seeds, generator=generator)
        return self.apply(input_ids, draws, self.maskable(input_ids, attention_mask), word_ids)

    def __repr__(self) -> str:
        return f"Masker({self.cfg}, vocab_size={self.vocab_size}, mask_token_id={self.mask_token_id})"
