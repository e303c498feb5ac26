"""The ``data`` section of an experiment: which shards, what to decode, how to batch, transform and tokenize them.

The MLM masking rule is not here: it belongs to the model (``model.masking``, a ``vlp.data.masking.MaskingConfig``),
which hands it to ``ShardDataModule(..., masking=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vlp.config import register
from vlp.data.text import CAPTION_PREPROCESS
from vlp.data.transforms import RESIZES

TASKS = ("pretrain", "vqa", "retrieval")
CAPTION_TASKS = ("pretrain", "retrieval")  # a sample is an image and one of its captions


@dataclass
class SourceConfig:
    """One training source: a shard directory (holding ``index.json``) and its weight in the mixture: ``weight``
    passes over it per epoch, or ``share``, its fraction of the epoch's samples (UNITER's COCO / VG / CC / SBU
    20 / 30 / 30 / 20): the weights are then ``share x total / size`` (shares normalised; the epoch keeps the
    sources' total size), so every source of the mixture must give a share."""

    path: str = ""
    weight: float = 1.0
    share: Optional[float] = None


@dataclass
class ShardsDataConfig:
    name: str = "shards"
    train: list[SourceConfig] = field(default_factory=list)
    val: Optional[str] = None  # shard directory
    test: Optional[str] = None  # shard directory
    tokenizer: Optional[str] = None  # HF name or path; None: the tokenizer saved beside the first train source
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    # How loader workers start (vlp.utils.stalls): auto (forkserver when a process group exists or the process runs
    # other threads, whose held locks a forked worker would inherit; else fork) | fork | forkserver | spawn.
    worker_start: str = "auto"
    # Seconds a loader with workers may go without producing a batch before the run stops with an error naming the
    # rank (0: wait forever); the first batch of each fresh loader (an epoch's, an evaluation's) gets the longer
    # start timeout (workers starting, shards opening). Keep both below trainer.collective_timeout_s.
    loader_timeout_s: float = 300.0
    loader_start_timeout_s: float = 900.0
    image_size: int = 64
    max_text_len: int = 32
    eval_max_text_len: Optional[int] = None  # retrieval texts (encode_texts); None: max_text_len (TCL official: 30)
    caption_preprocess: str = "none"  # none | albef (ALBEF/TCL pre_caption), in training and evaluation
    max_words: int = 30  # albef: words kept per caption
    resize: str = "square"  # eval / augment=none resize: square | short_side_crop (BridgeTower: short side + crop)
    augment: str = "none"  # none | albef | tcl (see vlp.data.transforms)
    crop_min_scale: float = 0.2  # RandomResizedCrop scale=(crop_min_scale, 1): 0.2 pre-training, 0.5 fine-tuning
    # Decode a JPEG at DCT scale 1/2, 1/4 or 1/8 when its crop (or the eval resize's region) keeps >= image_size
    # pixels per side at that scale (vlp.data.transforms): same crops and seeds, only the resampling differs slightly;
    # false: the full decode, byte-identical to before.
    jpeg_draft: bool = True
    hflip: bool = False  # captions speak of left and right: off by default
    two_views: bool = False  # a second independently augmented view (TCL's momentum input)
    normalize: str = "clip"  # clip | imagenet
    caption: str = "random"  # random | first: which caption of an image a training sample uses
    first_caption_prob: float = 0.0  # with caption=random: draw the first caption this often, else uniformly
    resampled: bool = False  # infinite stream with replacement (no epochs)
    shuffle_buffer: int = 256
    seed: int = 0
    max_corrupt_ratio: float = 0.01  # stop the run when more than this fraction of samples is corrupt
    corrupt_min_samples: int = 100  # ... once a worker has read at least this many samples
    images: bool = True  # decode the image member (false: region-only models; samples need no image)
    regions: bool = False  # load regions.npz (UNITER/MVPTR)
    # Concepts (MVPTR, vlp.data.concepts; set from the model's READS): object tags from the regions' labels, and
    # phrase tokens appended to each caption from the json's per-caption ``phrases``.
    tags: bool = False
    max_tags: int = 20  # tag tokens incl. [CLS]/[SEP] (official max_tag_length: 20 pre-training, 30 fine-tuning)
    phrases: bool = False
    max_phrases: int = 5  # phrase slots beyond max_text_len (official max_phrases)
    phrase_vocab: Optional[str] = None  # phrase_vocab.json; None: the one beside the tokenizer
    # What a sample is: "pretrain" (an image and one of its captions, MLM-masked), "retrieval" (the same pairs, nothing
    # masked) or "vqa" (an image and one of its questions with soft answer targets; see vlp.data.collate). Evaluation
    # splits of a vqa config yield every question.
    task: str = "pretrain"
    answers: Optional[str] = None  # vqa: answer vocabulary (JSON list, index = label); None: from the index.json meta

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "vqa" and self.hflip:
            raise ValueError("hflip=true with task=vqa: questions and answers speak of left and right; keep it off")
        if not (self.images or self.regions):
            raise ValueError("images=false and regions=false: a sample would carry nothing visual; set one of them")
        if self.caption_preprocess not in CAPTION_PREPROCESS:
            raise ValueError(f"caption_preprocess must be one of {', '.join(CAPTION_PREPROCESS)}, got "
                             f"{self.caption_preprocess!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        from vlp.utils.stalls import WORKER_STARTS

        if self.worker_start not in WORKER_STARTS:
            raise ValueError(f"worker_start must be one of {', '.join(WORKER_STARTS)}, got {self.worker_start!r}")
        for name in ("loader_timeout_s", "loader_start_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: wait forever)")
        if self.tags and not self.regions:
            raise ValueError("tags=true needs regions=true (tags are the regions' object names)")
        if self.max_tags < 2 or self.max_phrases < 0:
            raise ValueError(f"max_tags={self.max_tags} must be >= 2 and max_phrases={self.max_phrases} >= 0")
        if self.max_words < 1:
            raise ValueError(f"max_words={self.max_words} must be >= 1")
        for name in ("max_text_len", "eval_max_text_len"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name}={value} leaves no room for a token between [CLS] and [SEP]")


register("data", "shards", ShardsDataConfig)
