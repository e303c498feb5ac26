"""``ShardDataModule``: the ``data`` section (``ShardsDataConfig``) as a LightningDataModule with exact resume.

Training batches come from ``vlp.data.stream.ShardStream`` (mixture, node/worker split, equal batches per rank,
deterministic order, corrupt-sample accounting); see ``vlp.data.collate`` for the batch keys. Training, validation,
retrieval and VQA data all go through the same ``SampleProcessor`` + ``Collator``, so every entry point decodes
exactly what the model reads (``data.images``, ``data.regions``) and pre-processes captions the same way; the MLM
masking rule is the model's (``masking=``, a ``MaskingConfig``).

Stream position (DESIGN §7). The batches carry ``stream_state``; the datamodule's ``on_before_batch_transfer`` hook,
which Lightning calls on exactly the batches the training loop consumes (not on a prefetched one), records the
position ``(epoch, batches consumed)``. ``state_dict()`` puts it in every checkpoint and ``load_state_dict()`` (called
by Lightning on resume, after ``setup``) restores it; the next iteration of the train loader then starts there. It
relies on neither Lightning's loader-state mechanism (dropped when ``estimated_stepping_batches`` is read, #20550)
nor its fetcher (which prefetches): what counts is what reached ``training_step``. A LightningModule that also
overrides ``on_before_batch_transfer`` is overridden by this one (Lightning uses the datamodule's and warns).
Outside Lightning, call ``record(batch)`` for each batch you consume.

The epoch of a new iteration is ``trainer.current_epoch``, except that a recorded position is honoured: if the
recorded epoch is unfinished the iteration continues it, and if it is finished the next epoch starts. This is what a
resume from any Lightning checkpoint (mid-epoch, last batch, epoch end, after validation) needs.

Loaders with workers (training and evaluation) start them with ``data.worker_start`` (``auto``: forkserver in a
process that runs other threads or a process group, so no worker inherits a lock held by another thread) and bound
every wait for a batch by ``data.loader_start_timeout_s`` (the first) and ``data.loader_timeout_s`` (later ones); a
stuck loader raises ``vlp.utils.stalls.StallError`` naming the rank. Workers are not persistent: the stream is
positioned anew at each iteration.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from vlp.data.collate import Collator, SampleProcessor
from vlp.data.config import CAPTION_TASKS, ShardsDataConfig
from vlp.data.masking import MaskingConfig
from vlp.data.shards import ShardFormatError, read_index
from vlp.data.stream import ShardEvalStream, ShardStream, Source, resume_position
from vlp.data.text import TextTokenizer
from vlp.data.tokenizer import load_tokenizer
from vlp.data.transforms import build_transform
from vlp.errors import DataError
from vlp.utils.stalls import WorkerInit, loader_stall, stall_requested, worker_context

RETRIEVAL_TENSOR_BUDGET = 2 << 30  # bytes: above this, retrieval batches are re-read lazily instead of kept


def resolve_tokenizer(cfg: ShardsDataConfig) -> str:
    """``cfg.tokenizer``, or the tokenizer directory named by the first train (else val/test) source's index.json."""
    if cfg.tokenizer:
        return cfg.tokenizer
    first = cfg.train[0].path if cfg.train else (cfg.val or cfg.test)
    if not first:
        raise DataError("data.tokenizer is not set and there is no shard directory to take it from")
    name = read_index(first, check_files=False).get("tokenizer")
    if not name:
        raise DataError(f"data.tokenizer is not set and {Path(first) / 'index.json'} names no tokenizer; "
                         "set data.tokenizer to a Hugging Face name or a saved tokenizer directory")
    path = Path(name)
    return str(path if path.is_absolute() else Path(first) / path)


def resolve_phrase_vocab(cfg: ShardsDataConfig) -> Path:
    """``cfg.phrase_vocab``, or ``phrase_vocab.json`` in the tokenizer's directory (where
    ``data_recipes/phrase_vocab.py`` writes it)."""
    from vlp.data.concepts import PHRASE_VOCAB_FILE

    if cfg.phrase_vocab:
        return Path(cfg.phrase_vocab)
    tok = Path(resolve_tokenizer(cfg))
    if not tok.is_dir():
        raise DataError(f"data.phrase_vocab is not set and the tokenizer {tok} is not a local directory to find "
                         f"{PHRASE_VOCAB_FILE} in; set data.phrase_vocab")
    return tok / PHRASE_VOCAB_FILE


def resolve_answers(cfg: ShardsDataConfig) -> list[str]:
    """The VQA answer vocabulary (index = label): ``cfg.answers`` (a JSON list), else the ``answers`` list in the
    first train (else val/test) source's index.json meta, else the file its ``answers_file`` names (relative to the
    shard directory)."""
    import json

    if cfg.answers:
        path = Path(cfg.answers)
    else:
        first = cfg.train[0].path if cfg.train else (cfg.val or cfg.test)
        if not first:
            raise DataError("data.answers is not set and there is no shard directory to take it from")
        meta = read_index(first, check_files=False).get("meta") or {}
        if isinstance(meta.get("answers"), list):
            return [str(a) for a in meta["answers"]]
        if not meta.get("answers_file"):
            raise DataError(f"data.answers is not set and {Path(first) / 'index.json'} names no answer vocabulary "
                             "(meta.answers / meta.answers_file); is it a VQA shard directory (data_recipes/vqa.py)?")
        path = Path(meta["answers_file"])
        path = path if path.is_absolute() else Path(first) / path
    try:
        answers = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the answer vocabulary {path}: {e}") from None
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{path}: expected a non-empty JSON list of answers (index = label)")
    return [str(a) for a in answers]


def share_weights(sources: list[Source], shares: list[Optional[float]]) -> list[Source]:
    """Sources with their weights set from ``data.train[*].share`` (see ``SourceConfig``), or as they are when no
    source gives a share."""
    import dataclasses

    if all(x is None for x in shares):
        return sources
    if any(x is None for x in shares) or any(x <= 0 for x in shares):
        raise DataError(f"data.train: shares {shares}: give every source a share > 0, or none (weights apply)")
    total, norm = sum(s.num_samples for s in sources), sum(shares)
    return [dataclasses.replace(s, weight=x / norm * total / max(1, s.num_samples)) for s, x in zip(sources, shares)]


class StreamPosition:
    """Where the training stream stands: epoch, batches consumed in it, and sample counters (rank-local); with the
    stream's fingerprints, topology and elastic hops, so a resume on another topology continues exactly."""

    def __init__(self):
        self.epoch: Optional[int] = None
        self.batches = 0
        self.seen = 0
        self.corrupt = 0
        self.fingerprint: Optional[int] = None
        self.data_fingerprint: Optional[int] = None
        self.topology: Optional[list] = None
        self.hops: list = []
        self.batches_per_rank: Optional[int] = None
        self.last = (0, 0)  # n_seen, n_corrupt of the last recorded batch

    def record(self, batch: dict, stream: Optional[ShardStream] = None) -> None:
        st = batch["stream_state"]
        self.epoch = int(st["epoch"])
        self.batches = int(st["index"]) + 1
        self.hops = [list(h) for h in st.get("hops", [])]
        self.last = (int(batch.get("n_seen", 0)), int(batch.get("n_corrupt", 0)))
        self.seen += self.last[0]
        self.corrupt += self.last[1]
        if stream is not None:
            self.fingerprint, self.batches_per_rank = stream.fingerprint, len(stream)
            self.data_fingerprint, self.topology = stream.data_fingerprint, list(stream.topology)

    def state_dict(self, exclude_last: bool = False) -> dict:
        """The position; ``exclude_last``: as if the last recorded batch had not been consumed (it is replayed)."""
        batches, seen, corrupt = self.batches, self.seen, self.corrupt
        if exclude_last and batches > 0:
            batches, seen, corrupt = batches - 1, seen - self.last[0], corrupt - self.last[1]
        return {"version": 2, "epoch": self.epoch, "batches": batches, "seen": seen, "corrupt": corrupt,
                "fingerprint": self.fingerprint, "batches_per_rank": self.batches_per_rank,
                "data_fingerprint": self.data_fingerprint, "topology": self.topology, "hops": self.hops}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in (1, 2):
            raise ValueError(f"data stream state: unknown version {state.get('version')!r} (expected 1 or 2)")
        self.epoch = state["epoch"]
        self.batches = int(state["batches"])
        self.seen, self.corrupt = int(state.get("seen", 0)), int(state.get("corrupt", 0))
        self.fingerprint, self.batches_per_rank = state.get("fingerprint"), state.get("batches_per_rank")
        self.data_fingerprint, self.topology = state.get("data_fingerprint"), state.get("topology")
        self.hops = [list(h) for h in state.get("hops") or []]


class _TimedIterator:
    """A DataLoader iterator whose wait for a batch is bounded: ``start_timeout`` for the first batch,
    ``batch_timeout`` for each later one (0: no bound); a timeout becomes a :class:`~vlp.utils.stalls.StallError`.

    torch waits in slices of the loader's ``timeout`` (``_TimedLoader.POLL_S``) and, between them, checks that its
    workers are alive (a dead worker is reported at once, as without a timeout); a slice that ends without a batch
    raises before the iterator's state changes, so the wait simply continues until the bound."""

    def __init__(self, it, loader: "_TimedLoader"):
        self._it, self._loader, self._first = it, loader, True

    def __iter__(self):
        return self

    def __next__(self):
        ld = self._loader
        limit = ld.start_timeout if self._first else ld.batch_timeout
        t0 = time.monotonic()
        while True:
            try:
                batch = next(self._it)
                break
            except RuntimeError as e:
                if not str(e).startswith("DataLoader timed out"):
                    raise
                if limit and time.monotonic() - t0 >= limit:  # (at most one slice late)
                    self._stop_workers()
                    raise loader_stall(ld.what, limit, self._first, ld.worker_start, ld.num_workers) from None
        self._first = False
        return batch

    def _stop_workers(self) -> None:
        """Kill the stuck workers now (torch's shutdown would first join each for seconds), after taking them off
        torch's SIGCHLD check, which would otherwise report their deaths later as a worker failure."""
        from torch.utils.data._utils import signal_handling

        it = self._it
        if getattr(it, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()


class _TimedLoader(DataLoader):
    """A DataLoader whose workers start with ``data.worker_start`` and whose waits are bounded by
    ``data.loader_start_timeout_s`` (first batch) and ``data.loader_timeout_s`` (each later one); ``what`` names it
    in the error."""

    POLL_S = 5.0  # torch's own interval for checking the workers when it waits without a timeout

    def __init__(self, dataset, cfg: ShardsDataConfig, what: str, rank: int = 0, **kwargs):
        k = cfg.num_workers
        ctx = worker_context(cfg.worker_start, k)
        self.what, self.worker_start = what, ctx.get_start_method() if ctx is not None else None
        self.start_timeout, self.batch_timeout = (cfg.loader_start_timeout_s, cfg.loader_timeout_s) if k else (0, 0)
        bounds = [t for t in (self.start_timeout, self.batch_timeout) if t > 0]
        self._stall = k > 0 and stall_requested("loader", rank)
        super().__init__(dataset, batch_size=None, num_workers=k, multiprocessing_context=ctx,
                         timeout=min([self.POLL_S, *bounds]) if bounds else 0, **kwargs)

    def __iter__(self):
        if self.num_workers > 0:  # the workers get vlp's WorkerInit around the loader's own worker_init_fn
            inner = self.worker_init_fn  # (Lightning sets its seeding function here before iterating)
            self.worker_init_fn = WorkerInit(inner, stall=self._stall)
            try:
                it = super().__iter__()
            finally:
                self.worker_init_fn = inner
        else:
            it = super().__iter__()
        return _TimedIterator(it, self) if self.timeout > 0 else it


class _StreamLoader(_TimedLoader):
    """A DataLoader over a ShardStream that positions the stream (epoch, start batch) each time it is iterated."""

    def __init__(self, stream: ShardStream, planner, cfg: ShardsDataConfig, **kwargs):
        super().__init__(stream, cfg, "the training loader", rank=stream.rank, **kwargs)
        self._planner = planner

    def __iter__(self):
        self._planner(self.dataset)
        return super().__iter__()


class RetrievalData(tuple):
    """A retrieval split, in shard order. Unpacks as ``(visuals, texts, txt2img, img2txt)``: ``visuals`` (a
    :class:`RetrievalVisuals`: collated batches of the images, ``len()`` = number of images), ``texts`` (every
    caption of every image, pre-processed), ``txt2img[t]`` (the image of text ``t``), ``img2txt[i]`` (the texts of
    image ``i``); ``.keys`` and ``.image_ids`` of the images (and every part by name) as attributes; ``.phrases``
    (with ``data.phrases``): each text's concept tuples, else None."""

    def __new__(cls, visuals, texts, txt2img, img2txt, keys, image_ids, phrases=None):
        obj = super().__new__(cls, (visuals, texts, txt2img, img2txt))
        obj.keys, obj.image_ids, obj.phrases = keys, image_ids, phrases
        return obj

    visuals = property(lambda self: self[0])
    texts = property(lambda self: self[1])
    txt2img = property(lambda self: self[2])
    img2txt = property(lambda self: self[3])


class RetrievalVisuals:
    """The images of a retrieval split as the model reads them: iterating yields, in order, the eval stream's
    collated batches (``image`` and/or ``region_*``, ``image_ids``, ``keys``; ``Visual.from_batch`` reads them).

    The first pass (``retrieval_data``) keeps the batches while they fit in ``RETRIEVAL_TENSOR_BUDGET`` bytes; above
    it, each iteration re-reads the split through the same stream and checks that it yields the same images.
    """

    def __init__(self, loader_factory, keys: list[str], batches: Optional[list[dict]], corrupt: int = 0):
        self._loader_factory, self.keys, self._batches, self.corrupt = loader_factory, keys, batches, corrupt

    @property
    def cached(self) -> bool:
        return self._batches is not None

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        if self._batches is not None:
            yield from self._batches
            return
        got = 0
        for batch in self._loader_factory():
            keys = batch["keys"]
            if keys != self.keys[got: got + len(keys)]:
                raise RuntimeError(f"retrieval images: expected {self.keys[got: got + len(keys)][:3]}..., read "
                                   f"{keys[:3]}...; did the shards change since retrieval_data()?")
            got += len(keys)
            yield visual_part(batch)
        if got != len(self.keys):
            raise RuntimeError(f"retrieval images: read {got} of {len(self.keys)} images; did the shards change?")


RETRIEVAL_DROP = ("all_captions", "n_seen", "n_corrupt")


def visual_part(batch: dict) -> dict:
    """A retrieval batch without its text bookkeeping (``all_captions``) and stream counters."""
    return {k: v for k, v in batch.items() if k not in RETRIEVAL_DROP}


def batch_nbytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards for training (exactly resumable), validation and test, and retrieval evaluation.

    ``rank``/``world_size`` default to the trainer's (or torch.distributed's); pass them to simulate ranks.
    ``masking``: the model's MLM rule (``model.masking``; None: ``MaskingConfig()``); ``data.task: retrieval``
    masks nothing (its pairs are the clean captions; the collator's ``mlm_*`` keys then copy ``input_ids``).
    """

    def __init__(self, cfg: ShardsDataConfig, *, tokenizer=None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, masking: Optional[MaskingConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.masking = masking if masking is not None else MaskingConfig()
        if cfg.task == "retrieval":
            self.masking = MaskingConfig(probability=0.0)
        self._tokenizer = tokenizer
        self._rank, self._world_size = rank, world_size
        self.train_stream: Optional[ShardStream] = None
        self.position = StreamPosition()
        self._warned_fingerprint = False
        self._reload_every: Optional[int] = None  # the trainer's setting, while an elastic epoch overrides it
        self._ready_at_record: Optional[int] = None
        self._answers: Optional[list[str]] = None
        self._phrase_vocab = None

    # -- pieces ------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_tokenizer(self.cfg))
        return self._tokenizer

    @property
    def phrase_vocab(self):
        """The :class:`vlp.data.concepts.PhraseVocab` (``data.phrases`` in pre-training), or None."""
        if self._phrase_vocab is None and self.reads_phrases:
            from vlp.data.concepts import PhraseVocab

            self._phrase_vocab = PhraseVocab.load(resolve_phrase_vocab(self.cfg), self.tokenizer)
        return self._phrase_vocab

    @property
    def reads_phrases(self) -> bool:
        """Captions get phrase tokens: ``data.phrases`` on caption data (VQA questions have none)."""
        return self.cfg.phrases and self.cfg.task in CAPTION_TASKS

    def concept_rows(self, max_text_len: int):
        """``(TagRows | None, PhraseRows | None)`` for ``data.tags`` / ``data.phrases``."""
        from vlp.data.concepts import PhraseRows, TagRows

        c = self.cfg
        tags = TagRows(self.tokenizer, c.max_tags, self.masking) if c.tags else None
        phrases = (PhraseRows(self.phrase_vocab, self.tokenizer, max_text_len, c.max_phrases, self.masking)
                   if self.reads_phrases else None)
        return tags, phrases

    @property
    def answers(self) -> list[str]:
        """The VQA answer vocabulary (``data.task: vqa``; see :func:`resolve_answers`)."""
        if self._answers is None:
            self._answers = resolve_answers(self.cfg)
        return self._answers

    @property
    def num_answers(self) -> int:
        """Width of ``vqa_targets``: the answer vocabulary's size with ``data.task: vqa``, else 0."""
        return len(self.answers) if self.cfg.task == "vqa" else 0

    def topology(self) -> tuple[int, int]:
        """(rank, world_size) of this process."""
        if self._world_size is not None:
            return (self._rank or 0), self._world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def collator(self, *, text: bool = True, all_captions: bool = False) -> Collator:
        """The batch builder (``text=False, all_captions=True``: retrieval images with their captions)."""
        c = self.cfg
        tags, phrases = self.concept_rows(c.max_text_len)
        return Collator(self.tokenizer, max_text_len=c.max_text_len, masking=self.masking, regions=c.regions,
                        normalize=c.normalize, num_answers=self.num_answers, caption_preprocess=c.caption_preprocess,
                        max_words=c.max_words, text=text, all_captions=all_captions, tags=tags,
                        phrases=phrases)

    def processor(self, train: bool) -> SampleProcessor:
        """Training: one caption (one question with ``task: vqa``) per visit of an image; evaluation: the first
        caption (every question). Retrieval samples are pre-training samples (an image and a caption)."""
        c = self.cfg
        sample = "vqa" if c.task == "vqa" else "pretrain"
        return SampleProcessor(build_transform(c, train=train), seed=c.seed, caption=c.caption if train else "first",
                               hflip=c.hflip and train, two_views=c.two_views and train, regions=c.regions,
                               images=c.images, first_caption_prob=c.first_caption_prob if train else 0.0,
                               task=sample, num_answers=self.num_answers, all_questions=not train,
                               phrases=self.reads_phrases)

    def text_tokenizer(self, train: bool = True) -> TextTokenizer:
        """Caption pre-processing + tokenisation at ``max_text_len`` (training) or ``eval_max_text_len``."""
        c = self.cfg
        length = c.max_text_len if train else (c.eval_max_text_len or c.max_text_len)
        return TextTokenizer(self.tokenizer, length, preprocess=c.caption_preprocess, max_words=c.max_words)

    def _source(self, path: str, weight: float = 1.0) -> Source:
        index = read_index(path)
        if self.cfg.regions and not index.get("regions"):
            raise ShardFormatError(f"{Path(path) / 'index.json'}: field 'regions' is null but data.regions=true "
                                   "(run the region-feature recipe for this source, or set data.regions=false)")
        if self.cfg.task == "vqa":
            own = (index.get("meta") or {}).get("answers")
            if isinstance(own, list) and [str(a) for a in own] != self.answers:
                raise ShardFormatError(f"{Path(path) / 'index.json'}: its answer vocabulary (meta.answers, "
                                       f"{len(own)} answers) differs from the one in use ({len(self.answers)}); its "
                                       "labels would name other answers. Rebuild the shards with one vocabulary")
        return Source.from_dir(path, weight, index)

    def _check_sources(self, sources: list[Source]) -> None:
        if self.cfg.regions:
            specs = {repr(s.index.get("regions")) for s in sources}
            if len(specs) > 1:
                raise ShardFormatError("the train sources carry different region-feature specs in index.json: "
                                       + "; ".join(f"{s.path}: {s.index.get('regions')}" for s in sources))
        for s in sources:
            if s.index.get("split") != "train":
                warnings.warn(f"data.train source {s.path} holds split {s.index.get('split')!r}, not 'train'",
                              stacklevel=3)
        if not self.cfg.tokenizer:
            dirs = [Path(s.path) / s.index["tokenizer"] for s in sources if s.index.get("tokenizer")]
            kinds = {(d / "tokenizer.json").read_bytes() if (d / "tokenizer.json").is_file() else str(d.resolve())
                     for d in dirs}
            if len(kinds) > 1:
                warnings.warn(f"the train sources were saved with different tokenizers ({', '.join(map(str, dirs))});"
                              " using the first source's (set data.tokenizer to choose)", stacklevel=3)

    def build_train_stream(self) -> ShardStream:
        c = self.cfg
        sources = share_weights([self._source(s.path, s.weight) for s in c.train], [s.share for s in c.train])
        self._check_sources(sources)
        rank, world = self.topology()
        return ShardStream(sources, batch_size=c.batch_size, process=self.processor(train=True),
                           collate=self.collator(), seed=c.seed, rank=rank, world_size=world,
                           num_workers=c.num_workers, resampled=c.resampled, max_corrupt_ratio=c.max_corrupt_ratio,
                           corrupt_min_samples=c.corrupt_min_samples)

    # -- Lightning hooks ---------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.cfg.train:
            self.train_stream = self.build_train_stream()
            # a new fit starts at the beginning; Lightning restores a checkpoint's position after setup()
            self.position = StreamPosition()
            self._ready_at_record = None

    def train_dataloader(self) -> DataLoader:
        if not self.cfg.train:
            raise DataError("data.train is empty: no training sources")
        if self.train_stream is None:
            self.train_stream = self.build_train_stream()
        k = self.cfg.num_workers
        self._position_stream(self.train_stream)  # now: Lightning reads len() of the loader before iterating it
        return _StreamLoader(self.train_stream, self._position_stream, self.cfg, pin_memory=torch.cuda.is_available(),
                             persistent_workers=False, prefetch_factor=2 if k > 0 else None)

    def _eval_loader(self, shard_dir: str, collate: Optional[Collator] = None, pin_memory: Optional[bool] = None,
                     source: Optional[Source] = None) -> DataLoader:
        c = self.cfg
        stream = ShardEvalStream(source or self._source(shard_dir), batch_size=c.eval_batch_size,
                                 process=self.processor(train=False), collate=collate or self.collator(),
                                 num_workers=c.num_workers, max_corrupt_ratio=c.max_corrupt_ratio,
                                 corrupt_min_samples=c.corrupt_min_samples)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        return _TimedLoader(stream, c, f"the evaluation loader of {shard_dir}", rank=self.topology()[0],
                            pin_memory=pin)

    def val_dataloader(self):
        return self._eval_loader(self.cfg.val) if self.cfg.val else []

    def test_dataloader(self):
        return self._eval_loader(self.cfg.test) if self.cfg.test else []

    def eval_dataloader(self, split: str) -> DataLoader:
        """The in-order loader of ``split`` (``val``/``test``): every sample once; with ``task: vqa`` every question
        once (batches of ``eval_batch_size`` images with all their questions)."""
        return self._eval_loader(self._split_dir(split))

    def _split_dir(self, split: str, what: str = "") -> str:
        shard_dir = {"val": self.cfg.val, "test": self.cfg.test}.get(split)
        if shard_dir is None:
            raise DataError(f"{what}data.{split} is not set" if split in ("val", "test")
                             else f"{what}split must be 'val' or 'test', got {split!r}")
        return shard_dir

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "stream_state" in batch:
            self.record(batch)
        return batch

    def state_dict(self) -> dict:
        return self.position.state_dict(exclude_last=self._step_in_flight())

    def load_state_dict(self, state_dict: dict) -> None:
        self.position.load_state_dict(state_dict)

    # -- position ----------------------------------------------------------------------------------------------------
    def record(self, batch: dict) -> None:
        """Count ``batch`` as consumed by training (Lightning does this through ``on_before_batch_transfer``)."""
        self.position.record(batch, self.train_stream)
        progress = self._batch_progress()
        self._ready_at_record = progress.ready if progress is not None else None

    def _batch_progress(self):
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        try:
            return trainer.fit_loop.epoch_loop.batch_progress.total  # not reset per epoch
        except AttributeError:
            return None

    def _step_in_flight(self) -> bool:
        """True when a checkpoint is written while the last recorded batch's step has not finished (a SLURM signal
        handler saving mid-step): Lightning then replays that batch on resume, so the position must not count it.
        A checkpoint from ``on_train_batch_end`` (ModelCheckpoint) or later counts it."""
        progress = self._batch_progress()
        if progress is None or self._ready_at_record is None:
            return False
        return progress.ready == self._ready_at_record or progress.processed < progress.ready

    def corrupt_count(self) -> int:
        """Corrupt samples met by this rank's training stream so far (all workers, across resumes)."""
        return self.position.corrupt

    def seen_count(self) -> int:
        """Samples read by this rank's training stream so far (corrupt ones and their replacements included)."""
        return self.position.seen

    def _position_stream(self, stream: ShardStream) -> None:
        """Set the stream's epoch, start batch and elastic hops for the iteration that is about to begin (and keep
        Lightning's idea of the epoch's length in step: ``_follow_epoch_length``)."""
        pos, trainer = self.position, self.trainer
        current = trainer.current_epoch if trainer is not None else (pos.epoch or 0)
        epoch, batches, hops = current, 0, ()
        if pos.epoch is not None:
            epoch, batches, hops = resume_position(stream, pos.state_dict(), warn=not self._warned_fingerprint)
            if pos.fingerprint is not None and pos.fingerprint != stream.fingerprint:
                self._warned_fingerprint = True  # (once per run: this runs again for every iteration)
            if current > epoch:
                epoch, batches, hops = current, 0, ()
        stream.epoch, stream.start_batch, stream.hops = int(epoch), int(batches), tuple(hops)
        if trainer is not None:
            self._follow_epoch_length(trainer, elastic=bool(hops))

    def _follow_epoch_length(self, trainer, elastic: bool) -> None:
        """Lightning reads the train loader's length when it sets the loader up (``train_dataloader``, which positions
        the stream first, so an elastic epoch's length is the one it reads) and not again for later epochs; so the
        loader is rebuilt for the epoch after an elastic one, whose length is a normal epoch's again."""
        if elastic and self._reload_every is None:
            self._reload_every = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1
        elif not elastic and self._reload_every is not None:
            trainer.reload_dataloaders_every_n_epochs, self._reload_every = self._reload_every, None

    # -- retrieval evaluation ----------------------------------------------------------------------------------------
    def retrieval_data(self, split: str = "test") -> RetrievalData:
        """All images of ``split`` (``val``/``test``) and ALL their captions, read in order in this process through
        the eval stream (the evaluation ``SampleProcessor`` and the ``Collator``, so images, regions and captions
        are what training sees).

        ``visuals`` yields the collated image batches (see :class:`RetrievalVisuals`); ``texts`` holds every caption
        of every image after ``data.caption_preprocess``; corrupt samples are counted (``visuals.corrupt``), warned
        about and left out of everything.
        """
        shard_dir = self._split_dir(split, f"retrieval_data({split!r}): ")
        if self.cfg.task not in CAPTION_TASKS:
            raise DataError(f"retrieval_data({split!r}): data.task={self.cfg.task!r}; retrieval reads caption "
                             f"shards (data.task one of {', '.join(CAPTION_TASKS)})")
        source = self._source(shard_dir)
        collate = self.collator(text=False, all_captions=True)

        def loader():
            return self._eval_loader(shard_dir, collate, pin_memory=False, source=source)

        keys, image_ids, texts, txt2img, img2txt, kept = [], [], [], [], [], []
        phrases: Optional[list] = [] if self.reads_phrases else None
        nbytes, corrupt = 0, 0
        for batch in loader():
            corrupt += int(batch.get("n_corrupt", 0))
            if phrases is not None:
                for per_caption in batch["all_phrases"]:
                    phrases.extend(per_caption)
            for key, image_id, caps in zip(batch["keys"], batch["image_ids"].tolist(), batch["all_captions"]):
                img2txt.append(list(range(len(texts), len(texts) + len(caps))))
                txt2img.extend([len(keys)] * len(caps))
                texts.extend(caps)
                keys.append(key)
                image_ids.append(int(image_id))
            if kept is not None:  # keep the batches while they fit, else re-read them on each iteration
                nbytes += batch_nbytes(batch)
                if nbytes <= RETRIEVAL_TENSOR_BUDGET:
                    kept.append(visual_part(batch))
                else:
                    kept = None
        if corrupt:
            warnings.warn(f"retrieval_data({split!r}): {corrupt} corrupt sample(s) of {shard_dir} left out",
                          stacklevel=2)
        if not keys:
            raise DataError(f"retrieval_data({split!r}): no readable samples in {shard_dir}")
        return RetrievalData(RetrievalVisuals(loader, keys, kept, corrupt), texts, txt2img, img2txt, keys, image_ids,
                             phrases)

    def encode_texts(self, texts: list[str], phrases: Optional[list] = None) -> dict:
        """Evaluation texts -> ``{"input_ids", "attention_mask"}`` (int64 [N, L], one common L for all texts: the
        longest, at most ``eval_max_text_len``), after the same caption pre-processing as training. With
        ``data.phrases`` each text's phrase tokens follow its words (``phrases``: one list of tuples per text;
        None: no phrases) and ``phrase_mask`` is added."""
        if not texts:
            raise DataError("encode_texts: no texts")
        tok = self.text_tokenizer(train=False)
        tokens = tok(texts)
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if self.reads_phrases:
            if phrases is None:
                phrases = [[] for _ in texts]
            if len(phrases) != len(texts):
                raise DataError(f"encode_texts: {len(phrases)} phrase lists for {len(texts)} texts")
            _, rows = self.concept_rows(tok.max_len)
            out = rows(out, phrases)
        return out


__all__ = ["ShardDataModule", "StreamPosition", "RetrievalData", "RetrievalVisuals", "resolve_tokenizer",
           "resolve_answers"]
