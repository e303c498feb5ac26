"""Per-sample processing (decode, caption choice, image views, regions) and batch collation (tokenize, MLM-mask, pad).

``SampleProcessor(raw, meta)`` turns one raw shard sample into a dict (images as uint8 HWC when the transform offers
``uint8``); ``Collator(samples)`` turns a list of them into the batch every model reads (normalising uint8 images in
one vectorised pass):

=================  =======================  =====================================================================
key                dtype / shape            meaning
=================  =======================  =====================================================================
image              float32 [B, 3, S, S]     normalised view 1
image_aug          float32 [B, 3, S, S]     independently augmented view 2 (only with ``two_views``)
input_ids          int64 [B, L]             ``[CLS] caption [SEP] [PAD]...`` (L = longest in batch, <= max_text_len)
attention_mask     int64 [B, L]             1 on tokens, 0 on padding
mlm_input_ids      int64 [B, L]             input_ids with BERT 80/10/10 masking applied
mlm_labels         int64 [B, L]             original id at masked positions, -100 elsewhere
image_ids          int64 [B]                json ``image_id`` (ints kept, other ids hashed stably): ITM negatives
                                            must not share it
keys               list[str]                ``__key__`` of each sample
captions           list[str]                the caption used (after the left/right swap of a flipped image)
region_features    float32 [B, N, D]        only with ``regions``: zero-padded ``regions.npz`` features
region_boxes       float32 [B, N, 4]        xyxy in [0, 1]
region_mask        bool [B, N]              True on real regions
region_cls_prob    float32 [B, N, C]        when every sample has ``cls_prob``
=================  =======================  =====================================================================

With ``data.task: vqa`` a sample is an image with its questions (one per visit in training, all of them in
evaluation) and the batch has one row per (image, question) instead, without MLM keys:

=================  =======================  =====================================================================
image              float32 [B, 3, S, S]     one per image (B images; regions likewise)
input_ids          int64 [Q, L]             the question, ``[CLS] question [SEP] [PAD]...``
attention_mask     int64 [Q, L]
vqa_targets        float32 [Q, A]           soft scores: ``scores[k]`` at ``labels[k]``, 0 elsewhere
question_image     int64 [Q]                the row's image in ``image`` (``arange(B)`` when Q == B, training)
question_ids       int64 [Q]                VQA ``question_id``
vqa_answered       bool [Q]                 the question has ground-truth answers (test-dev questions do not)
image_ids, keys    [B]                      per image
questions          list[str] [Q]
=================  =======================  =====================================================================

Randomness is per sample and seeded from (seed, epoch, key, cycle): the caption choice, the flip, both image views
and the MLM mask of a sample are the same whatever process, worker or rank produces it.
"""

from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vlp.data.stream import CorruptSample, stable_hash
from vlp.data.transforms import normalize_uint8_batch, swap_left_right

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_INT63 = (1 << 63) - 1


def stable_image_id(image_id) -> int:
    """An int64 id: ints (and strings of digits) as they are, anything else hashed stably."""
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return int(image_id)
    text = str(image_id)
    if text.isdigit() and len(text) < 19:
        return int(text)
    return stable_hash("image_id", text)


def decode_image(key: str, data: bytes):
    """webdataset decoder handler: image bytes -> PIL RGB (one decode, at most one conversion; webdataset's own
    ``ImageHandler("pilrgb")`` converts twice)."""
    if key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
        return None
    img = Image.open(io.BytesIO(data))
    if img.mode == "RGB":
        img.load()
        return img
    return img.convert("RGB")


@contextlib.contextmanager
def seeded_torch(seed: int):
    """Run a block with torch's default CPU generator seeded to ``seed``; its previous state is restored after."""
    gen = torch.random.default_generator
    state = gen.get_state()
    gen.manual_seed(seed & _INT63)
    try:
        yield
    finally:
        gen.set_state(state)


class SampleProcessor:
    """Raw shard sample -> ``{key, image[, image_aug], caption, captions, image_id, seed, flipped[, regions]}``.

    ``decode`` (webdataset's decoder: images to PIL RGB, ``json``, ``regions.npz``) is the only place where bytes
    are decoded, so a caller can count decodes. Raises on any problem with the sample; the stream counts it as
    corrupt.
    """

    def __init__(self, transform, *, seed: int = 0, caption: str = "random", hflip: bool = False,
                 two_views: bool = False, regions: bool = False, first_caption_prob: float = 0.0,
                 task: str = "pretrain", num_answers: int = 0, all_questions: bool = False):
        if caption not in ("random", "first"):
            raise ValueError(f"data.caption={caption!r}: expected 'random' or 'first'")
        if not 0.0 <= first_caption_prob <= 1.0:
            raise ValueError(f"data.first_caption_prob={first_caption_prob}: expected a probability in [0, 1]")
        if task not in ("pretrain", "vqa"):
            raise ValueError(f"data.task={task!r}: expected 'pretrain' or 'vqa'")
        if task == "vqa" and num_answers < 1:
            raise ValueError("data.task=vqa needs the answer vocabulary's size (num_answers >= 1)")
        self.transform, self.seed, self.caption = transform, seed, caption
        self.first_caption_prob = first_caption_prob
        self.hflip, self.two_views, self.regions = hflip, two_views, regions
        self.task, self.num_answers, self.all_questions = task, num_answers, all_questions
        self.decoder = wds.autodecode.Decoder([decode_image], only=[*IMAGE_EXTS, "json", "regions.npz"])

    def decode(self, raw: dict) -> dict:
        return self.decoder(raw)

    def __call__(self, raw: dict, meta: dict) -> dict:
        for field in ("json", "regions.npz") if self.regions else ("json",):
            if field not in raw:
                raise CorruptSample(f"sample {raw.get('__key__')} has no {field!r} member")
        if not any(ext in raw for ext in IMAGE_EXTS):
            raise CorruptSample(f"sample {raw.get('__key__')} has no image member ({'/'.join(IMAGE_EXTS)})")
        sample = self.decode(raw)
        key = sample["__key__"]
        info = sample["json"]
        if self.task == "vqa":
            return self._vqa_sample(sample, key, info, meta)
        captions = info.get("captions") if isinstance(info, dict) else None
        if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise CorruptSample(f"sample {key}: json field 'captions' must be a non-empty list of strings")
        image = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        epoch, cycle = int(meta.get("epoch", 0)), int(meta.get("cycle", 0))
        base = stable_hash(self.seed, epoch, key) if cycle == 0 else stable_hash(self.seed, epoch, key, cycle)
        if self.caption == "first" or stable_hash(base, "first") % 10_000 < self.first_caption_prob * 10_000:
            idx = 0
        else:
            idx = stable_hash(base, "caption") % len(captions)
        convert = getattr(self.transform, "uint8", self.transform)  # uint8 HWC views are normalised per batch
        with seeded_torch(stable_hash(base, "image")):
            flip = bool(self.hflip and torch.rand(()) < 0.5)
            view = convert(image, flip)
            view2 = convert(image, flip) if self.two_views else None
        caption = captions[idx].strip()
        out = {"key": key, "image": view, "caption": swap_left_right(caption) if flip else caption,
               "captions": captions, "image_id": stable_image_id(info.get("image_id", key)),
               "seed": stable_hash(base, "mlm"), "flipped": flip}
        if view2 is not None:
            out["image_aug"] = view2
        if self.regions:
            out.update(load_regions(sample["regions.npz"], key))
        return out

    # -- VQA ---------------------------------------------------------------------------------------------------------
    def question_index(self, key: str, n: int, visit: int) -> int:
        """Which of an image's ``n`` questions its ``visit``-th visit uses: visits ``r*n .. r*n + n-1`` walk through
        a permutation seeded by (seed, key, r), so every ``n`` consecutive visits use every question exactly once."""
        rnd, pos = divmod(visit, n)
        return int(np.random.default_rng(stable_hash(self.seed, "questions", key, rnd)).permutation(n)[pos])

    def _vqa_sample(self, sample: dict, key: str, info, meta: dict) -> dict:
        """``{key, image, image_id, flipped, questions: [{question_id, question, labels, scores, answered}][,
        regions]}``: one question (training; chosen by :meth:`question_index` with visit ``epoch x passes + cycle``,
        ``passes`` = the stream's passes over the source per epoch) or all of them (``all_questions``, evaluation)."""
        questions = info.get("questions") if isinstance(info, dict) else None
        if not questions or not isinstance(questions, list):
            raise CorruptSample(f"sample {key}: json field 'questions' must be a non-empty list (a VQA shard?)")
        epoch, cycle = int(meta.get("epoch", 0)), int(meta.get("cycle", 0))
        if self.all_questions:
            picked = questions
        else:
            visit = epoch * max(1, int(meta.get("passes", 1))) + cycle
            picked = [questions[self.question_index(key, len(questions), visit)]]
        picked = [self._question(key, q) for q in picked]
        base = stable_hash(self.seed, epoch, key) if cycle == 0 else stable_hash(self.seed, epoch, key, cycle)
        image = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        convert = getattr(self.transform, "uint8", self.transform)
        with seeded_torch(stable_hash(base, "image")):
            view = convert(image, False)
        out = {"key": key, "image": view, "image_id": stable_image_id(info.get("image_id", key)), "flipped": False,
               "questions": picked}
        if self.regions:
            out.update(load_regions(sample["regions.npz"], key))
        return out

    def _question(self, key: str, q) -> dict:
        """A checked question: int id, text, answer labels in ``[0, num_answers)`` with their soft scores."""
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise CorruptSample(f"sample {key}: every entry of 'questions' needs a 'question' string")
        labels, scores = q.get("labels") or [], q.get("scores") or []
        if len(labels) != len(scores):
            raise CorruptSample(f"sample {key}, question {q.get('question_id')}: {len(labels)} labels but "
                                f"{len(scores)} scores")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < self.num_answers for x in labels):
            raise CorruptSample(f"sample {key}, question {q.get('question_id')}: labels {labels} outside the answer "
                                f"vocabulary [0, {self.num_answers}); shards and answers.json disagree?")
        qid = q.get("question_id")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise CorruptSample(f"sample {key}: question_id {qid!r} is not an integer")
        return {"question_id": qid, "question": q["question"].strip(), "labels": list(labels),
                "scores": [float(x) for x in scores], "answered": bool(q.get("answers") or labels)}


def load_regions(npz: dict, key: str = "?") -> dict:
    """``regions.npz`` (DESIGN §3) -> float32 tensors ``region_features`` [N, D], ``region_boxes`` [N, 4], ..."""
    if not isinstance(npz, dict) or "features" not in npz or "boxes" not in npz:
        raise CorruptSample(f"sample {key}: regions.npz needs 'features' and 'boxes'")
    feats = np.asarray(npz["features"], dtype=np.float32)
    boxes = np.asarray(npz["boxes"], dtype=np.float32)
    if feats.ndim != 2 or boxes.shape != (feats.shape[0], 4):
        raise CorruptSample(f"sample {key}: regions.npz features {feats.shape} / boxes {boxes.shape} do not match")
    out = {"region_features": torch.from_numpy(feats), "region_boxes": torch.from_numpy(boxes)}
    if "cls_prob" in npz:
        out["region_cls_prob"] = torch.from_numpy(np.asarray(npz["cls_prob"], dtype=np.float32))
    return out


def pad_regions(samples: Sequence[dict]) -> dict:
    """Zero-pad per-sample region tensors to the batch maximum; ``region_mask`` marks the real ones."""
    n = max(s["region_features"].shape[0] for s in samples)
    d = samples[0]["region_features"].shape[1]
    b = len(samples)
    feats, boxes = torch.zeros(b, n, d), torch.zeros(b, n, 4)
    mask = torch.zeros(b, n, dtype=torch.bool)
    with_cls = all("region_cls_prob" in s for s in samples)
    cls = torch.zeros(b, n, samples[0]["region_cls_prob"].shape[1]) if with_cls else None
    for i, s in enumerate(samples):
        k = s["region_features"].shape[0]
        if s["region_features"].shape[1] != d:
            raise ValueError(f"sample {s.get('key')}: region feature dim {s['region_features'].shape[1]} != {d}")
        feats[i, :k], boxes[i, :k], mask[i, :k] = s["region_features"], s["region_boxes"], True
        if cls is not None:
            cls[i, :k] = s["region_cls_prob"]
    out = {"region_features": feats, "region_boxes": boxes, "region_mask": mask}
    if cls is not None:
        out["region_cls_prob"] = cls
    return out


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def hashed_uniforms(seeds: Sequence[int], n: int, stream: int = 0) -> torch.Tensor:
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


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, *, mask_token_id: int, candidates: torch.Tensor,
                probability: float = 0.15, word_ids: Optional[torch.Tensor] = None,
                seeds: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None):
    """BERT masking: choose positions with ``probability`` among ``maskable`` ones; of those 80% -> [MASK],
    10% -> a random non-special token, 10% unchanged. Returns ``(mlm_input_ids, mlm_labels)`` (labels -100 where not
    chosen).

    ``word_ids`` [B, L] (-1 for special/pad tokens) switches to whole-word masking: a word is chosen with
    ``probability`` and all its tokens are masked. ``seeds`` (one per row) make each row's mask a function of its
    seed alone; otherwise ``generator`` (or torch's global RNG) is used.
    """
    b, length = input_ids.shape
    if seeds is not None:
        if len(seeds) != b:
            raise ValueError(f"mask_tokens: {len(seeds)} seeds for {b} rows")
        pick, how, which = (hashed_uniforms(seeds, length, stream) for stream in range(3))
        rand_idx = (which * len(candidates)).long().clamp_(max=len(candidates) - 1)
    else:
        pick = torch.rand(b, length, generator=generator)
        how = torch.rand(b, length, generator=generator)
        rand_idx = torch.randint(len(candidates), (b, length), generator=generator)
    if word_ids is not None:
        # one draw per word (word index w uses the draw at column w): every token of a word shares its fate
        pick = torch.gather(pick, 1, word_ids.clamp(min=0, max=length - 1))
    chosen = (pick < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    out = input_ids.clone()
    to_mask = chosen & (how < 0.8)
    to_rand = chosen & (how >= 0.8) & (how < 0.9)
    out[to_mask] = mask_token_id
    out[to_rand] = candidates[rand_idx[to_rand]]
    return out, labels


class Collator:
    """List of processed samples -> batch dict (see the module docstring): tokenization, MLM masking, stacking."""

    def __init__(self, tokenizer, *, max_text_len: int = 32, mlm_probability: float = 0.15,
                 whole_word_masking: bool = False, regions: bool = False, normalize: str = "clip",
                 num_answers: int = 0):
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs [MASK] and [PAD] tokens for MLM masking")
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"data.mlm_probability={mlm_probability} must be in [0, 1]")
        self.num_answers = num_answers  # VQA batches (samples with "questions"): width of vqa_targets
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.mlm_probability, self.whole_word_masking, self.regions = mlm_probability, whole_word_masking, regions
        self.normalize = normalize
        special = set(tokenizer.all_special_ids)
        self.candidates = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
        if whole_word_masking and not getattr(tokenizer, "is_fast", False):
            raise ValueError("data.whole_word_masking needs a fast tokenizer (word_ids)")

    def tokenize(self, captions: list[str]) -> dict:
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt", return_special_tokens_mask=True)
        attention = enc["attention_mask"].long()
        maskable = (enc["special_tokens_mask"] == 0) & (attention == 1)
        out = {"input_ids": enc["input_ids"].long(), "attention_mask": attention, "maskable": maskable}
        if self.whole_word_masking:
            length = out["input_ids"].shape[1]
            word_ids = torch.full((len(captions), length), -1, dtype=torch.long)
            for i in range(len(captions)):
                for t, w in enumerate(enc.word_ids(i)):
                    if w is not None:
                        word_ids[i, t] = w
            out["word_ids"] = word_ids
        return out

    def images(self, views: list) -> torch.Tensor:
        """Stack per-sample views: float [3, S, S] as they are, uint8 [S, S, 3] normalised here in one pass."""
        stacked = torch.stack(views)
        return normalize_uint8_batch(stacked, self.normalize) if stacked.dtype == torch.uint8 else stacked

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("Collator: empty list of samples")
        if "questions" in samples[0]:
            return self.vqa(samples)
        captions = [s["caption"] for s in samples]
        text = self.tokenize(captions)
        mlm_ids, mlm_labels = mask_tokens(
            text["input_ids"], text["maskable"], mask_token_id=self.tokenizer.mask_token_id,
            candidates=self.candidates, probability=self.mlm_probability, word_ids=text.get("word_ids"),
            seeds=[s["seed"] for s in samples] if all("seed" in s for s in samples) else None)
        batch = {"image": self.images([s["image"] for s in samples])}
        if "image_aug" in samples[0]:
            batch["image_aug"] = self.images([s["image_aug"] for s in samples])
        batch.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"], mlm_input_ids=mlm_ids,
                     mlm_labels=mlm_labels,
                     image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                     keys=[s["key"] for s in samples], captions=captions)
        if self.regions:
            batch.update(pad_regions(samples))
        return batch

    def vqa(self, samples: Sequence[dict]) -> dict:
        """VQA batch: one row per (image, question); images (and regions) once per image, ``question_image`` maps a
        row to its image (training samples carry one question each, so rows and images then coincide)."""
        if self.num_answers < 1:
            raise ValueError("Collator: VQA samples need num_answers >= 1 (the answer vocabulary's size)")
        rows = [(i, q) for i, s in enumerate(samples) for q in s["questions"]]
        text = self.tokenize([q["question"] for _, q in rows])
        targets = torch.zeros(len(rows), self.num_answers)
        for r, (_, q) in enumerate(rows):
            if q["labels"]:
                targets[r, torch.tensor(q["labels"], dtype=torch.long)] = torch.tensor(q["scores"])
        batch = {"image": self.images([s["image"] for s in samples]),
                 "input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "vqa_targets": targets,
                 "question_image": torch.tensor([i for i, _ in rows], dtype=torch.long),
                 "question_ids": torch.tensor([q["question_id"] for _, q in rows], dtype=torch.long),
                 "vqa_answered": torch.tensor([q["answered"] for _, q in rows], dtype=torch.bool),
                 "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                 "keys": [s["key"] for s in samples], "questions": [q["question"] for _, q in rows]}
        if self.regions:
            batch.update(pad_regions(samples))
        return batch


__all__ = ["SampleProcessor", "Collator", "mask_tokens", "pad_regions", "load_regions", "stable_image_id",
           "seeded_torch", "hashed_uniforms", "IMAGE_EXTS"]
