"""What every recipe shares: the command line, image loading and checking, records -> shards, the worker pool.

A recipe lists its raw input as *records*, one per output sample, in a deterministic order::

    {"key": "coco-391895",                      # __key__ (already key-safe)
     "image": ref,                              # or "images": {"img0.png": ref, "img1.png": ref}
     "json": {"image_id": 391895, "source": "coco", "split": "train", "captions": [...], ...},
     "ann_size": [640, 480]}                    # optional: the size the json's boxes are in

where ``ref`` is a path, a list of candidate paths (the first that exists is used), or a slice of a file
``{"file": path, "offset": o, "size": n}`` (a member of an input tar). Records are cut into shards of
``shard_size`` *before* any image is touched, so shard ``i`` always holds the same records; a worker then loads and
checks each record's image(s), drops the bad ones (counted by reason) and writes the shard atomically, followed by a
small sidecar ``<shard>.json`` (samples, skips, a fingerprint of the records). A re-run skips every shard whose tar
and matching sidecar exist, and rebuilds ``index.json`` from the sidecars. The fingerprint covers each record's key,
json and image files as they are on disk (size and modification time, or absence), so a raw image added, replaced
or removed since rewrites exactly the shards holding its records; ``--force`` rewrites every shard of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import io
import json
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from vlp.data.shards import shard_name, write_index, write_shard
from vlp.utils.io import atomic_write_text


class RecipeError(Exception):
    """The raw input is not where or what the recipe expects; the message says which file was expected where."""


class Skip(Exception):
    """A record that cannot become a sample; ``reason`` is the key it is counted under in ``index.json``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- keys and raw files -----------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def key_safe(x: Any) -> str:
    """An id usable in a webdataset key: anything but letters, digits, '_' and '-' (notably '.' '/') becomes '_'."""
    return _UNSAFE.sub("_", str(x))


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a RecipeError that says what was expected there."""
    if not Path(path).exists():
        raise RecipeError(f"expected {what} at {path}, but it does not exist")
    return Path(path)


def load_json(path: Path, what: str) -> Any:
    """A top-level JSON file of the raw layout; missing or unparsable -> RecipeError naming the file."""
    require(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid JSON ({e}); expected {what}") from None


def load_karpathy(path: Path) -> list[dict]:
    """The ``images`` list of a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``)."""
    data = load_json(Path(path), "a Karpathy split file (dataset_*.json with an 'images' list)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RecipeError(f"{path}: expected a Karpathy split file, a JSON object with an 'images' list")
    return data["images"]


def karpathy_sentences(entry: dict) -> list | None:
    """The raw sentences of a Karpathy entry (``raw``, else the joined ``tokens``), unfiltered; None if malformed."""
    sents = entry.get("sentences")
    if not isinstance(sents, list):
        return None
    out = []
    for s in sents:
        raw = s.get("raw") if isinstance(s, dict) else None
        if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
            raw = " ".join(map(str, s["tokens"]))
        out.append(raw)
    return out


def clean_captions(captions: list, skipped: Counter, *aligned: list) -> tuple[list, ...]:
    """Drop empty (or non-string) captions, counted as ``empty_caption``, with the same entries of ``aligned``.

    Returns ``(captions, *aligned)``, stripped; the caller counts an image left with none as ``no_caption``.
    """
    keep = [i for i, c in enumerate(captions) if isinstance(c, str) and c.strip()]
    if len(keep) < len(captions):
        skipped["empty_caption"] += len(captions) - len(keep)
    return ([captions[i].strip() for i in keep], *[[a[i] for i in keep] for a in aligned])


def parse_splits(split: str | Iterable[str] | None, available: Iterable[str], source: str) -> list[str]:
    """The splits to build: all ``available`` for None, else the requested ones (comma-separated or a list)."""
    available = list(available)
    if split is None:
        return available
    wanted = [s.strip() for s in split.split(",")] if isinstance(split, str) else list(split)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise RecipeError(f"{source}: split {unknown[0]!r} is not available here; available: "
                          f"{', '.join(available) or '(none)'}")
    return wanted


# -- images -----------------------------------------------------------------------------------------------------------
_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a JPEG with extra frames (cameras)


def read_ref(ref: Any) -> bytes:
    """The bytes of an image reference (path, list of candidate paths, or ``{"file", "offset", "size"}``)."""
    if isinstance(ref, dict):
        try:
            with open(ref["file"], "rb") as f:
                f.seek(ref["offset"])
                data = f.read(ref["size"])
        except FileNotFoundError:
            raise Skip("missing_image", ref["file"]) from None
        if len(data) != ref["size"]:
            raise Skip("corrupt_image", f"{ref['file']}: short read")
        return data
    paths = ref if isinstance(ref, (list, tuple)) else [ref]
    for p in paths:
        try:
            with open(p, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except OSError as e:
            raise Skip("unreadable_image", f"{p}: {e}") from None
    raise Skip("missing_image", str(paths[0]) if paths else "no path")


def load_image(ref_or_bytes: Any) -> tuple[bytes, str, int, int]:
    """Read and check an image: ``(bytes, ext, width, height)``; raises Skip('missing_image'|'corrupt_image'|...).

    JPEG/PNG/WebP bytes are returned untouched (no re-encoding); other formats are converted to PNG. The check is
    PIL's ``verify()`` (structure, PNG CRCs) and a full ``load()``, which catches truncated files; JPEGs are decoded
    at 1/8 scale (DCT scaling still entropy-decodes every block, so truncation is still caught, ~4x faster).
    """
    from PIL import Image

    data = ref_or_bytes if isinstance(ref_or_bytes, bytes) else read_ref(ref_or_bytes)
    if not data:
        raise Skip("corrupt_image", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if fmt in ("JPEG", "MPO"):
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
            ext = _FORMATS.get(fmt)
            if ext is None:
                out, im2 = io.BytesIO(), Image.open(io.BytesIO(data))
                if im2.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
                    im2 = im2.convert("RGB")  # e.g. a CMYK TIFF
                im2.save(out, "PNG")
                data, ext = out.getvalue(), "png"
    except Image.DecompressionBombError as e:
        raise Skip("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    if width < 1 or height < 1:
        raise Skip("corrupt_image", "zero-sized image")
    return data, ext, width, height


def _rescale_boxes(js: dict, sx: float, sy: float) -> None:
    def scale(boxes):
        return [[round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)] for b in boxes]

    if isinstance(js.get("objects"), dict):
        js["objects"] = dict(js["objects"], boxes=scale(js["objects"]["boxes"]))
    if "region_boxes" in js:
        js["region_boxes"] = scale(js["region_boxes"])


def image_sample(rec: dict) -> dict:
    """The default record -> sample: load and check the image(s), fill in width/height, keep the original bytes.

    One image (``rec["image"]``): the field is named by the actual format (``jpg``/``png``/``webp``) and the json
    gets ``width``/``height``. Several (``rec["images"]``, field name -> ref): the given field names are kept and
    ``width``/``height`` are lists in the same order. With ``ann_size``, boxes given in another size are rescaled.
    """
    js = dict(rec["json"])
    sample: dict[str, Any] = {"__key__": rec["key"]}
    if "images" in rec:
        js["width"], js["height"] = [], []
        for name, ref in rec["images"].items():
            data, _, w, h = load_image(ref)
            sample[name] = data
            js["width"].append(w)
            js["height"].append(h)
    else:
        data, ext, w, h = load_image(rec["image"])
        sample[ext] = data
        js["width"], js["height"] = w, h
        aw, ah = rec.get("ann_size") or (w, h)
        if aw and ah and (aw, ah) != (w, h):
            _rescale_boxes(js, w / aw, h / ah)
    sample["json"] = js
    return sample


# -- records -> shards ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One output split: its records in order, what was skipped while listing them, and meta for index.json."""

    records: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    meta: dict = field(default_factory=dict)

    def add(self, rec: dict) -> None:
        self.records.append(rec)


def sidecar_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + ".json")


def _file_state(path: Any, stats: dict) -> list | None:
    """``[size, mtime_ns]`` of a raw file, None when it is absent (``stats`` caches the calls of one fingerprint:
    records sliced from one input tar share its file)."""
    path = os.fspath(path)
    if path not in stats:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        stats[path] = None if st is None or stat.S_ISDIR(st.st_mode) else [st.st_size, st.st_mtime_ns]
    return stats[path]


def _image_state(ref: Any, stats: dict) -> Any:
    """What of an image reference decides the sample's bytes: each candidate file's state (a later candidate is
    used when an earlier one is missing), a tar slice's file state and range, or a hash of in-memory bytes. Not the
    path strings: the same raw files under another root still match."""
    if isinstance(ref, bytes):
        return hashlib.sha1(ref).hexdigest()
    if isinstance(ref, dict):
        return [_file_state(ref["file"], stats), ref.get("offset"), ref.get("size")]
    return [_file_state(p, stats) for p in (ref if isinstance(ref, (list, tuple)) else [ref])]


def fingerprint(records: list[dict]) -> str:
    """What a finished shard must match to be reused: its records' keys and json, and the state of their image
    files on disk (see :func:`_image_state`), so that an image added, replaced or removed since is noticed."""
    h = hashlib.sha1()
    stats: dict = {}
    for rec in records:
        images = ({name: _image_state(ref, stats) for name, ref in sorted(rec["images"].items())} if "images" in rec
                  else _image_state(rec["image"], stats) if "image" in rec else None)
        h.update(json.dumps([rec["key"], rec["json"], rec.get("ann_size"), images], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


# --force of the command line (run_main / call_reporting), read by shard_done: every shard counts as not done.
_FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("recipe_force", default=False)


@contextlib.contextmanager
def forcing(force: bool = True):
    """Within it, :func:`shard_done` reports no shard as finished: every shard of the run is rewritten."""
    token = _FORCE.set(bool(force))
    try:
        yield
    finally:
        _FORCE.reset(token)


def forced() -> bool:
    """Whether this run was given ``--force`` (for recipes with their own test of a finished shard)."""
    return _FORCE.get()


def shard_done(path: Path, records: list[dict], fp: str) -> dict | None:
    """The sidecar of a finished shard of exactly these records, else None (always None under ``--force``)."""
    if forced():
        return None
    side = sidecar_path(path)
    if not (path.exists() and side.exists()):
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != fp or info.get("records") != len(records):
        return None
    return info


def write_one_shard(path: str, records: list[dict], make_sample: Callable[[dict], dict], fp: str,
                    tick: Callable[[], None] | None = None) -> dict:
    """Build one shard (in a worker or in-process): samples for the good records, skip counts for the others."""
    skipped: Counter = Counter()

    def samples():
        for rec in records:
            try:
                yield make_sample(rec)
            except Skip as s:
                skipped[s.reason] += 1
            if tick is not None:
                tick()

    n = write_shard(path, samples())
    info = {"samples": n, "skipped": dict(sorted(skipped.items())), "records": len(records), "fingerprint": fp}
    atomic_write_text(sidecar_path(Path(path)), json.dumps(info, sort_keys=True))
    return info


def _dedupe(plan: Plan) -> list[dict]:
    seen, out = set(), []
    for rec in plan.records:
        if rec["key"] in seen:
            plan.skipped["duplicate_key"] += 1
            continue
        seen.add(rec["key"])
        out.append(rec)
    return out


_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{6})\.tar(\.json)?$")


def _remove_stale(split_dir: Path, split: str, n_shards: int) -> None:
    """Shards of an earlier run beyond this run's count (e.g. after a larger --shard-size): not in the index."""
    if not split_dir.is_dir():
        return
    for p in split_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m["split"] == split and int(m["i"]) >= n_shards:
            p.unlink()


def write_splits(out: str | Path, source: str, plans: dict[str, Plan], *, shard_size: int = 1000, workers: int = 1,
                 progress: bool = True, make_sample: Callable[[dict], dict] = image_sample,
                 tokenizer: str | None = None, raw: str | Path | None = None) -> dict[str, dict]:
    """Write ``out/<split>/<split>-%06d.tar`` + ``index.json`` for every plan; finished shards are skipped.

    ``make_sample`` must be a module-level function (it is pickled to the workers).
    """
    from tqdm import tqdm

    if shard_size < 1:
        raise RecipeError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out)
    tasks, done, layout = [], {}, {}
    total = initial = 0
    for split, plan in plans.items():
        records = _dedupe(plan)
        chunks = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(split_dir, split, len(chunks))
        layout[split] = len(chunks)
        for i, chunk in enumerate(chunks):
            path = split_dir / shard_name(split, i)
            fp = fingerprint(chunk)
            total += len(chunk)
            info = shard_done(path, chunk, fp)
            if info is not None:
                done[(split, i)] = info
                initial += len(chunk)
            else:
                tasks.append((split, i, str(path), chunk, fp))

    results: dict[tuple[str, int], dict] = dict(done)
    bar = tqdm(total=total, initial=initial, desc=source, unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for split, i, path, chunk, fp in tasks:
                results[(split, i)] = write_one_shard(path, chunk, make_sample, fp, tick=lambda: bar.update(1))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn, not fork: the caller may hold threads (torch, tokenizers) that fork would copy mid-lock
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
                futures = {pool.submit(write_one_shard, path, chunk, make_sample, fp): (split, i, len(chunk))
                           for split, i, path, chunk, fp in tasks}
                for fut in as_completed(futures):
                    split, i, n = futures[fut]
                    results[(split, i)] = fut.result()
                    bar.update(n)
    finally:
        bar.close()

    indices = {}
    for split, plan in plans.items():
        shards, skipped = [], Counter(plan.skipped)
        for i in range(layout[split]):
            info = results[(split, i)]
            skipped.update(info["skipped"])
            if info["samples"]:
                shards.append({"name": shard_name(split, i), "samples": info["samples"]})
        meta = dict(plan.meta, shard_size=shard_size, records=sum(results[(split, i)]["records"]
                                                                  for i in range(layout[split])))
        if raw is not None:
            meta["raw"] = str(Path(raw).resolve())
        skipped = {k: v for k, v in skipped.items() if v}
        new = sum(1 for (s, _, _, _, _) in tasks if s == split)
        # what later steps recorded in an existing index survives a re-run: the tokenizer (unless one is given),
        # and the region-feature spec as long as no shard was rewritten (a rewritten shard has no regions.npz)
        old = _old_index(out / split)
        index = write_index(out / split, source=source, split=split, shards=shards, skipped=skipped,
                            tokenizer=tokenizer if tokenizer is not None else old.get("tokenizer"),
                            regions=old.get("regions") if new == 0 else None, meta=meta)
        indices[split] = index
        skips = ", ".join(f"{k}={v}" for k, v in index["skipped"].items()) or "none"
        print(f"{source}/{split}: {index['num_samples']} samples in {len(shards)} shards "
              f"({new} written, {layout[split] - new} already done) -> {out / split}; skipped: {skips}")
    return indices


def _old_index(split_dir: Path) -> dict:
    try:
        old = json.loads((split_dir / "index.json").read_text())
        return old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        return {}


def set_index_tokenizer(split_dir: str | Path, tokenizer: str | None) -> dict:
    """Record a tokenizer (path relative to the split directory) in an existing ``index.json``."""
    from vlp.data.shards import read_index

    index = read_index(split_dir)
    if index.get("tokenizer") != tokenizer:
        index = write_index(split_dir, source=index["source"], split=index["split"], shards=index["shards"],
                            skipped=index["skipped"], tokenizer=tokenizer, regions=index.get("regions"),
                            meta=index.get("meta"))
    return index


# -- command line -----------------------------------------------------------------------------------------------------
_COMMON = {"root", "out", "split", "shard_size", "workers", "no_progress", "force"}


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def parser(name: str, description: str, root_help: str, split_help: str) -> argparse.ArgumentParser:
    """The common recipe command line; a recipe adds its own options, which ``run_main`` passes to ``build``."""
    p = argparse.ArgumentParser(prog=f"python -m data_recipes.{name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, metavar="RAW", help=root_help)
    p.add_argument("--out", required=True, type=Path, metavar="OUT",
                   help="output: OUT/<split>/<split>-%%06d.tar and OUT/<split>/index.json")
    p.add_argument("--split", default=None, help=split_help)
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="N", help="samples per shard (1000)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="K", help="processes writing shards (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_force_arg(p)
    return p


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="rewrite every shard, even those a previous run finished from the same raw files")


def call_reporting(p: argparse.ArgumentParser, fn: Callable[..., Any], *args, force: bool = False, **kwargs) -> int:
    """Run a recipe's build from its command line (``force``: its ``--force``, see :func:`forcing`): a
    ``RecipeError`` becomes one line on stderr and exit status 2 (its traceback under ``vlp --debug`` /
    ``VLP_DEBUG=1``)."""
    from vlp.errors import debug_enabled

    try:
        with forcing(force):
            fn(*args, **kwargs)
    except RecipeError as e:
        if debug_enabled():
            raise
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_main(build: Callable[..., dict], p: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = p.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in _COMMON}
    return call_reporting(p, build, args.root, args.out, split=args.split, shard_size=args.shard_size,
                          workers=args.workers, progress=not args.no_progress, force=args.force, **extra)
