"""WebDataset shard directories: writing them atomically, and reading and checking their ``index.json``.

A shard directory holds ``<split>-%06d.tar`` files and ``index.json``::

    {"format": "vlp-shards/1", "source": "coco", "split": "train",
     "shards": [{"name": "train-000000.tar", "samples": 1000}, ...], "num_samples": 5000,
     "skipped": {"missing_image": 2, ...}, "tokenizer": "tokenizer" | null, "regions": null | {...},
     "meta": {...}}

Each sample (DESIGN §3) is ``__key__`` = ``<source>-<image_id>``, ``jpg``/``png``/``webp`` image bytes, a ``json``
dict and optionally ``regions.npz``. Shards are written to a temporary name and renamed when complete, so a shard
that exists under its final name is whole; re-running a recipe skips it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable

from vlp.errors import DataError
from vlp.utils.io import atomic_open, atomic_write_text

FORMAT = "vlp-shards/1"
INDEX = "index.json"


class ShardFormatError(DataError):
    """A shard directory or index that is not what the reader expects; the message names file and field."""


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _encode(key: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if key == "json" or key.endswith(".json"):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"sample field {key!r}: expected bytes, str or (for json) a dict, got {type(value).__name__}")


def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """Write one tar shard atomically. Entries are sorted and timestamps fixed, so the bytes are deterministic."""
    n = 0
    with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
            for field in sorted(k for k in sample if not k.startswith("__")):
                data = _encode(field, sample[field])
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uname = info.gname = "vlp"
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def write_index(out_dir: str | Path, *, source: str, split: str, shards: list[dict], skipped: dict[str, int],
                tokenizer: str | None = None, regions: dict | None = None, meta: dict | None = None) -> dict:
    index = {
        "format": FORMAT,
        "source": source,
        "split": split,
        "shards": shards,
        "num_samples": sum(s["samples"] for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "tokenizer": tokenizer,
        "regions": regions,
        "meta": meta or {},
    }
    atomic_write_text(Path(out_dir) / INDEX, json.dumps(index, indent=1, sort_keys=True))
    return index


def read_index(shard_dir: str | Path, *, check_files: bool = True) -> dict:
    """Load and validate ``<shard_dir>/index.json``; errors name the file and the field that is wrong."""
    path = Path(shard_dir) / INDEX
    if not path.exists():
        where = "" if Path(shard_dir).is_dir() else f" (no directory {shard_dir})"
        raise ShardFormatError(f"{path}: not found{where}; expected a shard directory written by a data_recipes "
                               "recipe")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardFormatError(f"{path}: field 'format' is {index.get('format')!r}, expected {FORMAT!r}")
    for key, tp in (("source", str), ("split", str), ("shards", list), ("num_samples", int)):
        if not isinstance(index.get(key), tp):
            raise ShardFormatError(f"{path}: field {key!r} missing or not a {tp.__name__}")
    for i, s in enumerate(index["shards"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int):
            raise ShardFormatError(f"{path}: shards[{i}] must be {{'name': str, 'samples': int}}, got {s!r}")
        if check_files and not (Path(shard_dir) / s["name"]).exists():
            raise ShardFormatError(f"{path}: shards[{i}] names {s['name']!r}, which is missing from {shard_dir}")
    if sum(s["samples"] for s in index["shards"]) != index["num_samples"]:
        raise ShardFormatError(f"{path}: 'num_samples' does not equal the sum of shards[*].samples")
    return index


def shard_paths(shard_dir: str | Path, index: dict | None = None) -> list[str]:
    index = index or read_index(shard_dir)
    return [os.path.join(str(shard_dir), s["name"]) for s in index["shards"]]
