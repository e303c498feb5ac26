"""Shard streams whose sample order is a pure function of (seed, epoch, world size, rank, workers) (DESIGN §7).

Training stream (``ShardStream``), per epoch:

1. Every source (a shard directory with ``index.json``) is laid out as the concatenation of its shards in a seeded
   per-(epoch, cycle) shard order; the samples inside each shard are permuted by a seeded per-(epoch, cycle, shard)
   permutation. This global sequence is cut into ``S = world_size x max(1, num_workers)`` contiguous, equal ranges
   (+-1 sample), one per *slot* (rank, worker): a slot reads its whole shards and at most two shared boundary shards.
   Counts come from ``index.json``, so every rank computes the same layout without communicating.
2. A slot draws ``floor(weight x range)`` samples from each source (weight 1: one pass; 2: two passes with fresh
   permutations; 0.5: half a range), interleaved by a seeded permutation of the source labels.
3. Batching happens inside the dataset: a worker yields whole batches of ``batch_size`` items, and every worker of
   every rank yields the same number of batches, ``min over slots of floor(quota / batch_size)`` (the remainder is
   dropped), so DDP never waits on a rank that ran out. Batch ``i`` of a rank's loader comes from worker
   ``i % num_workers`` (torch's DataLoader round-robins over workers).
4. A corrupt sample (unreadable tar member, truncated tar, undecodable image, missing field) is counted and replaced
   by the item at the same offset of a later cycle of the same slot, which is a pure function of its position; so a
   batch's content never depends on what happened earlier, and resuming needs no per-worker state. Each batch
   carries what its worker read and skipped, per source and reason (``sample_counts``), so the main process can sum
   them over workers (and ranks) and say what was skipped at the end of an epoch and of the run
   (:class:`CorruptTally`, :func:`corrupt_summary_callback`).

Resume: the position is the number of batches the training loop consumed in the epoch, ``p``. Worker ``w`` of the
new loader plays logical worker ``(w + p) % K``, so the round-robin continues where it stopped; each logical worker
skips its consumed batches arithmetically (whole shards by index) and locates its next item in one shard, whose
tar headers it scans without reading or decoding any skipped sample. The cost does not grow with the position.

Elastic resume: a position saved under another topology (world size, workers, batch size) over the same data
(same sources, seed and sampling) continues the epoch exactly over the union of ranks. The samples of the epoch that
no rank had consumed yet -- the unconsumed tail of every old slot, in old slot order -- are concatenated and cut again
into equal contiguous ranges over the new slots (a :class:`Hop` records each earlier topology and how far it got;
hops nest, so 2 -> 1 -> 3 ranks works). Each sample keeps its identity and its per-sample seed, so it is decoded and
augmented exactly as the uninterrupted run would have; no sample is repeated, and only the fewer than one global batch
(new ranks x new batch size x workers) that do not fill a whole step on every rank are dropped, with a warning, as
every epoch drops its remainder. The next epoch is laid out for the new topology as usual. A position saved over
other data resumes at the same fraction of the epoch instead, with a warning.

``resampled=True`` replaces step 1 by independent, seeded, size-weighted shard draws with replacement per slot
(still reproducible and resumable); epochs keep the nominal length.

Tar reading is done here, not by ``webdataset.WebDataset``: its tar reader streams every byte (a skip would read all
skipped data), its shuffle buffer is not replayable, and ``resampled`` is not deterministic across workers
(ENGINEERING.md). webdataset's decoder and the counting handler are used for the samples themselves; in-order
evaluation reads go through ``webdataset.WebDataset`` (see ``vlp.data.datamodule``).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import re
import tarfile
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from vlp.data.shards import ShardFormatError, read_index, shard_paths
from vlp.errors import DataError

# Tags that keep the seeded random streams apart.
_TAG_SHARDS, _TAG_SAMPLES, _TAG_MIX, _TAG_DRAWS, _TAG_DRAW_SAMPLES = 1, 2, 3, 4, 5
_DRAW_BLOCK = 64


def stable_hash(*parts: Any) -> int:
    """A 63-bit hash of ints/strs/tuples that is the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


class CorruptSample(Exception):
    """One sample cannot be used (missing field, unreadable member, ...); it is counted and skipped, under
    ``reason`` (one of :data:`CORRUPT_REASONS`; None: told from the message, see :func:`corrupt_reason`)."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason


class CorruptDataError(DataError, RuntimeError):
    """Too many corrupt samples: the run stops. The message names the shard. (A ``RuntimeError`` as it always was,
    and a ``DataError``: ``vlp`` prints it as one line.)"""


# Why a sample was skipped, as the end-of-epoch summary counts it.
CORRUPT_REASONS = ("unreadable", "missing_member", "bad_image", "bad_json", "bad_regions", "other")
_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def corrupt_reason(exn: BaseException) -> str:
    """The :data:`CORRUPT_REASONS` entry of a corrupt sample's error: the reason it was raised with, else the member
    that failed to decode (webdataset's ``DecodingError`` names it), else what its message is about."""
    reason = getattr(exn, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    member = getattr(exn, "k", None) if type(exn).__name__ == "DecodingError" else None
    if isinstance(member, str):
        ext = member.lower().rsplit(".", 1)[-1]  # "regions.npz" -> "npz"
        return ("bad_image" if ext in _IMAGE_MEMBERS else "bad_json" if ext == "json"
                else "bad_regions" if ext == "npz" else "other")
    text = str(exn)
    if re.search(r"has no .*member", text):
        return "missing_member"
    if "regions.npz" in text:
        return "bad_regions"
    if "json field" in text or "question" in text:
        return "bad_json"
    if isinstance(exn, (OSError, SyntaxError)) and "image" in text.lower():  # PIL on a bad image
        return "bad_image"
    return "other"


class CorruptCounter:
    """A counting error handler in webdataset's convention (``handler(exn) -> True``: skip the sample, go on).

    Unlike ``webdataset.warn_and_continue`` it does not sleep; it counts errors per shard and raises
    ``CorruptDataError`` once more than ``max_ratio`` of at least ``min_samples`` seen samples were corrupt: the
    minimum keeps a few bad samples at the very start (one corrupt sample of the first three is 33 %) from stopping
    a run whose data are fine overall. ``seen`` is counted by whoever reads the samples (``count_seen``).
    ``counts`` holds ``(source, "read")`` and ``(source, reason)`` for the summaries (:class:`CorruptTally`).
    """

    def __init__(self, max_ratio: Optional[float] = 0.01, min_samples: int = 100, where: str = ""):
        self.max_ratio, self.min_samples, self.where = max_ratio, min_samples, where
        self.seen = 0
        self.corrupt = 0
        self.by_shard: Counter = Counter()
        self.counts: Counter = Counter()
        self.last: Optional[tuple[str, str, str]] = None
        self.current_url: Optional[str] = None  # set by the reader when it knows the shard in flight

    def count_seen(self, n: int = 1, source: str = "?") -> None:
        self.seen += n
        self.counts[(source, "read")] += n

    def __call__(self, exn: BaseException, url: Optional[str] = None, key: Optional[str] = None,
                 source: str = "?") -> bool:
        url = url or getattr(exn, "url", None) or self.current_url or "?"
        key = key or getattr(exn, "key", None) or "?"
        cause = exn.__cause__ if exn.__cause__ is not None else exn
        self.corrupt += 1
        self.by_shard[url] += 1
        self.counts[(source, corrupt_reason(exn))] += 1
        self.last = (str(url), str(key), f"{type(cause).__name__}: {cause}"[:300])
        self.check()
        return True

    def check(self) -> None:
        if self.max_ratio is None or self.seen < self.min_samples or self.corrupt <= self.max_ratio * self.seen:
            return
        shard, n = self.by_shard.most_common(1)[0]
        url, key, err = self.last
        raise CorruptDataError(
            f"{self.corrupt} of {self.seen} samples read{self.where} were corrupt ({self.corrupt / self.seen:.1%}), "
            f"above data.max_corrupt_ratio={self.max_ratio}: stopping. Shard with the most corrupt samples: "
            f"{shard} ({n}). Last: sample {key} of {url}: {err}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Tar shards: header scan (no data read) and random access to one sample's members.

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


@dataclass
class TarSamples:
    path: str
    samples: list  # [(key, {ext: (offset, size)})] in tar order
    error: Optional[str]  # why the scan stopped early (truncated or unreadable tar), else None


def _add_member(samples: list, name: str, offset: int, size: int) -> None:
    m = _NAME.match(name)
    if m is None:
        return
    key, ext = m.group(1), m.group(2).lower()
    if not samples or samples[-1][0] != key:
        samples.append((key, {}))
    samples[-1][1][ext] = (offset, size)


class _NeedTarfile(Exception):
    """The archive uses a header type the fast scanner leaves to ``tarfile`` (pax, GNU long names, ...)."""


def _scan_ustar(f, size: int, samples: list) -> Optional[str]:
    """Fast path for plain ustar/v7 archives (what ``write_shard`` and most tools write): one 512-byte read per member.
    Returns the reason the scan stopped early, or None."""
    offset = 0
    while offset + 512 <= size:
        f.seek(offset)
        block = f.read(512)
        if len(block) < 512:
            return "truncated header"
        if block == bytes(512):
            return None  # end-of-archive marker
        try:
            chksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return f"bad header at byte {offset}"
        if chksum != sum(block[:148]) + 256 + sum(block[156:]):
            return f"bad header checksum at byte {offset}"
        kind = block[156:157]
        if kind not in (b"0", b"\0", b"5", b"1", b"2", b"3", b"4", b"6", b"7"):
            raise _NeedTarfile(kind)
        if block[124] & 0x80:
            raise _NeedTarfile("base-256 size")
        msize = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX prefix (GNU tar uses these bytes otherwise)
            name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        data = offset + 512
        if kind in (b"0", b"\0", b"7"):
            if data + msize > size:
                return f"truncated inside member {name!r}"
            _add_member(samples, name, data, msize)
        offset = data + (msize + 511) // 512 * 512
    return None if offset >= size else "truncated header"


def scan_tar(path: str) -> TarSamples:
    """Read the member headers of a tar file (seeking over the data) and group them into samples by key."""
    samples: list = []
    error = None
    try:
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                error = _scan_ustar(f, size, samples)
        except _NeedTarfile:
            samples.clear()
            with tarfile.open(path, "r:") as tf:
                while True:
                    info = tf.next()
                    if info is None:
                        break
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        error = f"truncated inside member {info.name!r}"
                        break
                    _add_member(samples, info.name, info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    return TarSamples(path, samples, error)


class ShardReader:
    """Random access to samples of tar shards, keeping the header index of the last few shards.

    ``read`` reads only the members of the requested sample; nothing else is read or decoded.
    """

    def __init__(self, cache_size: int = 4):
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[TarSamples, Any]] = OrderedDict()
        self.scans = 0  # header scans done
        self.reads = 0  # samples whose data was read

    def _entry(self, path: str):
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        ts = scan_tar(path)
        self.scans += 1
        try:
            fh = open(path, "rb")
        except OSError:
            fh = None
        self._cache[path] = (ts, fh)
        while len(self._cache) > self.cache_size:
            _, (_, old) = self._cache.popitem(last=False)
            if old is not None:
                old.close()
        return ts, fh

    def read(self, path: str, i: int, expected: int) -> dict:
        """The raw sample ``i`` (tar order) of ``path`` as ``{"__key__", "__url__", ext: bytes}``."""
        ts, fh = self._entry(path)
        if len(ts.samples) > expected:
            raise ShardFormatError(f"{path}: holds {len(ts.samples)} samples but index.json says {expected}; "
                                   "the shard was rewritten without updating index.json")
        if i >= len(ts.samples) or fh is None:
            why = ts.error or f"the tar holds only {len(ts.samples)} of the {expected} samples index.json lists"
            raise CorruptSample(f"sample #{i} of {path} is unreadable ({why})", reason="unreadable")
        key, members = ts.samples[i]
        raw: dict = {"__key__": key, "__url__": path}
        for ext, (offset, size) in members.items():
            fh.seek(offset)
            data = fh.read(size)
            if len(data) != size:
                raise CorruptSample(f"member {key}.{ext} of {path} is truncated", reason="unreadable")
            raw[ext] = data
        self.reads += 1
        return raw

    def close(self) -> None:
        for _, fh in self._cache.values():
            if fh is not None:
                fh.close()
        self._cache.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------------------------
# Sources and the per-epoch layout (pure arithmetic on index.json counts).


@dataclass(frozen=True)
class Source:
    """A shard directory: its shards, their sample counts (from index.json) and its mixture weight."""

    path: str
    name: str
    weight: float
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    index: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dir(cls, path: str, weight: float = 1.0, index: Optional[dict] = None) -> "Source":
        index = index or read_index(path)
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"data source {path}: weight {weight} must be a finite number >= 0")
        return cls(path=str(path), name=index["source"], weight=float(weight),
                   shards=tuple(shard_paths(path, index)), sizes=tuple(s["samples"] for s in index["shards"]),
                   index=index)

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


class StreamLayout:
    """Which part of each source every (rank, worker) slot reads in an epoch, and how many batches all yield."""

    def __init__(self, sources: Sequence[Source], *, world_size: int, num_workers: int, batch_size: int):
        if not sources:
            raise ValueError("data.train is empty: no training sources")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.world_size, self.num_workers, self.batch_size = world_size, num_workers, batch_size
        self.K = max(1, num_workers)
        self.S = world_size * self.K
        self.ranges = [[(i * src.num_samples // self.S, (i + 1) * src.num_samples // self.S) for i in range(self.S)]
                       for src in sources]
        self.quotas = [[int(math.floor(src.weight * (hi - lo) + 1e-9)) for lo, hi in rng_]
                       for src, rng_ in zip(sources, self.ranges)]
        per_slot = [sum(q[i] for q in self.quotas) for i in range(self.S)]
        self.batches_per_worker = min(per_slot) // batch_size
        if self.batches_per_worker == 0:
            sizes = ", ".join(f"{s.path}: {s.num_samples} x weight {s.weight:g}" for s in sources)
            raise ValueError(
                f"too little training data for {world_size} rank(s) x {self.K} worker slot(s) x batch_size "
                f"{batch_size}: the smallest slot gets {min(per_slot)} samples ({sizes})"
            )

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_worker * self.K

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.K + worker


def consumed_by_worker(worker: int, batches: int, num_workers: int) -> int:
    """How many of the first ``batches`` batches of a rank's loader came from ``worker`` (round-robin)."""
    k = max(1, num_workers)
    return max(0, (batches - worker + k - 1) // k)


class _SlotWalker:
    """Walks one slot's item sequence for one epoch: item j -> (source, offset in that source's slot stream)."""

    def __init__(self, ds: "ShardStream", epoch: int, slot: int, reader: ShardReader, counter: CorruptCounter,
                 layout: Optional[StreamLayout] = None):
        self.ds, self.epoch, self.slot, self.reader, self.counter = ds, epoch, slot, reader, counter
        self.layout = lay = layout or ds.layout
        self.n_items = lay.batches_per_worker * lay.batch_size
        quotas = [q[slot] for q in lay.quotas]
        if len(ds.sources) == 1:
            self.labels = None
        else:
            labels = np.repeat(np.arange(len(quotas), dtype=np.int32), quotas)
            labels = labels[_rng(ds.seed, epoch, slot, _TAG_MIX).permutation(len(labels))]
            self.labels = labels[: self.n_items]
        self.periods = []
        self.passes = []  # passes over the slot's range of each source per epoch (cycles 0 .. passes - 1)
        for s, src in enumerate(ds.sources):
            lo, hi = lay.ranges[s][slot]
            r = hi - lo
            if ds.resampled:
                self.periods.append(quotas[s] + 1)
                self.passes.append(1)
            else:
                self.passes.append(max(1, -(-quotas[s] // max(r, 1))))
                self.periods.append(max(r, 1) * self.passes[-1])
        self.counts = [0] * len(ds.sources)
        self.j = 0
        self._orders: OrderedDict = OrderedDict()
        self._perms: OrderedDict = OrderedDict()
        self._draws: dict[int, tuple[list, list]] = {}

    def seek(self, j: int) -> None:
        """Position the walker before item ``j`` (arithmetic only)."""
        self.j = j
        if self.labels is None:
            self.counts = [j]
        else:
            self.counts = np.bincount(self.labels[:j], minlength=len(self.ds.sources)).tolist()

    def next(self) -> dict:
        s = 0 if self.labels is None else int(self.labels[self.j])
        k = self.counts[s]
        self.counts[s] += 1
        self.j += 1
        return self._fetch(s, k)

    # -- locating an item -------------------------------------------------------------------------------------------
    def _cached(self, cache: OrderedDict, key, make, size: int = 16):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
        return value

    def locate(self, s: int, k: int) -> tuple[int, int, int]:
        """Item ``k`` of source ``s``'s stream in this slot -> (shard index, sample index in tar order, cycle)."""
        ds, src = self.ds, self.ds.sources[s]
        if ds.resampled:
            return self._locate_resampled(s, k)
        lo, hi = self.layout.ranges[s][self.slot]
        cycle, r = divmod(k, hi - lo)
        g = lo + r

        def make_order():
            order = _rng(ds.seed, self.epoch, s, cycle, _TAG_SHARDS).permutation(len(src.sizes))
            cum = np.concatenate([[0], np.cumsum(np.asarray(src.sizes)[order])]).tolist()
            return order.tolist(), cum

        order, cum = self._cached(self._orders, (s, cycle), make_order, 4)
        t = bisect.bisect_right(cum, g) - 1
        shard = order[t]
        perm = self._cached(self._perms, (s, cycle, shard), lambda: _rng(
            ds.seed, self.epoch, s, cycle, shard, _TAG_SAMPLES).permutation(src.sizes[shard]))
        return shard, int(perm[g - cum[t]]), cycle

    def _locate_resampled(self, s: int, k: int) -> tuple[int, int, int]:
        ds, src = self.ds, self.ds.sources[s]
        draws, ends = self._draws.setdefault(s, ([], []))
        sizes = np.asarray(src.sizes, dtype=np.float64)
        while not ends or ends[-1] <= k:
            block = len(draws) // _DRAW_BLOCK
            picks = _rng(ds.seed, self.epoch, s, self.slot, block, _TAG_DRAWS).choice(
                len(sizes), size=_DRAW_BLOCK, p=sizes / sizes.sum())
            for shard in picks.tolist():
                draws.append(shard)
                ends.append((ends[-1] if ends else 0) + src.sizes[shard])
        d = bisect.bisect_right(ends, k)
        shard = draws[d]
        q = k - (ends[d - 1] if d else 0)
        perm = self._cached(self._perms, (s, d), lambda: _rng(
            ds.seed, self.epoch, s, self.slot, d, _TAG_DRAW_SAMPLES).permutation(src.sizes[shard]))
        return shard, int(perm[q]), d

    # -- reading + processing one item, with deterministic replacement of corrupt ones -----------------------------
    def _fetch(self, s: int, k: int) -> dict:
        ds, src = self.ds, self.ds.sources[s]
        path = "?"
        for t in range(ds.max_retries + 1):
            shard, member, cycle = self.locate(s, k + t * self.periods[s])
            path = src.shards[shard]
            self.counter.current_url = path
            self.counter.count_seen(source=ds.labels[s])
            key = None
            try:
                raw = self.reader.read(path, member, src.sizes[shard])
                key = raw["__key__"]
                return ds.process(raw, {"epoch": self.epoch, "cycle": cycle, "source": src.name,
                                        "passes": self.passes[s]})
            except (ShardFormatError, CorruptDataError):
                raise
            except Exception as exn:  # noqa: BLE001 - any failure of one sample's data is a corrupt sample
                self.counter(exn, url=path, key=key or f"#{member}", source=ds.labels[s])
        raise CorruptDataError(f"{ds.max_retries + 1} corrupt samples in a row in source {src.path} (last in {path}); "
                               f"last error: {self.counter.last}")


@dataclass(frozen=True)
class Hop:
    """An earlier topology of the current epoch: ``world_size`` ranks x ``workers`` slots (``max(1, num_workers)``)
    x ``batch_size``, and the ``batches`` per rank the run consumed under it before it moved on."""

    world_size: int
    workers: int
    batch_size: int
    batches: int

    def as_list(self) -> list[int]:
        return [self.world_size, self.workers, self.batch_size, self.batches]


class _LayoutPlan:
    """An epoch as ``StreamLayout`` cuts it: every slot walks its own ``batches_per_worker x batch_size`` items."""

    def __init__(self, ds: "ShardStream", epoch: int, layout: StreamLayout):
        self.ds, self.epoch, self.layout = ds, epoch, layout
        self.world_size, self.K, self.B = layout.world_size, layout.K, layout.batch_size
        self.batches_per_worker = layout.batches_per_worker
        self.dropped = 0

    def walker(self, slot: int, reader: ShardReader, counter: CorruptCounter) -> _SlotWalker:
        return _SlotWalker(self.ds, self.epoch, slot, reader, counter, self.layout)


class _RemainderPlan:
    """What ``parent`` had left after ``consumed`` batches per rank, cut again over ``world_size x K`` slots of
    ``batch_size`` (module docstring, elastic resume). Item ``j`` of new slot ``i`` is item ``lo_i + j`` of the
    concatenated tails, i.e. a fixed item of one parent slot: arithmetic only, nothing is read to find it."""

    def __init__(self, parent, consumed: int, world_size: int, K: int, batch_size: int):
        self.parent, self.world_size, self.K, self.B = parent, world_size, K, batch_size
        per_slot = parent.batches_per_worker * parent.B
        self.starts = [min(per_slot, consumed_by_worker(w, consumed, parent.K) * parent.B)
                       for _ in range(parent.world_size) for w in range(parent.K)]
        self.cum = np.concatenate([[0], np.cumsum([per_slot - a for a in self.starts])]).tolist()
        total, S = self.cum[-1], world_size * K
        self.ranges = [(i * total // S, (i + 1) * total // S) for i in range(S)]
        self.batches_per_worker = min(hi - lo for lo, hi in self.ranges) // batch_size
        self.dropped = total - S * self.batches_per_worker * batch_size  # this cut only

    def walker(self, slot: int, reader: ShardReader, counter: CorruptCounter) -> "_ChainWalker":
        return _ChainWalker(self, slot, reader, counter)


class _ChainWalker:
    """A slot of a :class:`_RemainderPlan`: its items come from one or more parent slots' tails, in order."""

    def __init__(self, plan: _RemainderPlan, slot: int, reader: ShardReader, counter: CorruptCounter):
        self.plan, self.reader, self.counter = plan, reader, counter
        self.g = self.lo = plan.ranges[slot][0]
        self._parent: Optional[tuple[int, Any]] = None  # (parent slot, its walker positioned at self.g)

    def seek(self, j: int) -> None:
        self.g, self._parent = self.lo + j, None

    def next(self) -> dict:
        plan = self.plan
        o = bisect.bisect_right(plan.cum, self.g) - 1
        if self._parent is None or self._parent[0] != o:
            walker = plan.parent.walker(o, self.reader, self.counter)
            walker.seek(plan.starts[o] + self.g - plan.cum[o])
            self._parent = (o, walker)
        self.g += 1
        return self._parent[1].next()


class ShardStream(IterableDataset):
    """Training batches from a weighted mixture of shard directories, exactly resumable (see the module docstring).

    ``process(raw_sample, meta) -> sample`` decodes/transforms one sample (``meta``: epoch, cycle, source, passes:
    the cycles per epoch of that source, its weight rounded up) and
    ``collate(list_of_samples) -> dict`` builds a batch; both run inside the worker. Each yielded batch carries
    ``n_seen``/``n_corrupt`` (samples read for it / corrupt among them), ``sample_counts`` (the same per source
    label and reason: ``{"coco/train": {"read": 8, "bad_image": 1}}``) and ``stream_state`` (epoch, rank, logical
    worker, ``index`` = its position in this rank's loader order).

    Use with ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)``. Before iterating, set
    ``epoch``/``start_batch`` (``set_epoch``, ``load_state_dict({"epoch": e, "batches": p})``).
    """

    def __init__(self, sources: Sequence[Source], *, batch_size: int, process: Callable[[dict, dict], dict],
                 collate: Callable[[list], dict], seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, resampled: bool = False, max_corrupt_ratio: Optional[float] = 0.01,
                 corrupt_min_samples: int = 100, max_retries: int = 8):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources = list(sources)
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.resampled = resampled
        self.process, self.collate = process, collate
        self.max_corrupt_ratio, self.corrupt_min_samples, self.max_retries = (max_corrupt_ratio, corrupt_min_samples,
                                                                              max_retries)
        self.layout = StreamLayout(self.sources, world_size=world_size, num_workers=num_workers,
                                   batch_size=batch_size)
        self.batch_size = batch_size
        self.labels = source_labels(self.sources)
        self.epoch = 0
        self.start_batch = 0
        self.hops: tuple[Hop, ...] = ()  # earlier topologies of the current epoch (elastic resume)
        self._plans: dict = {}

    # -- sizes and position ------------------------------------------------------------------------------------------
    @property
    def topology(self) -> tuple[int, int, int]:
        """(world size, worker slots per rank, batch size): what the cut of an epoch depends on besides the data."""
        return self.world_size, self.layout.K, self.batch_size

    @property
    def offset(self) -> int:
        """Batches per rank the current epoch consumed under earlier topologies (0 without an elastic resume)."""
        return sum(h.batches for h in self.hops)

    def plan(self, epoch: Optional[int] = None, hops: Optional[Sequence[Hop]] = None):
        """How ``epoch`` is cut over this stream's slots after ``hops`` (default: the current epoch and hops)."""
        epoch = self.epoch if epoch is None else int(epoch)
        hops = self.hops if hops is None else tuple(hops)
        key = (epoch, hops)
        if key not in self._plans:
            if len(self._plans) > 8:
                self._plans.clear()
            # each topology cuts what the previous one left after its consumed batches; the first is a plain layout
            cuts = [(h.world_size, h.workers, h.batch_size) for h in hops] + [self.topology]
            first = self.layout if not hops else StreamLayout(self.sources, world_size=cuts[0][0],
                                                              num_workers=cuts[0][1], batch_size=cuts[0][2])
            plan = _LayoutPlan(self, epoch, first)
            for hop, (world_size, workers, batch_size) in zip(hops, cuts[1:]):
                plan = _RemainderPlan(plan, hop.batches, world_size, workers, batch_size)
            self._plans[key] = plan
        return self._plans[key]

    def __len__(self) -> int:
        """Batches per rank in the current epoch (the same on every rank): the layout's, or after an elastic resume
        the batches consumed before it plus the remainder's."""
        return self.epoch_length(self.epoch, self.hops)

    def epoch_length(self, epoch: int, hops: Sequence[Hop] = ()) -> int:
        """Batches per rank of ``epoch`` after ``hops``, counted from the epoch's start."""
        if not hops:
            return self.layout.batches_per_rank
        plan = self.plan(epoch, hops)
        return sum(h.batches for h in hops) + plan.batches_per_worker * plan.K

    @property
    def fingerprint(self) -> int:
        """Everything the sample order depends on, except epoch and rank."""
        return stable_hash("vlp-stream/1", self.seed, self.world_size, self.layout.K, self.batch_size, self.resampled,
                           self._sources_key())

    @property
    def data_fingerprint(self) -> int:
        """What the samples of an epoch depend on (not how they are cut over ranks, workers and batches): a position
        with the same data fingerprint resumes exactly on any topology (elastic resume)."""
        return stable_hash("vlp-stream-data/1", self.seed, self.resampled, self._sources_key())

    def _sources_key(self) -> tuple:
        # not the directory: moved data still resumes exactly
        return tuple((s.name, s.weight, s.sizes, tuple(os.path.basename(p) for p in s.shards)) for s in self.sources)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch, self.hops = int(epoch), 0, ()

    def state_dict(self, batches: Optional[int] = None) -> dict:
        return {"epoch": self.epoch, "batches": self.start_batch if batches is None else int(batches),
                "batches_per_rank": len(self), "fingerprint": self.fingerprint,
                "data_fingerprint": self.data_fingerprint, "topology": list(self.topology),
                "hops": [h.as_list() for h in self.hops],
                "world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Start the next iteration at ``state["batches"]`` batches into epoch ``state["epoch"]``: exactly, also
        when the state was saved under another topology over the same data (:func:`resume_position`)."""
        self.epoch, self.start_batch, self.hops = resume_position(self, state)

    # -- iteration ---------------------------------------------------------------------------------------------------
    def _worker(self) -> int:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise RuntimeError(f"this ShardStream was laid out for num_workers={self.num_workers}; iterate it "
                                   f"through DataLoader(stream, batch_size=None, num_workers={self.num_workers})")
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"this ShardStream was laid out for num_workers={self.num_workers} but the DataLoader "
                               f"has {info.num_workers} workers")
        return info.id

    def __iter__(self):
        # position captured now, not at the first next()
        return self._batches(self.epoch, self.start_batch, self.hops)

    def _batches(self, epoch: int, p: int, hops: tuple[Hop, ...] = ()):
        plan = self.plan(epoch, hops)
        K, B = self.layout.K, self.batch_size
        offset = sum(h.batches for h in hops)
        p = max(0, p - offset)  # batches of this plan already consumed
        worker = (self._worker() + p) % K  # logical worker: keeps the round-robin order across a resume
        done = consumed_by_worker(worker, p, K)
        reader = ShardReader()
        counter = CorruptCounter(self.max_corrupt_ratio, self.corrupt_min_samples,
                                 where=f" by worker {worker} of rank {self.rank} in epoch {epoch}")
        walker = plan.walker(self.layout.slot(self.rank, worker), reader, counter)
        walker.seek(done * B)
        hop_list = [h.as_list() for h in hops]
        try:
            for b in range(done, plan.batches_per_worker):
                seen0, corrupt0, counts0 = counter.seen, counter.corrupt, counter.counts.copy()
                batch = self.collate([walker.next() for _ in range(B)])
                batch["n_seen"] = counter.seen - seen0
                batch["n_corrupt"] = counter.corrupt - corrupt0
                batch["sample_counts"] = nested_counts(counter.counts - counts0)
                batch["stream_state"] = {"epoch": epoch, "rank": self.rank, "worker": worker, "batch": b,
                                         "index": offset + b * K + worker, "hops": hop_list}
                yield batch
        finally:
            reader.close()


def resume_position(stream: ShardStream, state: dict, warn: bool = True) -> tuple[int, int, tuple[Hop, ...]]:
    """Where ``stream`` continues from a saved position: ``(epoch, start batch, hops)``.

    ``state``: ``epoch``, ``batches`` (consumed per rank in the epoch) and, when saved by this version,
    ``batches_per_rank`` (the epoch's length then), the fingerprints, ``topology`` and ``hops`` of the run that saved
    it. Same topology: continue. Another topology over the same data: elastic resume (the module docstring), which
    adds a hop. Other data (or a state without fingerprints of the data): the same fraction of the epoch, with a
    warning. A position at the end of its epoch continues at the start of the next one.
    """
    epoch, batches = int(state["epoch"]), int(state["batches"])
    hops = tuple(Hop(*h) for h in state.get("hops") or ())
    saved_length = state.get("batches_per_rank")
    fingerprint = state.get("fingerprint")
    if fingerprint is None or fingerprint == stream.fingerprint:
        length = stream.epoch_length(epoch, hops)
    elif saved_length is not None and batches >= int(saved_length):
        length = batches  # the epoch was over under the old topology: nothing of it is left
    elif state.get("data_fingerprint") == stream.data_fingerprint and state.get("topology") is not None:
        topology = state["topology"]
        hops = hops + (Hop(*topology, batches - sum(h.batches for h in hops)),)
        length = stream.epoch_length(epoch, hops)
        if warn:
            plan = stream.plan(epoch, hops)
            note = (f"; {plan.dropped} sample(s) of the epoch's remainder do not fill a whole step on every rank "
                    "and are dropped" if plan.dropped else "")
            warnings.warn(
                f"data stream: elastic resume of epoch {epoch} from world_size={topology[0]} x {topology[1]} worker "
                f"slot(s) x batch_size={topology[2]} onto world_size={stream.world_size} x {stream.layout.K} x "
                f"batch_size={stream.batch_size}: the samples no rank has consumed yet are spread over the new ranks "
                f"({length - batches} batches per rank), none repeated{note}.", stacklevel=3)
    else:
        length = stream.layout.batches_per_rank
        old = max(1, int(saved_length or 1))
        batches, hops = min(length, batches * length // old), ()
        if warn:
            warnings.warn(
                f"data stream: the checkpoint's position was saved over other data (sources, weights, seed or "
                f"sampling) or by an older version (world_size={state.get('world_size')}, "
                f"num_workers={state.get('num_workers')}, batch_size={state.get('batch_size')}); exact resume is "
                f"impossible. Continuing epoch {epoch} at the same fraction ({batches}/{length} batches): some "
                "samples of this epoch may repeat or be skipped.", stacklevel=3)
    if batches >= length:
        return epoch + 1, 0, ()
    return epoch, batches, hops


class ShardEvalStream(IterableDataset):
    """Batches of one shard directory in index order (no shuffling, nothing dropped), for validation and test.

    Batch ``b`` holds samples ``[b*B, (b+1)*B)``; worker ``w`` makes batches ``w, w+K, ...`` and skips the others'
    samples without reading them, so the loader's output is in order. Corrupt samples are counted and left out.
    Every rank reads the whole set.
    """

    def __init__(self, source: Source, *, batch_size: int, process: Callable[[dict, dict], dict],
                 collate: Callable[[list], dict], num_workers: int = 0, max_corrupt_ratio: Optional[float] = 0.01,
                 corrupt_min_samples: int = 100):
        super().__init__()
        self.source, self.batch_size, self.process, self.collate = source, batch_size, process, collate
        self.num_workers = num_workers
        self.max_corrupt_ratio, self.corrupt_min_samples = max_corrupt_ratio, corrupt_min_samples
        self._cum = np.concatenate([[0], np.cumsum(source.sizes)]).tolist()
        self.label = source_labels([source])[0]

    def __len__(self) -> int:
        return -(-self.source.num_samples // self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(cache_size=2)
        counter = CorruptCounter(self.max_corrupt_ratio, self.corrupt_min_samples,
                                 where=f" from {self.source.path} by eval worker {w}")
        n = self.source.num_samples
        try:
            for b in range(w, len(self), k):
                samples = []
                seen0, corrupt0 = counter.seen, counter.corrupt
                for g in range(b * self.batch_size, min(n, (b + 1) * self.batch_size)):
                    shard = bisect.bisect_right(self._cum, g) - 1
                    path = self.source.shards[shard]
                    counter.count_seen(source=self.label)
                    key = None
                    try:
                        raw = reader.read(path, g - self._cum[shard], self.source.sizes[shard])
                        key = raw["__key__"]
                        samples.append(self.process(raw, {"epoch": 0, "cycle": 0, "source": self.source.name}))
                    except (ShardFormatError, CorruptDataError):
                        raise
                    except Exception as exn:  # noqa: BLE001
                        counter(exn, url=path, key=key or f"#{g - self._cum[shard]}", source=self.label)
                if samples:
                    batch = self.collate(samples)
                    batch["n_seen"] = counter.seen - seen0
                    batch["n_corrupt"] = counter.corrupt - corrupt0
                    yield batch
        finally:
            reader.close()


# ---------------------------------------------------------------------------------------------------------------------
# What was skipped: per source and reason, summed over batches (the workers'), ranks, epochs.


def source_labels(sources: Sequence[Source]) -> list[str]:
    """How the summaries name each source: ``<source>/<split>`` from its index.json (``coco/train``), or its
    directory when two sources would get the same name."""
    labels = [f"{s.name}/{s.index.get('split')}" if s.index else s.path for s in sources]
    return [lab if labels.count(lab) == 1 else s.path for lab, s in zip(labels, sources)]


def nested_counts(counts: Counter) -> dict:
    """``{(source, what): n}`` -> ``{source: {what: n}}`` (plain dicts: they travel in a batch)."""
    out: dict = {}
    for (source, what), n in sorted(counts.items()):
        if n:
            out.setdefault(source, {})[what] = int(n)
    return out


class CorruptTally:
    """Samples read and skipped per source and reason, added up from the batches' ``sample_counts``."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, sample_counts: Optional[dict]) -> None:
        for source, per in (sample_counts or {}).items():
            for what, n in per.items():
                self.counts[(source, what)] += int(n)

    def merge(self, other: "CorruptTally") -> None:
        self.counts.update(other.counts)

    @property
    def corrupt(self) -> int:
        return sum(n for (_, what), n in self.counts.items() if what != "read")

    def lines(self, when: str) -> list[str]:
        """One console line per source with skipped samples, e.g. ``data: epoch 0: skipped 3 corrupt samples of
        1,204 read (bad_image=2, bad_json=1) in coco/train``; none when nothing was skipped."""
        out = []
        for source in sorted({s for s, _ in self.counts}):
            reasons = {what: n for (s, what), n in sorted(self.counts.items()) if s == source and what != "read" and n}
            if not reasons:
                continue
            total = sum(reasons.values())
            detail = ", ".join(f"{what}={n:,}" for what, n in reasons.items())
            out.append(f"data: {when}: skipped {total:,} corrupt sample{'s' if total != 1 else ''} of "
                       f"{self.counts[(source, 'read')]:,} read ({detail}) in {source}")
        return out


def corrupt_summary_callback():
    """A Lightning callback that prints :meth:`CorruptTally.lines` on global rank 0 when a training epoch ends
    (summed over the ranks: one ``all_gather_object``, at a point every rank reaches), when the run ends (if it
    spanned several epochs) and, for this rank, when it stops on an error or Ctrl-C."""
    import lightning as L

    def gathered(trainer, tally: CorruptTally) -> tuple[CorruptTally, str]:
        import torch.distributed as dist

        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return tally, ""
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, dict(tally.counts))
        total = CorruptTally()
        for p in parts:
            total.counts.update(p)
        return total, f", {len(parts)} ranks"

    class CorruptSummary(L.Callback):
        def __init__(self):
            self.epoch, self.run, self.epochs = CorruptTally(), CorruptTally(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if isinstance(batch, dict):
                self.epoch.add(batch.get("sample_counts"))

        def _report(self, trainer, tally: CorruptTally, when: str) -> None:
            total, ranks = gathered(trainer, tally)
            if trainer.is_global_zero:
                for line in total.lines(when + ranks):
                    print(line, flush=True)

        def on_train_epoch_end(self, trainer, pl_module):
            self._report(trainer, self.epoch, f"epoch {trainer.current_epoch}")
            self.run.merge(self.epoch)
            self.epoch, self.epochs = CorruptTally(), self.epochs + 1

        def on_train_end(self, trainer, pl_module):
            self.run.merge(self.epoch)
            self.epoch = CorruptTally()
            if self.epochs > 1:
                self._report(trainer, self.run, f"this run ({self.epochs} epochs)")

        def on_exception(self, trainer, pl_module, exception):  # rank-local: the other ranks may be gone
            self.run.merge(self.epoch)
            self.epoch = CorruptTally()
            if trainer.is_global_zero:
                for line in self.run.lines(f"before the stop (rank {trainer.global_rank})"):
                    print(line, flush=True)

    return CorruptSummary()


__all__ = ["ShardStream", "ShardEvalStream", "StreamLayout", "Source", "ShardReader", "scan_tar", "TarSamples",
           "CorruptCounter", "CorruptSample", "CorruptDataError", "CORRUPT_REASONS", "corrupt_reason",
           "CorruptTally", "corrupt_summary_callback", "source_labels", "stable_hash", "consumed_by_worker"]
