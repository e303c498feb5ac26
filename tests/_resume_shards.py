"""Tiny shard directories for the data-pipeline and resume tests (imported by both test files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.shards import shard_name, write_index, write_shard

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}
SHAPES = ["square", "circle", "cube", "ball"]


def caption_texts() -> list[str]:
    out = []
    for a in COLOURS:
        for b in COLOURS:
            for s in SHAPES:
                out += [f"a {a} {s} left of a {b} {s}", f"the {b} {s} is right of the {a} one",
                        f"two shapes: {a} and {b}", f"a {a} {s} on the left, leftmost"]
    return out


def jpeg(i: int, size: int = 32, split: bool = True) -> bytes:
    """A JPEG whose left half is reddish and right half bluish (so a flip is visible), with a per-i pattern."""
    rng = np.random.default_rng(i)
    arr = np.zeros((size, size, 3), np.uint8)
    if split:
        arr[:, : size // 2] = (200, 40, 40)
        arr[:, size // 2:] = (40, 40, 200)
    arr = np.clip(arr.astype(int) + rng.integers(-30, 30, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample(source: str, i: int, *, size: int = 32, regions: bool = False, n_captions: int = 3) -> dict:
    names = list(COLOURS)
    caps = [f"a {names[i % 4]} {SHAPES[j % 4]} left of a {names[(i + j + 1) % 4]} ball number {i} caption {j}"
            for j in range(n_captions)]
    s = {"__key__": f"{source}-{i}", "jpg": jpeg(i, size),
         "json": {"image_id": i, "source": source, "split": "train", "width": size, "height": size,
                  "captions": caps}}
    if regions:
        n = 2 + i % 3
        buf = io.BytesIO()
        rng = np.random.default_rng(i)
        np.savez(buf, features=rng.standard_normal((n, 8)).astype(np.float16),
                 boxes=np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (n, 1)))
        s["regions.npz"] = buf.getvalue()
    return s


def make_shards(out: Path, sizes: list[int], *, source: str = "shapes", split: str = "train", start: int = 0,
                tokenizer: str | None = None, regions: bool = False, size: int = 32) -> Path:
    """Write ``len(sizes)`` shards with ``sizes[k]`` samples each (ids start, start+1, ...) and index.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, i = [], start
    for k, n in enumerate(sizes):
        name = shard_name(split, k)
        write_shard(out / name, [sample(source, j, regions=regions, size=size) for j in range(i, i + n)])
        shards.append({"name": name, "samples": n})
        i += n
    write_index(out, source=source, split=split, shards=shards, skipped={}, tokenizer=tokenizer,
                regions={"dim": 8} if regions else None)
    return out

