"""``ShardDataModule``: the ``data`` section (``ShardsDataConfig``) as a LightningDataModule with exact resume.

Training batches come from ``vlp.data.stream.ShardStream`` (mixture, node/worker split, equal batches per rank,
deterministic order, corrupt-sample accounting); see ``vlp.data.collate`` for the batch keys.

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
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from vlp.data.collate import IMAGE_EXTS, Collator, SampleProcessor, stable_image_id
from vlp.data.config import ShardsDataConfig
from vlp.data.shards import ShardFormatError, read_index
from vlp.data.stream import (CorruptCounter, CorruptSample, ShardEvalStream, ShardStream, Source)
from vlp.data.tokenizer import load_tokenizer
from vlp.data.transforms import build_transform

RETRIEVAL_TENSOR_BUDGET = 2 << 30  # bytes: above this, retrieval images are re-read lazily instead of kept


def resolve_tokenizer(cfg: ShardsDataConfig) -> str:
    """``cfg.tokenizer``, or the tokenizer directory named by the first train (else val/test) source's index.json."""
    if cfg.tokenizer:
        return cfg.tokenizer
    first = cfg.train[0].path if cfg.train else (cfg.val or cfg.test)
    if not first:
        raise ValueError("data.tokenizer is not set and there is no shard directory to take it from")
    name = read_index(first, check_files=False).get("tokenizer")
    if not name:
        raise ValueError(f"data.tokenizer is not set and {Path(first) / 'index.json'} names no tokenizer; "
                         "set data.tokenizer to a Hugging Face name or a saved tokenizer directory")
    path = Path(name)
    return str(path if path.is_absolute() else Path(first) / path)


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
            raise ValueError("data.answers is not set and there is no shard directory to take it from")
        meta = read_index(first, check_files=False).get("meta") or {}
        if isinstance(meta.get("answers"), list):
            return [str(a) for a in meta["answers"]]
        if not meta.get("answers_file"):
            raise ValueError(f"data.answers is not set and {Path(first) / 'index.json'} names no answer vocabulary "
                             "(meta.answers / meta.answers_file); is it a VQA shard directory (data_recipes/vqa.py)?")
        path = Path(meta["answers_file"])
        path = path if path.is_absolute() else Path(first) / path
    try:
        answers = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the answer vocabulary {path}: {e}") from None
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{path}: expected a non-empty JSON list of answers (index = label)")
    return [str(a) for a in answers]


class StreamPosition:
    """Where the training stream stands: epoch, batches consumed in it, and sample counters (rank-local)."""

    def __init__(self):
        self.epoch: Optional[int] = None
        self.batches = 0
        self.seen = 0
        self.corrupt = 0
        self.fingerprint: Optional[int] = None
        self.batches_per_rank: Optional[int] = None
        self.last = (0, 0)  # n_seen, n_corrupt of the last recorded batch

    def record(self, batch: dict, stream: Optional[ShardStream] = None) -> None:
        st = batch["stream_state"]
        self.epoch = int(st["epoch"])
        self.batches = int(st["index"]) + 1
        self.last = (int(batch.get("n_seen", 0)), int(batch.get("n_corrupt", 0)))
        self.seen += self.last[0]
        self.corrupt += self.last[1]
        if stream is not None:
            self.fingerprint, self.batches_per_rank = stream.fingerprint, len(stream)

    def state_dict(self, exclude_last: bool = False) -> dict:
        """The position; ``exclude_last``: as if the last recorded batch had not been consumed (it is replayed)."""
        batches, seen, corrupt = self.batches, self.seen, self.corrupt
        if exclude_last and batches > 0:
            batches, seen, corrupt = batches - 1, seen - self.last[0], corrupt - self.last[1]
        return {"version": 1, "epoch": self.epoch, "batches": batches, "seen": seen, "corrupt": corrupt,
                "fingerprint": self.fingerprint, "batches_per_rank": self.batches_per_rank}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"data stream state: unknown version {state.get('version')!r} (expected 1)")
        self.epoch = state["epoch"]
        self.batches = int(state["batches"])
        self.seen, self.corrupt = int(state.get("seen", 0)), int(state.get("corrupt", 0))
        self.fingerprint, self.batches_per_rank = state.get("fingerprint"), state.get("batches_per_rank")


class _StreamLoader(DataLoader):
    """A DataLoader over a ShardStream that positions the stream (epoch, start batch) each time it is iterated."""

    def __init__(self, stream: ShardStream, planner, **kwargs):
        super().__init__(stream, batch_size=None, **kwargs)
        self._planner = planner

    def __iter__(self):
        self._planner(self.dataset)
        return super().__iter__()


class RetrievalData(tuple):
    """``(images, texts, txt2img, img2txt)``; also ``.keys`` and ``.image_ids`` of the images, in order."""

    keys: list
    image_ids: list

    def __new__(cls, images, texts, txt2img, img2txt, keys, image_ids):
        obj = super().__new__(cls, (images, texts, txt2img, img2txt))
        obj.keys, obj.image_ids = keys, image_ids
        return obj


class RetrievalImages:
    """Lazily re-read retrieval images (for sets too big to hold): iterating yields float tensors [b, 3, S, S] in
    order, ``len()`` is the number of images."""

    def __init__(self, shards: list[str], keys: list[str], transform, batch_size: int):
        self.shards, self.keys, self.transform, self.batch_size = shards, keys, transform, batch_size

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        wanted = set(self.keys)
        pending: list = []
        got = 0
        ds = wds.WebDataset(self.shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                            empty_check=False).decode("pilrgb", only=list(IMAGE_EXTS))
        for sample in ds:
            key = sample["__key__"]
            if key not in wanted:
                continue
            if key != self.keys[got]:
                raise RuntimeError(f"retrieval images: expected {self.keys[got]}, read {key}; did the shards change?")
            img = next(sample[e] for e in IMAGE_EXTS if e in sample)
            pending.append(self.transform(img, False))
            got += 1
            if len(pending) == self.batch_size:
                yield torch.stack(pending)
                pending = []
        if pending:
            yield torch.stack(pending)
        if got != len(self.keys):
            raise RuntimeError(f"retrieval images: read {got} of {len(self.keys)} images; did the shards change?")


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards for training (exactly resumable), validation and test, and retrieval evaluation.

    ``rank``/``world_size`` default to the trainer's (or torch.distributed's); pass them to simulate ranks.
    """

    def __init__(self, cfg: ShardsDataConfig, *, tokenizer=None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self._tokenizer = tokenizer
        self._rank, self._world_size = rank, world_size
        self.train_stream: Optional[ShardStream] = None
        self.position = StreamPosition()
        self._warned_fingerprint = False
        self._ready_at_record: Optional[int] = None
        self._answers: Optional[list[str]] = None

    # -- pieces ------------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_tokenizer(self.cfg))
        return self._tokenizer

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

    def collator(self) -> Collator:
        c = self.cfg
        return Collator(self.tokenizer, max_text_len=c.max_text_len, mlm_probability=c.mlm_probability,
                        whole_word_masking=c.whole_word_masking, regions=c.regions, normalize=c.normalize,
                        num_answers=self.num_answers)

    def processor(self, train: bool) -> SampleProcessor:
        """Training: one caption (one question with ``task: vqa``) per visit of an image; evaluation: the first
        caption (every question)."""
        c = self.cfg
        return SampleProcessor(build_transform(c, train=train), seed=c.seed, caption=c.caption if train else "first",
                               hflip=c.hflip and train, two_views=c.two_views and train, regions=c.regions,
                               first_caption_prob=c.first_caption_prob if train else 0.0, task=c.task,
                               num_answers=self.num_answers, all_questions=not train)

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
        sources = [self._source(s.path, s.weight) for s in c.train]
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
            raise ValueError("data.train is empty: no training sources")
        if self.train_stream is None:
            self.train_stream = self.build_train_stream()
        k = self.cfg.num_workers
        return _StreamLoader(self.train_stream, self._position_stream, num_workers=k,
                             pin_memory=torch.cuda.is_available(), persistent_workers=False,
                             prefetch_factor=2 if k > 0 else None)

    def _eval_loader(self, shard_dir: str) -> DataLoader:
        c = self.cfg
        stream = ShardEvalStream(self._source(shard_dir), batch_size=c.eval_batch_size,
                                 process=self.processor(train=False), collate=self.collator(),
                                 num_workers=c.num_workers, max_corrupt_ratio=c.max_corrupt_ratio,
                                 corrupt_min_samples=c.corrupt_min_samples)
        return DataLoader(stream, batch_size=None, num_workers=c.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        return self._eval_loader(self.cfg.val) if self.cfg.val else []

    def test_dataloader(self):
        return self._eval_loader(self.cfg.test) if self.cfg.test else []

    def eval_dataloader(self, split: str) -> DataLoader:
        """The in-order loader of ``split`` (``val``/``test``): every sample once; with ``task: vqa`` every question
        once (batches of ``eval_batch_size`` images with all their questions)."""
        shard_dir = {"val": self.cfg.val, "test": self.cfg.test}.get(split)
        if shard_dir is None:
            raise ValueError(f"data.{split} is not set" if split in ("val", "test")
                             else f"split must be 'val' or 'test', got {split!r}")
        return self._eval_loader(shard_dir)

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
        """Set the stream's epoch and start batch for the iteration that is about to begin."""
        pos, nb = self.position, len(stream)
        trainer = self.trainer
        current = trainer.current_epoch if trainer is not None else (pos.epoch or 0)
        if pos.epoch is None:
            epoch, batches = current, 0
        else:
            batches = pos.batches
            if pos.fingerprint is not None and pos.fingerprint != stream.fingerprint:
                old = max(1, int(pos.batches_per_rank or 1))
                batches = min(nb, batches * nb // old)
                if not self._warned_fingerprint:
                    self._warned_fingerprint = True
                    warnings.warn(
                        "data stream: the checkpoint's position was saved with another world size, worker count, "
                        f"batch size or data; exact resume is impossible. Continuing epoch {pos.epoch} at the same "
                        f"fraction ({batches}/{nb} batches): some samples of this epoch may repeat or be skipped.",
                        stacklevel=2)
                pos.batches, pos.fingerprint, pos.batches_per_rank = batches, stream.fingerprint, nb
            epoch = max(current, pos.epoch)
            if pos.epoch != epoch:
                batches = 0
            elif batches >= nb:
                epoch, batches = epoch + 1, 0
        stream.epoch, stream.start_batch = int(epoch), int(batches)

    # -- retrieval evaluation ----------------------------------------------------------------------------------------
    def retrieval_data(self, split: str = "test") -> RetrievalData:
        """All images of ``split`` (``val``/``test``) and ALL their captions, read in order in this process.

        Returns ``(images, texts, txt2img, img2txt)``: ``images`` a float tensor [N, 3, S, S] (or, above
        ``RETRIEVAL_TENSOR_BUDGET`` bytes, a ``RetrievalImages`` iterable of such batches), ``texts`` every caption,
        ``txt2img[t]`` the image index of text ``t``, ``img2txt[i]`` the text indices of image ``i``. Corrupt samples
        are counted and left out (``.keys``/``.image_ids`` give the images kept).
        """
        shard_dir = {"val": self.cfg.val, "test": self.cfg.test}.get(split)
        if shard_dir is None:
            raise ValueError(f"retrieval_data({split!r}): data.{split} is not set" if split in ("val", "test")
                             else f"retrieval_data: split must be 'val' or 'test', got {split!r}")
        source = Source.from_dir(shard_dir)
        transform = build_transform(self.cfg, train=False)
        size = self.cfg.image_size
        keep = source.num_samples * 3 * size * size * 4 <= RETRIEVAL_TENSOR_BUDGET
        counter = CorruptCounter(self.cfg.max_corrupt_ratio, self.cfg.corrupt_min_samples,
                                 where=f" from {shard_dir} (retrieval {split})")

        def seen(sample):
            counter.count_seen()
            return sample

        def process(sample):
            info = sample.get("json")
            images = [sample[e] for e in IMAGE_EXTS if e in sample]
            if not isinstance(info, dict) or not images:
                raise CorruptSample(f"sample {sample['__key__']}: needs an image and a json member")
            caps = info.get("captions")
            if not caps or not all(isinstance(t, str) for t in caps):
                raise CorruptSample(f"sample {sample['__key__']}: 'captions' must be a non-empty list of strings")
            return (sample["__key__"], [t.strip() for t in caps], stable_image_id(info.get("image_id",
                                                                                            sample["__key__"])),
                    transform(images[0], False) if keep else None)

        ds = (wds.WebDataset(list(source.shards), shardshuffle=False, nodesplitter=None, workersplitter=None,
                             handler=counter, empty_check=False)
              .map(seen, handler=counter)
              .decode("pilrgb", only=[*IMAGE_EXTS, "json"], handler=counter)
              .map(process, handler=counter))
        keys, image_ids, tensors, texts, txt2img, img2txt = [], [], [], [], [], []
        for key, caps, image_id, tensor in ds:
            img2txt.append(list(range(len(texts), len(texts) + len(caps))))
            txt2img.extend([len(keys)] * len(caps))
            texts.extend(caps)
            keys.append(key)
            image_ids.append(image_id)
            if tensor is not None:
                tensors.append(tensor)
        if counter.corrupt:
            warnings.warn(f"retrieval_data({split!r}): {counter.corrupt} corrupt sample(s) left out "
                          f"(last: {counter.last})", stacklevel=2)
        if not keys:
            raise ValueError(f"retrieval_data({split!r}): no readable samples in {shard_dir}")
        if keep:
            images = torch.stack(tensors)
        else:
            images = RetrievalImages(list(source.shards), keys, transform, self.cfg.eval_batch_size)
        return RetrievalData(images, texts, txt2img, img2txt, keys, image_ids)


__all__ = ["ShardDataModule", "StreamPosition", "RetrievalData", "RetrievalImages", "resolve_tokenizer",
           "resolve_answers"]
