"""Concepts on both sides (MVPTR): phrase tokens in the text, object tags in the visual stream.

**Phrases.** A caption's concept tuples -- ``(object)``, ``(object, attribute)``, ``(subject, relation, object)``,
as the shapes world writes them in each sample's json ``phrases`` (one list per caption) and the recipes attach to
real captions (``data_recipes/_phrases.py``) -- become single tokens appended to the words:
``[CLS] words phrases [SEP]``. Which tuples are tokens is the :class:`PhraseVocab` built from the training shards
(a tuple must occur in at least ``min_count`` sentences; paper: 50) and saved beside the tokenizer as
``phrase_vocab.json``. A single-word concept whose word is one token of the tokenizer reuses that word's id (as the
official ``id2phrase`` reuses BERT ids); every other phrase gets a new row ``V + k`` of the word table (V = the
tokenizer's size), which the LM heads never decode.

**Phrase corruption** (:class:`PhraseRows`, the official ``random_phrases``): a phrase linked to a word chosen for
MLM becomes [MASK] (the word's identity must not leak through its phrase); every other phrase is selected with the
masking probability (15 %) and then becomes [MASK] (80 %), a random phrase row (10 %, uniform over the new rows
only) or stays (10 %). Phrases are corrupted, never predicted: their MLM label is ignored. A phrase is *linked* to
the caption positions whose token is one of the tokens of the phrase's words (a conservative reading of the
official word -> phrase map: a repeated word links every occurrence). Draws are :func:`hashed_uniforms` of the
sample's seed, so a row is a pure function of its sample.

The number of phrase slots is the official ``max_phrases + max_seq_length - 2 - len(words)``: phrases may use the
word slots a short caption leaves free, so a text is at most ``max_text_len + max_phrases`` tokens.

**Tags** (:class:`TagRows`): the de-duplicated object names of an image's regions (in order of first appearance,
the detector's ``__background__`` dropped) tokenised as ``[CLS] tags [SEP]`` (at most ``max_tags`` tokens), and
masked for MCR by the model's masking rule, seeded per sample.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from vlp.data.masking import IGNORE_INDEX, Masker, MaskingConfig, hashed_uniforms

__all__ = ["PHRASE_VOCAB_FILE", "BACKGROUND", "PhraseVocab", "phrase_key", "caption_phrases", "count_phrases",
           "build_phrase_vocab", "PhraseRows", "TagRows", "image_tags"]

PHRASE_VOCAB_FILE = "phrase_vocab.json"
FORMAT = "vlp-phrase-vocab/1"
BACKGROUND = "__background__"
_PHRASE_STREAM = 11  # hashed_uniforms streams of the phrase draws (the word masker uses 0-3)


def phrase_key(parts: Sequence[str]) -> tuple[str, ...]:
    """A concept tuple, normalised: lower-cased, stripped, empty parts dropped."""
    return tuple(p.strip().lower() for p in parts if isinstance(p, str) and p.strip())


def caption_phrases(value, where: str = "phrases") -> list[tuple[str, ...]]:
    """One caption's phrases from json (a list of tuples, a tuple being a list of strings, or one string), checked:
    a malformed entry is a ValueError naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of concept tuples (lists of strings), got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        parts = [item] if isinstance(item, str) else item
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{where}[{i}]: expected a concept tuple (a list of strings), got {item!r}")
        key = phrase_key(parts)
        if key:
            out.append(key)
    return out


class PhraseVocab:
    """Concept tuple -> token id. ``word_vocab_size`` V: the tokenizer's size; ``size``: the number of new rows
    (ids ``V .. V + size - 1``); ``ids(phrases)``: the known phrases' ids, de-duplicated, in order."""

    def __init__(self, entries: dict[tuple[str, ...], int], word_vocab_size: int, min_count: int = 1,
                 counts: Optional[dict[tuple[str, ...], int]] = None):
        self.entries = dict(entries)
        self.word_vocab_size = int(word_vocab_size)
        self.min_count = int(min_count)
        self.counts = dict(counts or {})
        new = sorted(i for i in self.entries.values() if i >= self.word_vocab_size)
        if new != list(range(self.word_vocab_size, self.word_vocab_size + len(new))):
            raise ValueError(f"phrase vocabulary: the new phrase rows must be {self.word_vocab_size}.."
                             f"{self.word_vocab_size + len(new) - 1} without gaps or repeats")
        self.size = len(new)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def total_rows(self) -> int:
        """Rows the word table needs: words + new phrase rows."""
        return self.word_vocab_size + self.size

    @classmethod
    def from_counts(cls, counts: Counter, tokenizer, min_count: int = 50) -> "PhraseVocab":
        """Every tuple seen in at least ``min_count`` sentences; new rows numbered by (count desc, tuple), so the
        same counts give the same ids."""
        v = len(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        entries, k = {}, 0
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if n < min_count:
                continue
            if len(key) == 1 and " " not in key[0]:
                ids = tokenizer(key[0], add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] != unk:
                    entries[key] = int(ids[0])
                    continue
            entries[key] = v + k
            k += 1
        return cls(entries, v, min_count, {key: counts[key] for key in entries})

    def ids(self, phrases: Iterable[Sequence[str]]) -> list[int]:
        out, seen = [], set()
        for p in phrases:
            i = self.entries.get(phrase_key(p))
            if i is not None and i not in seen:
                out.append(i)
                seen.add(i)
        return out

    def word_tokens(self, tokenizer) -> dict[int, frozenset[int]]:
        """Phrase id -> the token ids of its words (what links a phrase to caption positions)."""
        out: dict[int, set] = {}
        for key, i in self.entries.items():
            words = " ".join(key).split()
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"] if words else []
            out.setdefault(i, set()).update(int(t) for t in ids)
        return {i: frozenset(s) for i, s in out.items()}

    # -- file ------------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        rows = sorted(self.entries.items(), key=lambda kv: (kv[1], kv[0]))
        return {"format": FORMAT, "word_vocab_size": self.word_vocab_size, "min_count": self.min_count,
                "size": self.size,
                "phrases": [{"tuple": list(k), "id": i, "sentences": int(self.counts.get(k, 0))} for k, i in rows]}

    def save(self, path: str | Path) -> Path:
        """Written atomically (a temp file in the same directory, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "PhraseVocab":
        """Read ``phrase_vocab.json``; with ``tokenizer``, check that it was built for a vocabulary of its size."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no phrase vocabulary; build it from the training shards with "
                             "`python -m data_recipes.phrase_vocab --shards TRAIN_DIR` (make shapes-phrases for the "
                             "shapes world) or set data.phrase_vocab") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the phrase vocabulary ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("phrases"), list):
            raise ValueError(f"{path}: expected a {FORMAT} file with a 'phrases' list")
        try:
            entries = {phrase_key(p["tuple"]): int(p["id"]) for p in data["phrases"]}
            counts = {phrase_key(p["tuple"]): int(p.get("sentences", 0)) for p in data["phrases"]}
            vocab = cls(entries, int(data["word_vocab_size"]), int(data.get("min_count", 1)), counts)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed phrase vocabulary ({e})") from None
        if tokenizer is not None and len(tokenizer) != vocab.word_vocab_size:
            raise ValueError(f"{path}: built for a tokenizer of {vocab.word_vocab_size} ids, this one has "
                             f"{len(tokenizer)}; rebuild it for this tokenizer")
        return vocab


def count_phrases(shard_dirs: Sequence[str | Path], progress: bool = False) -> tuple[Counter, int, int]:
    """Sentence counts of every concept tuple in the shards' json ``phrases`` (a tuple counts once per caption).
    Returns ``(counts, captions, corrupt)``; an unreadable sample is counted as corrupt and skipped."""
    from vlp.data.shards import read_index, shard_paths

    counts: Counter = Counter()
    captions = corrupt = 0
    paths = [p for d in shard_dirs for p in shard_paths(d, read_index(d))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="phrase vocabulary", unit="shard")
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                try:
                    info = json.loads(tar.extractfile(member).read())
                    per_caption = info.get("phrases") or []
                    if not isinstance(per_caption, list):
                        raise ValueError("phrases is not a list")
                    for i, value in enumerate(per_caption):
                        counts.update(set(caption_phrases(value, f"{member.name}: phrases[{i}]")))
                        captions += 1
                except (ValueError, AttributeError, UnicodeDecodeError):
                    corrupt += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return counts, captions, corrupt


def build_phrase_vocab(shard_dirs: Sequence[str | Path], tokenizer, min_count: int = 50,
                       progress: bool = False) -> tuple[PhraseVocab, int, int]:
    """:func:`count_phrases` then :meth:`PhraseVocab.from_counts`: ``(vocab, captions, corrupt)``."""
    counts, captions, corrupt = count_phrases(shard_dirs, progress)
    return PhraseVocab.from_counts(counts, tokenizer, min_count), captions, corrupt


# ---------------------------------------------------------------------------------------------------------------------
# batch pieces


class PhraseRows:
    """Tokenised captions + their phrases -> ``[CLS] words phrases [SEP]`` rows (see the module docstring).

    ``__call__(text, phrases, mlm=None, seeds=None)``: ``text`` = ``{input_ids, attention_mask}`` of
    ``[CLS] words [SEP]`` rows, ``phrases`` one list of tuples per row, ``mlm`` = ``(mlm_input_ids, mlm_labels)`` of
    those rows (then the phrases are corrupted, from ``seeds``). Returns ``input_ids``, ``attention_mask``,
    ``phrase_mask`` (bool, True on phrase tokens) and, with ``mlm``, ``mlm_input_ids`` / ``mlm_labels`` (ignored
    at phrase positions)."""

    def __init__(self, vocab: PhraseVocab, tokenizer, max_text_len: int, max_phrases: int,
                 masking: Optional[MaskingConfig] = None):
        if max_phrases < 0:
            raise ValueError(f"data.max_phrases={max_phrases} must be >= 0")
        self.vocab, self.max_text_len, self.max_phrases = vocab, int(max_text_len), int(max_phrases)
        self.masking = masking or MaskingConfig()
        self.links = vocab.word_tokens(tokenizer)
        self.mask_id, self.pad_id = int(tokenizer.mask_token_id), int(tokenizer.pad_token_id)

    def slots(self, n_words: int) -> int:
        return max(0, self.max_phrases + self.max_text_len - 2 - n_words)

    def corrupt(self, ids: list[int], masked_words: set[int], seed: int) -> list[int]:
        """The official ``random_phrases`` on one row's phrase ids."""
        if not ids:
            return ids
        m = self.masking
        select, action, replace = (hashed_uniforms([seed], len(ids), _PHRASE_STREAM + s)[0].tolist()
                                   for s in range(3))
        out = []
        for k, pid in enumerate(ids):
            if masked_words & self.links.get(pid, frozenset()):
                out.append(self.mask_id)
            elif select[k] < m.probability and action[k] < m.mask_ratio:
                out.append(self.mask_id)
            elif select[k] < m.probability and action[k] < m.mask_ratio + m.random_ratio and self.vocab.size:
                out.append(self.vocab.word_vocab_size + min(int(replace[k] * self.vocab.size), self.vocab.size - 1))
            else:
                out.append(pid)
        return out

    def __call__(self, text: dict, phrases: Sequence[Sequence], mlm: Optional[tuple] = None,
                 seeds: Optional[Sequence[int]] = None) -> dict:
        ids, attn = text["input_ids"], text["attention_mask"]
        if len(phrases) != ids.shape[0]:
            raise ValueError(f"PhraseRows: {len(phrases)} phrase lists for {ids.shape[0]} captions")
        if mlm is not None and seeds is None:
            raise ValueError("PhraseRows: corrupting phrases needs the samples' seeds")
        rows, mlm_rows, label_rows, kinds = [], [], [], []
        for i in range(ids.shape[0]):
            n = int(attn[i].sum())
            words = ids[i, 1:n - 1].tolist()  # without [CLS] and [SEP]
            cls_id, sep_id = int(ids[i, 0]), int(ids[i, n - 1])
            pids = self.vocab.ids(phrases[i])[: self.slots(len(words))]
            rows.append([cls_id, *words, *pids, sep_id])
            kinds.append([0] * (1 + len(words)) + [1] * len(pids) + [0])
            if mlm is not None:
                mids, labels = mlm[0][i, :n].tolist(), mlm[1][i, :n].tolist()
                masked = {words[j - 1] for j in range(1, n - 1) if labels[j] != IGNORE_INDEX}
                cpids = self.corrupt(pids, masked, int(seeds[i]))
                mlm_rows.append([mids[0], *mids[1:n - 1], *cpids, mids[n - 1]])
                label_rows.append([labels[0], *labels[1:n - 1], *([IGNORE_INDEX] * len(pids)), labels[n - 1]])
        length = max(len(r) for r in rows)

        def pad(seqs, value):
            return torch.tensor([r + [value] * (length - len(r)) for r in seqs], dtype=torch.long)

        out = {"input_ids": pad(rows, self.pad_id),
               "attention_mask": pad([[1] * len(r) for r in rows], 0),
               "phrase_mask": pad(kinds, 0).bool()}
        if mlm is not None:
            out["mlm_input_ids"] = pad(mlm_rows, self.pad_id)
            out["mlm_labels"] = pad(label_rows, IGNORE_INDEX)
        return out


def image_tags(labels: Sequence[str]) -> list[str]:
    """An image's concept tags: its regions' object names, de-duplicated in order, without the background class."""
    out, seen = [], set()
    for name in labels:
        name = str(name).strip()
        if name and name != BACKGROUND and name not in seen:
            out.append(name)
            seen.add(name)
    return out


class TagRows:
    """Region labels -> ``tag_ids`` / ``tag_mask`` [B, T] (``[CLS] tags [SEP]``, at most ``max_tags`` tokens) and,
    with ``seeds``, ``tag_mlm_ids`` / ``tag_mlm_labels`` masked by ``masking`` (MCR targets)."""

    _SEED_SALT = 0x7A65

    def __init__(self, tokenizer, max_tags: int, masking: Optional[MaskingConfig] = None):
        if max_tags < 2:
            raise ValueError(f"data.max_tags={max_tags} leaves no room for a tag between [CLS] and [SEP]")
        self.tokenizer, self.max_tags = tokenizer, int(max_tags)
        self.masker = Masker.from_tokenizer(masking or MaskingConfig(), tokenizer)

    def __call__(self, labels: Sequence[Sequence[str]], seeds: Optional[Sequence[int]] = None) -> dict:
        texts = [" ".join(image_tags(row)) for row in labels]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tags, return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        out = {"tag_ids": ids, "tag_mask": mask}
        if seeds is not None:
            tag_seeds = [(int(s) ^ self._SEED_SALT) * 0x9E3779B1 for s in seeds]
            out["tag_mlm_ids"], out["tag_mlm_labels"] = self.masker(ids, mask, seeds=tag_seeds)
        return out
