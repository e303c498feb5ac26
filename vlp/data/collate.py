"""Per-sample processing and batch collation, composed from small pieces with one job each.

``SampleProcessor(raw, meta)`` turns one raw shard sample into a dict: it decodes (only what the model reads:
``data.images`` / ``data.regions``), chooses a caption (:class:`CaptionChoice`), makes the image views
(:class:`ImageViews`, uint8 HWC when the transform offers ``uint8``), loads regions (``vlp.data.regions``) or picks
VQA questions (``vlp.data.questions``). ``Collator(samples)`` turns a list of them into the batch every model reads:
images stacked and normalised (:class:`ImageBatcher`), captions pre-processed and tokenised
(``vlp.data.text.TextTokenizer``), MLM-masked (``vlp.data.masking.Masker``, the model's ``MaskingConfig``),
regions padded, or VQA question rows built (``vlp.data.questions.QuestionRows``):

=================  =======================  =====================================================================
key                dtype / shape            meaning
=================  =======================  =====================================================================
image              float32 [B, 3, S, S]     normalised view 1 (only with ``data.images``)
image_aug          float32 [B, 3, S, S]     independently augmented view 2 (only with ``two_views``)
input_ids          int64 [B, L]             ``[CLS] caption [SEP] [PAD]...`` (L = longest in batch, <= max_text_len)
attention_mask     int64 [B, L]             1 on tokens, 0 on padding
mlm_input_ids      int64 [B, L]             input_ids masked by the model's ``MaskingConfig``
mlm_labels         int64 [B, L]             original id at masked positions, -100 elsewhere
image_ids          int64 [B]                json ``image_id`` (ints kept, other ids hashed stably): ITM negatives
                                            must not share it
keys               list[str]                ``__key__`` of each sample
captions           list[str]                the caption used (after the left/right swap of a flipped image and
                                            ``data.caption_preprocess``): what ``input_ids`` tokenise
all_captions       list[list[str]]          only for retrieval (``all_captions``): every caption of each image,
                                            pre-processed
region_features    float32 [B, N, D]        only with ``regions``: zero-padded ``regions.npz`` features
region_boxes       float32 [B, N, 4]        xyxy in [0, 1]
region_mask        bool [B, N]              True on real regions
region_cls_prob    float32 [B, N, C]        when every sample has ``cls_prob``
region_labels      list[list[str]] [B]      when every sample has ``labels``: the regions' object names
tag_ids, tag_mask  int64 [B, T]             only with ``tags``: ``[CLS] tags [SEP]`` (``vlp.data.concepts``)
tag_mlm_ids        int64 [B, T]             training: tags masked by the model's rule (MCR), and
tag_mlm_labels                              their labels (-100 elsewhere)
phrase_mask        bool [B, L]              only with phrases: True on the phrase tokens that ``input_ids`` /
                                            ``mlm_input_ids`` carry after the words (``[CLS] words phrases [SEP]``;
                                            ``mlm_input_ids`` has them corrupted, ``mlm_labels`` ignores them)
all_phrases        list[list[list[tuple]]]  only for retrieval with phrases: every caption's phrases
=================  =======================  =====================================================================

Retrieval batches (``text=False``) hold only the visual keys (``image`` and/or ``region_*``), ``image_ids``,
``keys`` and ``all_captions``; ``vlp.data.visual.Visual.from_batch`` reads any of these batches.

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

from vlp.data.concepts import PhraseRows, TagRows, caption_phrases
from vlp.data.masking import Masker, MaskingConfig
from vlp.data.questions import QuestionRows, pick_questions, question_index
from vlp.data.regions import load_regions, npz_handler, pad_regions
from vlp.data.stream import CorruptSample, stable_hash
from vlp.data.text import TextTokenizer
from vlp.data.transforms import is_lazy_jpeg, normalize_uint8_batch, swap_left_right

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
    """webdataset decoder handler: image bytes -> PIL image (one decode, at most one conversion; webdataset's own
    ``ImageHandler("pilrgb")`` converts twice).

    An RGB JPEG is returned opened but not decoded (the header read: size known, the file checked to be a JPEG):
    ``vlp.data.transforms.ImageTransform`` decodes it once, at the DCT scale its crop needs (``data.jpeg_draft``);
    anything else that reads its pixels (``np.asarray``, a torchvision transform) decodes it in full, as before.
    Other images (PNG, WebP, grayscale or CMYK JPEGs, so that every consumer still gets RGB) are decoded here."""
    if key.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
        return None
    img = Image.open(io.BytesIO(data))
    if img.mode == "RGB" and is_lazy_jpeg(img):
        return img
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


def sample_seed(seed: int, key: str, meta: dict) -> int:
    """The base seed of one visit of a sample: (seed, epoch, key[, cycle])."""
    epoch, cycle = int(meta.get("epoch", 0)), int(meta.get("cycle", 0))
    return stable_hash(seed, epoch, key) if cycle == 0 else stable_hash(seed, epoch, key, cycle)


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes in [0, 1] of a horizontally flipped image: ``(1 - x2, y1, 1 - x1, y2)``."""
    return torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)


# ---------------------------------------------------------------------------------------------------------------------
# per-sample pieces


class CaptionChoice:
    """Which caption of an image a visit uses: ``first``, or ``random`` (the first with probability
    ``first_prob``, else uniform), drawn from the visit's base seed."""

    def __init__(self, mode: str = "random", first_prob: float = 0.0):
        if mode not in ("random", "first"):
            raise ValueError(f"data.caption={mode!r}: expected 'random' or 'first'")
        if not 0.0 <= first_prob <= 1.0:
            raise ValueError(f"data.first_caption_prob={first_prob}: expected a probability in [0, 1]")
        self.mode, self.first_prob = mode, first_prob

    def __call__(self, n: int, base: int) -> int:
        if self.mode == "first" or stable_hash(base, "first") % 10_000 < self.first_prob * 10_000:
            return 0
        return stable_hash(base, "caption") % n


def sample_captions(info, key: str) -> list[str]:
    """The json ``captions`` of a sample, checked."""
    captions = info.get("captions") if isinstance(info, dict) else None
    if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise CorruptSample(f"sample {key}: json field 'captions' must be a non-empty list of strings")
    return captions


def sample_phrases(info: dict, key: str, n_captions: int) -> list[list[tuple]]:
    """The json ``phrases`` of a sample (one list of concept tuples per caption), checked; a sample without them has
    none (its captions take no part in phrase grounding)."""
    value = info.get("phrases")
    if value is None:
        return [[] for _ in range(n_captions)]
    if not isinstance(value, list) or len(value) != n_captions:
        raise CorruptSample(f"sample {key}: json field 'phrases' must be a list with one entry per caption "
                            f"({n_captions}), got {type(value).__name__}"
                            + (f" of {len(value)}" if isinstance(value, list) else ""))
    try:
        return [caption_phrases(v, f"sample {key}: phrases[{i}]") for i, v in enumerate(value)]
    except ValueError as e:
        raise CorruptSample(str(e)) from None


class ImageViews:
    """A PIL image -> its view(s) and the flip decision, seeded per sample: ``(view, view2 | None, flipped)``.

    The flip (``hflip``: p = 0.5) is shared by both views; ``two_views`` adds an independently augmented second
    view. Views are uint8 HWC when the transform offers ``uint8`` (the batch normalises them in one pass).
    """

    def __init__(self, transform, *, hflip: bool = False, two_views: bool = False):
        self.transform, self.hflip, self.two_views = transform, hflip, two_views
        self.convert = getattr(transform, "uint8", transform)

    def __call__(self, image, seed: int, allow_flip: bool = True):
        with seeded_torch(seed):
            flip = bool(self.hflip and allow_flip and torch.rand(()) < 0.5)
            view = self.convert(image, flip)
            view2 = self.convert(image, flip) if self.two_views else None
        return view, view2, flip


class SampleProcessor:
    """Raw shard sample -> ``{key[, image][, image_aug], caption, captions, image_id, seed, flipped[, region_*]}``
    (VQA: ``{key[, image], image_id, flipped, questions[, region_*]}``).

    ``decode`` (webdataset's decoder: images to PIL, ``json``, ``regions.npz``) is the only place where members are
    decoded, so a caller can count decodes; it decodes only the members the model reads (no image with
    ``images=False``). A JPEG comes out of it opened, and its pixels are decoded by the transform, at the scale
    the crop needs (``decode_image``). Raises on any problem with the sample; the stream counts it as corrupt.
    """

    def __init__(self, transform, *, seed: int = 0, caption: str = "random", hflip: bool = False,
                 two_views: bool = False, regions: bool = False, images: bool = True,
                 first_caption_prob: float = 0.0, task: str = "pretrain", num_answers: int = 0,
                 all_questions: bool = False, phrases: bool = False):
        if task not in ("pretrain", "vqa"):
            raise ValueError(f"data.task={task!r}: expected 'pretrain' or 'vqa'")
        if task == "vqa" and num_answers < 1:
            raise ValueError("data.task=vqa needs the answer vocabulary's size (num_answers >= 1)")
        if not (images or regions):
            raise ValueError("data.images=false and data.regions=false: a sample would carry nothing visual")
        self.transform, self.seed = transform, seed
        self.choice = CaptionChoice(caption, first_caption_prob)
        # VQA: one view, never flipped (questions and answers speak of left and right)
        two_views = two_views and task == "pretrain"
        self.views = ImageViews(transform, hflip=hflip, two_views=two_views) if images else None
        self.images, self.regions = images, regions
        self.task, self.num_answers, self.all_questions = task, num_answers, all_questions
        self.phrases = phrases
        wanted = ["json"] + (list(IMAGE_EXTS) if images else []) + (["regions.npz"] if regions else [])
        self.decoder = wds.autodecode.Decoder([decode_image, npz_handler], only=wanted)

    def decode(self, raw: dict) -> dict:
        return self.decoder(raw)

    def check_members(self, raw: dict) -> None:
        """The members this pipeline reads are all there (before anything is decoded)."""
        key = raw.get("__key__")
        for member in ("json", "regions.npz") if self.regions else ("json",):
            if member not in raw:
                raise CorruptSample(f"sample {key} has no {member!r} member")
        if self.images and not any(ext in raw for ext in IMAGE_EXTS):
            raise CorruptSample(f"sample {key} has no image member ({'/'.join(IMAGE_EXTS)}); set data.images=false "
                                "for a region-only model")

    def visual(self, sample: dict, key: str, base: int, allow_flip: bool = True) -> dict:
        """``image[, image_aug], flipped`` and the ``region_*`` tensors of a decoded sample."""
        out: dict = {"flipped": False}
        if self.views is not None:
            ext = next(ext for ext in IMAGE_EXTS if ext in sample)
            try:
                view, view2, out["flipped"] = self.views(sample[ext], stable_hash(base, "image"), allow_flip)
            except (OSError, SyntaxError) as e:  # a JPEG's pixels are decoded only here, by the transform
                raise CorruptSample(f"sample {key}: image member {ext!r} does not decode ({e})",
                                    reason="bad_image") from e
            out["image"] = view
            if view2 is not None:
                out["image_aug"] = view2
        if self.regions:
            out.update(load_regions(sample["regions.npz"], key))
            if out["flipped"]:  # the boxes follow the flipped pixels (x -> 1 - x)
                out["region_boxes"] = mirror_boxes(out["region_boxes"])
        return out

    def __call__(self, raw: dict, meta: dict) -> dict:
        self.check_members(raw)
        sample = self.decode(raw)
        key, info = sample["__key__"], sample["json"]
        base = sample_seed(self.seed, key, meta)
        image_id = stable_image_id(info.get("image_id", key) if isinstance(info, dict) else key)
        if self.task == "vqa":
            questions = pick_questions(info, key, meta, seed=self.seed, num_answers=self.num_answers,
                                       all_questions=self.all_questions)
            return {"key": key, "image_id": image_id, "questions": questions,
                    **self.visual(sample, key, base, allow_flip=False)}
        captions = sample_captions(info, key)
        out = {"key": key, **self.visual(sample, key, base)}
        chosen = self.choice(len(captions), base)
        caption = captions[chosen].strip()
        out.update(caption=swap_left_right(caption) if out["flipped"] else caption, captions=captions,
                   image_id=image_id, seed=stable_hash(base, "mlm"))
        if self.phrases:
            per_caption = sample_phrases(info, key, len(captions))
            mine = per_caption[chosen]
            if out["flipped"]:  # the phrases follow the caption's left/right swap
                mine = [tuple(swap_left_right(p) for p in t) for t in mine]
            out.update(phrases=mine, all_phrases=per_caption)
        return out

    def question_index(self, key: str, n: int, visit: int) -> int:
        """``vlp.data.questions.question_index`` with this processor's seed."""
        return question_index(self.seed, key, n, visit)


# ---------------------------------------------------------------------------------------------------------------------
# batch pieces


class ImageBatcher:
    """Per-sample views -> one float batch: float [3, S, S] stacked as they are, uint8 [S, S, 3] normalised in one
    vectorised pass (``clip`` or ``imagenet`` statistics)."""

    def __init__(self, normalize: str = "clip"):
        self.normalize = normalize

    def __call__(self, views: Sequence) -> torch.Tensor:
        stacked = torch.stack(list(views))
        return normalize_uint8_batch(stacked, self.normalize) if stacked.dtype == torch.uint8 else stacked

    def batch(self, samples: Sequence[dict]) -> dict:
        """``image`` (and ``image_aug``) when the samples carry images, else nothing."""
        out = {}
        for name in ("image", "image_aug"):
            if name in samples[0]:
                missing = [s.get("key") for s in samples if name not in s]
                if missing:
                    raise ValueError(f"samples {missing[:3]} lack {name!r} while {samples[0].get('key')} has it")
                out[name] = self([s[name] for s in samples])
        return out


class CaptionMasking:
    """Tokenised captions -> ``mlm_input_ids``/``mlm_labels`` by the model's masking rule, each row from its
    sample's ``seed`` (a pure function of the sample), or torch's global RNG for samples without seeds."""

    def __init__(self, tokenizer, masking: MaskingConfig):
        self.masker = Masker.from_tokenizer(masking, tokenizer)
        self.whole_word = masking.whole_word

    def __call__(self, text: dict, samples: Sequence[dict]) -> dict:
        seeds = [s["seed"] for s in samples] if all("seed" in s for s in samples) else None
        ids, labels = self.masker(text["input_ids"], text["attention_mask"], seeds=seeds,
                                  word_ids=text.get("word_ids"))
        return {"mlm_input_ids": ids, "mlm_labels": labels}


class Collator:
    """List of processed samples -> batch dict (see the module docstring), composed of the pieces above.

    ``masking``: the model's ``MaskingConfig`` (None: ``MaskingConfig()``). ``text=False`` (retrieval images):
    no tokenisation or masking; ``all_captions``: add every caption of each image, pre-processed.
    """

    def __init__(self, tokenizer, *, max_text_len: int = 32, masking: Optional[MaskingConfig] = None,
                 regions: bool = False, normalize: str = "clip", num_answers: int = 0,
                 caption_preprocess: str = "none", max_words: int = 30, text: bool = True,
                 all_captions: bool = False, tags: Optional[TagRows] = None,
                 phrases: Optional[PhraseRows] = None):
        self.masking = masking if masking is not None else MaskingConfig()
        self.tokenize = TextTokenizer(tokenizer, max_text_len, preprocess=caption_preprocess, max_words=max_words)
        self.images = ImageBatcher(normalize)
        self.mlm = CaptionMasking(tokenizer, self.masking) if text else None
        self.questions = QuestionRows(self.tokenize, num_answers) if num_answers >= 1 else None
        self.regions, self.text, self.all_captions = regions, text, all_captions
        self.tags, self.phrases = tags, phrases
        self.num_answers = num_answers

    def visual(self, samples: Sequence[dict]) -> dict:
        out = self.images.batch(samples)
        if self.regions:
            out.update(pad_regions(samples))
        if self.tags is not None:
            if "region_labels" not in out:
                raise ValueError("concept tags need the regions' object names (regions.npz 'labels') in every "
                                 f"sample; samples {[s.get('key') for s in samples[:3]]} lack them")
            seeds = [s["seed"] for s in samples] if self.text and all("seed" in s for s in samples) else None
            out.update(self.tags(out["region_labels"], seeds))
        return out

    def ids(self, samples: Sequence[dict]) -> dict:
        return {"image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                "keys": [s["key"] for s in samples]}

    def captions(self, samples: Sequence[dict]) -> dict:
        """Tokenised, MLM-masked captions (``input_ids`` .. ``mlm_labels``, ``captions``)."""
        captions = self.tokenize.captions([s["caption"] for s in samples])
        text = self.tokenize(captions, raw=True, word_ids=self.masking.whole_word)
        out = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        out.update(self.mlm(text, samples))
        if self.phrases is not None:
            seeds = [s["seed"] for s in samples]
            out.update(self.phrases(out, [s.get("phrases", []) for s in samples],
                                    mlm=(out.pop("mlm_input_ids"), out.pop("mlm_labels")), seeds=seeds))
        out["captions"] = captions
        return out

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("Collator: empty list of samples")
        if "questions" in samples[0]:
            return self.vqa(samples)
        batch = self.visual(samples)
        if self.text:
            batch.update(self.captions(samples))
        batch.update(self.ids(samples))
        if self.all_captions:
            batch["all_captions"] = [self.tokenize.captions(s["captions"]) for s in samples]
            if self.phrases is not None:
                batch["all_phrases"] = [s.get("all_phrases") or [[] for _ in s["captions"]] for s in samples]
        return batch

    def vqa(self, samples: Sequence[dict]) -> dict:
        """VQA batch: one row per (image, question); images (and regions) once per image, ``question_image`` maps a
        row to its image (training samples carry one question each, so rows and images then coincide)."""
        if self.questions is None:
            raise ValueError("Collator: VQA samples need num_answers >= 1 (the answer vocabulary's size)")
        batch = self.visual(samples)
        batch.update(self.questions(samples))
        batch.update(self.ids(samples))
        return batch


__all__ = ["SampleProcessor", "Collator", "CaptionChoice", "ImageViews", "ImageBatcher", "CaptionMasking",
           "pad_regions", "load_regions", "stable_image_id", "seeded_torch", "sample_seed", "sample_captions",
           "mirror_boxes", "sample_phrases", "IMAGE_EXTS"]
