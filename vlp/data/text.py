"""Text side of a batch: caption pre-processing (``data.caption_preprocess``) and tokenisation.

``albef`` is ALBEF/TCL's ``pre_caption`` (uta-smile/TCL ``dataset/utils.py``), applied to every caption they train
and evaluate on: lower-case; delete the characters ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces;
``<person>`` becomes ``person``; runs of two or more whitespace characters become one space; a trailing newline
and surrounding spaces go; at most ``max_words`` space-separated words are kept (30). It is idempotent, so text
that was pre-processed already (retrieval texts) can go through it again. ``none`` only strips surrounding
whitespace (what the pipeline always did).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

__all__ = ["CAPTION_PREPROCESS", "pre_caption", "preprocess_caption", "TextTokenizer"]

CAPTION_PREPROCESS = ("none", "albef")
_ALBEF_DROP = re.compile(r"([,.'!?\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF/TCL's caption pre-processing (module docstring)."""
    text = _ALBEF_DROP.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _MULTI_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def preprocess_caption(caption: str, mode: str = "none", max_words: int = 30) -> str:
    """``caption`` as ``data.caption_preprocess=mode`` wants it."""
    if mode == "albef":
        return pre_caption(caption, max_words)
    if mode == "none":
        return caption.strip()
    raise ValueError(f"data.caption_preprocess={mode!r}: expected one of {', '.join(CAPTION_PREPROCESS)}")


class TextTokenizer:
    """Texts -> ``{input_ids, attention_mask[, word_ids]}`` (int64 [N, L]): pre-processing, then the tokenizer
    with truncation at ``max_len`` tokens, padded to the longest text (``[CLS] text [SEP] [PAD]...``).

    ``preprocess`` applies to captions; VQA questions are tokenised as they are (``questions``).
    """

    def __init__(self, tokenizer, max_len: int, *, preprocess: str = "none", max_words: int = 30):
        if preprocess not in CAPTION_PREPROCESS:
            raise ValueError(f"data.caption_preprocess={preprocess!r}: expected one of "
                             f"{', '.join(CAPTION_PREPROCESS)}")
        if max_len < 2:
            raise ValueError(f"text length {max_len} leaves no room for a token between [CLS] and [SEP]")
        if max_words < 1:
            raise ValueError(f"data.max_words={max_words} must be >= 1")
        self.tokenizer, self.max_len, self.preprocess, self.max_words = tokenizer, max_len, preprocess, max_words

    def captions(self, texts: Sequence[str]) -> list[str]:
        """The pre-processed captions (what is tokenised)."""
        return [preprocess_caption(t, self.preprocess, self.max_words) for t in texts]

    def __call__(self, texts: Sequence[str], *, word_ids: bool = False, raw: bool = False) -> dict:
        """Tokenise captions (``raw``: tokenise ``texts`` as they are, e.g. questions). ``word_ids``: add each
        token's word index (-1 for special and padding tokens; needs a fast tokenizer)."""
        texts = list(texts) if raw else self.captions(texts)
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        out = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
        if word_ids:
            out["word_ids"] = self.word_ids(enc, len(texts), out["input_ids"].shape[1])
        return out

    def word_ids(self, enc, n: int, length: int) -> torch.Tensor:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("whole-word masking needs a fast tokenizer (word_ids); this one is "
                             f"{type(self.tokenizer).__name__}")
        out = torch.full((n, length), -1, dtype=torch.long)
        for i in range(n):
            for t, w in enumerate(enc.word_ids(i)):
                if w is not None:
                    out[i, t] = w
        return out

    def questions(self, texts: Sequence[str]) -> dict:
        """VQA questions, tokenised without caption pre-processing."""
        return self(texts, raw=True)

    def for_eval(self, max_len: Optional[int]) -> "TextTokenizer":
        """The same pre-processing with another text length (``data.eval_max_text_len``; None keeps this one)."""
        return TextTokenizer(self.tokenizer, max_len or self.max_len, preprocess=self.preprocess,
                             max_words=self.max_words)
