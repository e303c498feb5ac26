"""Tokenizers: any Hugging Face tokenizer by name or path, or a small WordPiece trained on a world's captions.

The embedded default trains a BERT-style WordPiece (lower-cased, ``[PAD]=0 [UNK] [CLS] [SEP] [MASK]``) on the
training captions and saves it beside the shards, so a run needs nothing from a hub. A vocabulary of a few hundred
words instead of BERT's 30,522 is what makes a tiny model train fast on a CPU (ENGINEERING.md: vocabulary size
dominates the step time at tiny widths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(name_or_path: str | Path):
    """A ``PreTrainedTokenizerFast`` from a local directory or a hub name (the hub only when online)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"tokenizer {name_or_path}: expected a directory written by save_pretrained, got a file")
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        where = "directory" if path.exists() else "name (no such local directory, and the hub is offline?)"
        raise OSError(f"cannot load tokenizer from {where} {name_or_path!r}: {e}") from None


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, max_length: int = 64):
    """Train a lower-casing BERT WordPiece tokenizer on ``texts`` and save it with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id),
                                                                                  ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
