"""The embedded default dataset: a synthetic world of coloured shapes, written in the PUBLIC raw formats.

``python -m data_recipes.shapes --out DIR [--seed 0] [--train N] [--val N] [--test N] [--image-size PX]``

Each image holds 1 to 4 objects (shape, colour, size, position) on a light, slightly noisy background. Objects never
overlap, and any two are separated clearly on at least one axis, so "left of", "right of", "above" and "below" hold
without doubt wherever they are stated (box gap of at least ``gap`` pixels) and are never stated otherwise (boxes
that are not clearly apart overlap clearly on that axis). Within an image every (colour, shape) pair is unique.

From the scene graph come five different captions (the first names every object with size, colour and shape and
chains them left to right by their relations; it is unique within its split, so retrieval R@1 can reach 100 %),
the concept phrases of each caption as ``(object)``, ``(object, attribute)`` and ``(subject, relation, object)``
tuples, boxes, and VQA questions (colour, shape, count, existence, relation) with ten identical answers. About a
fifth of the scenes get a "twin" in the same split that differs in one colour, one shape or one relation.

Output layout (``DIR``):

- ``coco/annotations/{captions,instances}_{train,val}2017.json``, ``coco/{train,val}2017/%012d.jpg`` and the
  Karpathy-style ``coco/dataset_coco.json`` (train split in train2017, val and test splits in val2017);
- ``vg/image_data.json``, ``vg/region_descriptions.json``, ``vg/objects.json``, ``vg/attributes.json``,
  ``vg/VG_100K/<id>.jpg`` (train split only);
- ``vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json``, ``vqa/v2_mscoco_{train,val}2014_annotations.json``,
  ``vqa/train2014/COCO_train2014_%012d.jpg`` (train split), ``vqa/val2014/COCO_val2014_%012d.jpg`` (val + test);
- ``phrases_{train,val,test}.json`` ({image_id: per caption, its tuples}), ``scenes_{train,val,test}.json`` (the
  scene graphs: ground truth for tests and tools) and ``shapes_world.json`` (what was generated; ``"complete":
  true`` once everything is written). A directory holding a (possibly interrupted) world is regenerated in place;
  any other non-empty directory is refused.

Image ids run 1..N over train, then val, then test. Output is a pure function of the arguments: the same seed gives
byte-identical files (fixed key order, fixed JPEG settings, no timestamps, no absolute paths inside files). Each
split draws from its own random stream, so the val and test worlds do not depend on the train size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from data_recipes import _shapes_text as text

SPLITS = ("train", "val", "test")
COCO_FOLDER = {"train": "train2017", "val": "val2017", "test": "val2017"}
VQA_SUBTYPE = {"train": "train2014", "val": "val2014", "test": "val2014"}
MANIFEST = "shapes_world.json"
VERSION = 1

RGB = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (135, 60, 185), "orange": (245, 135, 25), "cyan": (30, 185, 200), "black": (30, 30, 30),
}
SIZE_FRACTION = {"small": 0.16, "large": 0.30}  # side of the object's bounding square / image side
OBJECT_COUNT_WEIGHTS = (0.1, 0.3, 0.3, 0.3)  # 1, 2, 3, 4 objects
TWIN_RATE = 0.25  # chance that a new scene gets a twin: about 40 % of the images then have one
JPEG_QUALITY = 92
SUPERSAMPLE = 4  # coverage samples per pixel and axis (anti-aliasing)
CROSS_ARM = 1 / 3  # half-thickness of a cross's arms, relative to its half-extent
CATEGORY_ID = {s: i + 1 for i, s in enumerate(text.SHAPES)}


class WorldError(ValueError):
    """Bad arguments or an output directory we must not touch."""


def _q(x: float, step: float = 0.25) -> float:
    """Quantise to ``step`` (a power of two), so every box edge and comparison is exact in floating point."""
    return round(x / step) * step


class Geometry:
    """Pixel sizes for one image size."""

    def __init__(self, size: int):
        self.size = size
        self.margin = max(1.0, _q(0.03 * size))  # free border around the image
        self.gap = max(2.0, _q(0.05 * size))  # minimum box gap for a stated relation, and minimum overlap otherwise
        self.loc_margin = 0.06 * size  # distance from a third's boundary for a sayable location
        self.extent = {k: max(4.0, _q(f * size, 0.5)) for k, f in SIZE_FRACTION.items()}


# -- scene graphs ------------------------------------------------------------------------------------------------------
def bbox(o: dict) -> tuple[float, float, float, float]:
    h = o["e"] / 2
    return o["cx"] - h, o["cy"] - h, o["cx"] + h, o["cy"] + h


def pair_relations(a: dict, b: dict, gap: float) -> list[str]:
    """Relations from ``a`` to ``b``: horizontal first, then vertical; empty only for overlapping boxes."""
    ax0, ay0, ax1, ay1 = bbox(a)
    bx0, by0, bx1, by1 = bbox(b)
    out = []
    if bx0 - ax1 >= gap:
        out.append("left of")
    elif ax0 - bx1 >= gap:
        out.append("right of")
    if by0 - ay1 >= gap:
        out.append("above")
    elif ay0 - by1 >= gap:
        out.append("below")
    return out


def relations(objects: list[dict], gap: float) -> dict:
    return {(i, j): pair_relations(a, b, gap) for i, a in enumerate(objects) for j, b in enumerate(objects) if i != j}


def _clear_pair(a: dict, b: dict, gap: float) -> bool:
    """Apart by ``gap`` on one axis at least, and on each axis either apart by ``gap`` or overlapping by ``gap``."""
    ax0, ay0, ax1, ay1 = bbox(a)
    bx0, by0, bx1, by1 = bbox(b)
    sx = max(bx0 - ax1, ax0 - bx1)
    sy = max(by0 - ay1, ay0 - by1)
    return (sx >= gap or sy >= gap) and not (-gap < sx < gap) and not (-gap < sy < gap)


def _inside(o: dict, geo: Geometry) -> bool:
    x0, y0, x1, y1 = bbox(o)
    return x0 >= geo.margin and y0 >= geo.margin and x1 <= geo.size - geo.margin and y1 <= geo.size - geo.margin


def valid(objects: list[dict], geo: Geometry) -> bool:
    if not all(_inside(o, geo) for o in objects):
        return False
    return all(_clear_pair(a, b, geo.gap) for i, a in enumerate(objects) for b in objects[i + 1:])


def location(o: dict, geo: Geometry) -> str | None:
    """The 3x3-grid location phrase of an object's centre, or None when it lies near a third's boundary."""
    s, m = geo.size, geo.loc_margin

    def third(v: float, names: tuple[str, str, str]) -> str | None:
        if min(abs(v - s / 3), abs(v - 2 * s / 3)) < m:
            return None
        return names[0] if v < s / 3 else names[1] if v < 2 * s / 3 else names[2]

    row, col = third(o["cy"], ("top", "middle", "bottom")), third(o["cx"], ("left", "centre", "right"))
    return text.LOCATIONS[(row, col)] if row and col else None


def _new_object(rng: random.Random, colour: str, shape: str, geo: Geometry) -> dict:
    size = rng.choice(text.SIZES)
    e = _q(geo.extent[size] * rng.uniform(0.94, 1.06), 0.5)
    jitter = [rng.randint(-10, 10) for _ in range(3)]
    return {"shape": shape, "colour": colour, "size": size, "e": e, "cx": 0.0, "cy": 0.0, "jitter": jitter}


def sample_scene(rng: random.Random, geo: Geometry) -> dict:
    """A random valid scene: objects with unique (colour, shape), placed by rejection sampling."""
    combos = [(c, s) for c in text.COLOURS for s in text.SHAPES]
    s = geo.size
    for _ in range(1000):
        n = rng.choices((1, 2, 3, 4), weights=OBJECT_COUNT_WEIGHTS)[0]
        objects = [_new_object(rng, c, sh, geo) for c, sh in rng.sample(combos, n)]
        placed: list[dict] = []
        for o in sorted(objects, key=lambda o: -o["e"]):  # big ones first: fewer rejections
            lo, hi = geo.margin + o["e"] / 2, s - geo.margin - o["e"] / 2
            for _ in range(40):
                if n == 1:  # a lone object sits clearly inside one cell of the 3x3 grid, so its location is sayable
                    row, col = rng.randrange(3), rng.randrange(3)
                    ylo, yhi = max(lo, row * s / 3 + geo.loc_margin), min(hi, (row + 1) * s / 3 - geo.loc_margin)
                    xlo, xhi = max(lo, col * s / 3 + geo.loc_margin), min(hi, (col + 1) * s / 3 - geo.loc_margin)
                    if xlo > xhi or ylo > yhi:
                        continue
                    o["cx"], o["cy"] = _q(rng.uniform(xlo, xhi)), _q(rng.uniform(ylo, yhi))
                    if location(o, geo) is None:
                        continue
                else:
                    o["cx"], o["cy"] = _q(rng.uniform(lo, hi)), _q(rng.uniform(lo, hi))
                if valid(placed + [o], geo):
                    placed.append(o)
                    break
            else:
                break
        if len(placed) == n:
            return {"objects": objects, "background": rng.randint(226, 242),
                    "noise": [rng.randrange(s), rng.randrange(s)]}
    raise RuntimeError(f"could not place objects in a {s}px image; is --image-size too small?")


def _copy_scene(scene: dict) -> dict:
    return {"objects": [dict(o, jitter=list(o["jitter"])) for o in scene["objects"]],
            "background": scene["background"], "noise": list(scene["noise"])}


def _relation_signature(objects: list[dict], geo: Geometry) -> dict:
    """Relations keyed by object identity (colour, shape), so moved or swapped objects compare."""
    rels = relations(objects, geo.gap)
    ident = [(o["colour"], o["shape"]) for o in objects]
    return {frozenset((ident[i], ident[j])): (ident[i], tuple(r)) for (i, j), r in rels.items() if i < j}


def perturb(scene: dict, change: str, rng: random.Random, geo: Geometry) -> dict | None:
    """A twin: the same scene with one colour, one shape or (as few as possible) relations changed; None if the
    scene admits no such change."""
    objects = scene["objects"]
    present = {(o["colour"], o["shape"]) for o in objects}
    if change in ("colour", "shape"):
        i = rng.randrange(len(objects))
        o = objects[i]
        if change == "colour":
            options = [c for c in text.COLOURS if (c, o["shape"]) not in present]
        else:
            options = [s for s in text.SHAPES if (o["colour"], s) not in present]
        if not options:
            return None
        twin = _copy_scene(scene)
        twin["objects"][i]["colour" if change == "colour" else "shape"] = rng.choice(options)
        return twin
    # relation: swap two objects' places, or mirror one object across another; keep the smallest change
    if len(objects) < 2:
        return None
    before = _relation_signature(objects, geo)
    candidates = []
    for i in range(len(objects)):
        for j in range(len(objects)):
            if i == j:
                continue
            moves = []
            if i < j:
                moves.append({i: (objects[j]["cx"], objects[j]["cy"]), j: (objects[i]["cx"], objects[i]["cy"])})
            moves.append({i: (2 * objects[j]["cx"] - objects[i]["cx"], objects[i]["cy"])})
            moves.append({i: (objects[i]["cx"], 2 * objects[j]["cy"] - objects[i]["cy"])})
            for move in moves:
                twin = _copy_scene(scene)
                for k, (cx, cy) in move.items():
                    twin["objects"][k]["cx"], twin["objects"][k]["cy"] = cx, cy
                if not valid(twin["objects"], geo):
                    continue
                after = _relation_signature(twin["objects"], geo)
                changed = sum(before[k] != after[k] for k in before)
                if changed:
                    candidates.append((changed, twin))
    if not candidates:
        return None
    fewest = min(c for c, _ in candidates)
    return rng.choice([t for c, t in candidates if c == fewest])


def describe(scene: dict, rng: random.Random, geo: Geometry) -> None:
    """Add captions, phrases, relations and questions to a scene (in place)."""
    objs = [dict(o, loc=location(o, geo)) for o in scene["objects"]]
    rels = relations(scene["objects"], geo.gap)
    scene["captions"], scene["phrases"] = text.captions(rng, objs, rels)
    scene["questions"] = text.questions(rng, objs, rels)
    scene["relations"] = [[i, r, j] for (i, j), rs in rels.items() for r in rs]


def first_caption(scene: dict, geo: Geometry) -> str:
    objs = [dict(o, loc=location(o, geo)) for o in scene["objects"]]
    return text.full_caption(objs, relations(scene["objects"], geo.gap))[0]


def generate_split(split: str, count: int, seed: int, geo: Geometry) -> list[dict]:
    """``count`` described scenes with unique first captions, twins included, in random order."""
    rng = random.Random(f"vlp-shapes/{seed}/{split}/{geo.size}")
    scenes: list[dict] = []
    seen: set[str] = set()
    while len(scenes) < count:
        for _ in range(10_000):
            base = sample_scene(rng, geo)
            cap = first_caption(base, geo)
            if cap not in seen:
                break
        else:
            raise RuntimeError(f"{split}: cannot find a scene with a new first caption after 10000 tries")
        seen.add(cap)
        describe(base, rng, geo)
        base["twin"] = None
        scenes.append(base)
        if len(scenes) < count and rng.random() < TWIN_RATE:
            changes = ["colour", "shape", "relation"]
            rng.shuffle(changes)
            for change in changes:
                twin = perturb(base, change, rng, geo)
                if twin is None:
                    continue
                cap = first_caption(twin, geo)
                if cap in seen:
                    continue
                seen.add(cap)
                describe(twin, rng, geo)
                twin["twin"] = {"index": len(scenes) - 1, "change": change}
                base["twin"] = {"index": len(scenes), "change": change}
                scenes.append(twin)
                break
    order = list(range(len(scenes)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    out = [scenes[i] for i in order]
    for s in out:
        if s["twin"] is not None:
            s["twin"] = {"index": position[s["twin"]["index"]], "change": s["twin"]["change"]}
    return out


# -- rendering ---------------------------------------------------------------------------------------------------------
def _inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in unit coordinates: the shape fills the square [-1, 1]^2 and touches all four sides."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":  # apex up
        return (v <= 1.0) & (2.0 * au <= v + 1.0)
    if shape == "cross":
        return ((au <= CROSS_ARM) & (av <= 1.0)) | ((av <= CROSS_ARM) & (au <= 1.0))
    raise ValueError(shape)


def object_rgb(o: dict) -> list[int]:
    return [min(255, max(0, c + j)) for c, j in zip(RGB[o["colour"]], o["jitter"])]


def render(scene: dict, geo: Geometry, noise: np.ndarray) -> np.ndarray:
    s, k = geo.size, SUPERSAMPLE
    ox, oy = scene["noise"]
    img = np.empty((s, s, 3), np.float32)
    img[:] = (scene["background"] + noise[oy:oy + s, ox:ox + s])[:, :, None]
    for o in scene["objects"]:
        x0, y0, x1, y1 = bbox(o)
        px0, py0, px1, py1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
        half = o["e"] / 2
        u = ((np.arange(px0 * k, px1 * k, dtype=np.float32) + 0.5) / k - o["cx"]) / half
        v = ((np.arange(py0 * k, py1 * k, dtype=np.float32) + 0.5) / k - o["cy"]) / half
        mask = _inside_shape(o["shape"], u[None, :], v[:, None])
        cover = mask.reshape(py1 - py0, k, px1 - px0, k).mean(axis=(1, 3), dtype=np.float32)[:, :, None]
        region = img[py0:py1, px0:px1]
        region += (np.asarray(object_rgb(o), np.float32) - region) * cover
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def polygon(o: dict) -> list[float]:
    """The object's outline as a COCO polygon (flat x, y list, pixels)."""
    cx, cy, h = o["cx"], o["cy"], o["e"] / 2
    t = CROSS_ARM
    unit = {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
        "triangle": [(0, -1), (1, 1), (-1, 1)],
        "cross": [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
                  (-t, -t)],
        "circle": [(math.cos(2 * math.pi * i / 24), math.sin(2 * math.pi * i / 24)) for i in range(24)],
    }[o["shape"]]
    return [round(c, 2) for x, y in unit for c in (cx + x * h, cy + y * h)]


def area(o: dict) -> float:
    e = o["e"]
    factor = {"circle": math.pi / 4, "square": 1.0, "diamond": 0.5, "triangle": 0.5,
              "cross": 2 * CROSS_ARM - CROSS_ARM ** 2}[o["shape"]]
    return round(factor * e * e, 2)


# -- writing -----------------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    data = json.dumps(obj, separators=(",", ":"))  # dumps, not dump: only the one-shot encoder is the C one
    with open(path, "w", encoding="utf-8") as f:
        f.write(data + "\n")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def coco_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def vqa_name(image_id: int, split: str) -> str:
    sub = VQA_SUBTYPE[split]
    return f"{sub}/COCO_{sub}_{image_id:012d}.jpg"


def _is_world(out: Path) -> bool:
    """A (possibly interrupted) world written by this module: we may replace it."""
    try:
        return json.loads((out / MANIFEST).read_text())["generator"] == "data_recipes.shapes"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise WorldError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_world(out):
            raise WorldError(f"--out {out} is not empty and holds no shapes world ({MANIFEST}); "
                             "choose an empty or new directory")
        # a previous world: remove exactly what we write, then regenerate
        for name in ("coco", "vg", "vqa"):
            shutil.rmtree(out / name, ignore_errors=True)
        for split in SPLITS:
            for stem in ("phrases", "scenes"):
                (out / f"{stem}_{split}.json").unlink(missing_ok=True)
        (out / MANIFEST).unlink()
    for d in ("coco/annotations", "coco/train2017", "coco/val2017", "vg/VG_100K", "vqa/train2014", "vqa/val2014"):
        (out / d).mkdir(parents=True, exist_ok=True)
    # marks the directory as ours from the start, so an interrupted run can be repeated; rewritten when complete
    _write_json(out / MANIFEST, {"generator": "data_recipes.shapes", "version": VERSION, "complete": False})


def _coco_header(seed: int) -> dict:
    return {"info": {"description": f"vlp synthetic shapes world (data_recipes.shapes, seed {seed})",
                     "url": "", "version": str(VERSION), "year": 2017, "contributor": "vlp", "date_created": ""},
            "licenses": [{"url": "", "id": 1, "name": "synthetic, public domain"}]}


def _image_entry(image_id: int, size: int) -> dict:
    return {"license": 1, "file_name": coco_name(image_id), "coco_url": "", "height": size, "width": size,
            "date_captured": "", "flickr_url": "", "id": image_id}


def generate(out, seed: int = 0, train: int = 8000, val: int = 1000, test: int = 1000, image_size: int = 128,
             progress: bool = True) -> dict:
    """Generate the shapes world into ``out`` and return what was written (counts, id ranges, absolute paths)."""
    counts = {"train": train, "val": val, "test": test}
    for name, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise WorldError(f"--{name} must be a non-negative integer, got {n!r}")
    if sum(counts.values()) < 1:
        raise WorldError("nothing to generate: --train, --val and --test are all 0")
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise WorldError(f"--image-size must be an integer in [32, 1024], got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise WorldError(f"--seed must be a non-negative integer, got {seed!r}")
    from tqdm import tqdm
    from PIL import Image

    out = Path(out)
    _prepare_out(out)
    geo = Geometry(image_size)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, (2 * image_size, 2 * image_size)).astype(np.float32)

    bar = tqdm(total=sum(counts.values()), desc="shapes", unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    worlds: dict[str, list[dict]] = {}
    next_id = 1
    for split in SPLITS:
        bar.set_postfix_str(f"{split}: scenes")
        scenes = generate_split(split, counts[split], seed, geo)
        for i, s in enumerate(scenes):
            s["image_id"] = next_id + i
        for s in scenes:
            if s["twin"] is not None:
                s["twin"] = {"image_id": scenes[s["twin"]["index"]]["image_id"], "change": s["twin"]["change"]}
        next_id += len(scenes)
        worlds[split] = scenes
        bar.set_postfix_str(f"{split}: images")
        for s in scenes:
            iid = s["image_id"]
            path = out / "coco" / COCO_FOLDER[split] / coco_name(iid)
            Image.fromarray(render(s, geo, noise)).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
            _link(path, out / "vqa" / vqa_name(iid, split))
            if split == "train":
                _link(path, out / "vg" / "VG_100K" / f"{iid}.jpg")
            bar.update(1)
    bar.set_postfix_str("annotations")

    _write_coco(out, worlds, seed, image_size)
    _write_vg(out, worlds["train"], image_size, geo)
    _write_vqa(out, worlds, seed)
    for split in SPLITS:
        _write_json(out / f"phrases_{split}.json", {str(s["image_id"]): s["phrases"] for s in worlds[split]})
        _write_json(out / f"scenes_{split}.json", {str(s["image_id"]): _scene_record(s, split)
                                                   for s in worlds[split]})
    manifest = {
        "generator": "data_recipes.shapes", "version": VERSION, "complete": True, "seed": seed,
        "image_size": image_size, "counts": counts,
        "image_ids": {sp: [w[0]["image_id"], w[-1]["image_id"]] if w else [] for sp, w in worlds.items()},
        "questions": {sp: sum(len(s["questions"]) for s in w) for sp, w in worlds.items()},
        "with_twin": {sp: sum(s["twin"] is not None for s in w) for sp, w in worlds.items()},
        "paths": _paths(),
    }
    _write_json(out / MANIFEST, manifest)
    bar.set_postfix_str("done")
    bar.close()
    return dict(manifest, out=str(out.resolve()), paths=_paths(out.resolve()))


def _paths(root: Path | None = None) -> dict:
    def p(rel: str) -> str:
        return str(root / rel) if root is not None else rel

    return {
        "coco": p("coco"), "karpathy": p("coco/dataset_coco.json"),
        "coco_captions": {s: p(f"coco/annotations/captions_{s}2017.json") for s in ("train", "val")},
        "coco_instances": {s: p(f"coco/annotations/instances_{s}2017.json") for s in ("train", "val")},
        "vg": p("vg"), "vqa": p("vqa"),
        "vqa_questions": {s: p(f"vqa/v2_OpenEnded_mscoco_{s}2014_questions.json") for s in ("train", "val")},
        "vqa_annotations": {s: p(f"vqa/v2_mscoco_{s}2014_annotations.json") for s in ("train", "val")},
        "phrases": {s: p(f"phrases_{s}.json") for s in SPLITS},
        "scenes": {s: p(f"scenes_{s}.json") for s in SPLITS},
        "manifest": p(MANIFEST),
    }


def _scene_record(s: dict, split: str) -> dict:
    return {
        "image_id": s["image_id"], "split": split,
        "file_name": f"{COCO_FOLDER[split]}/{coco_name(s['image_id'])}",
        "objects": [{"shape": o["shape"], "colour": o["colour"], "size": o["size"], "centre": [o["cx"], o["cy"]],
                     "bbox": list(bbox(o)), "rgb": object_rgb(o)} for o in s["objects"]],
        "relations": s["relations"],
        "captions": s["captions"],
        "twin": s["twin"],
        "render": {"background": s["background"], "noise_offset": s["noise"]},
    }


def _write_coco(out: Path, worlds: dict, seed: int, size: int) -> None:
    categories = [{"supercategory": "shape", "id": CATEGORY_ID[s], "name": s} for s in text.SHAPES]
    for folder, splits in (("train", ("train",)), ("val", ("val", "test"))):
        scenes = [s for sp in splits for s in worlds[sp]]
        images = [_image_entry(s["image_id"], size) for s in scenes]
        caps = [{"image_id": s["image_id"], "id": s["image_id"] * 10 + k, "caption": c}
                for s in scenes for k, c in enumerate(s["captions"])]
        inst = [{"segmentation": [polygon(o)], "area": area(o), "iscrowd": 0, "image_id": s["image_id"],
                 "bbox": [o["cx"] - o["e"] / 2, o["cy"] - o["e"] / 2, o["e"], o["e"]],
                 "category_id": CATEGORY_ID[o["shape"]], "id": s["image_id"] * 10 + k}
                for s in scenes for k, o in enumerate(s["objects"])]
        ann = out / "coco" / "annotations"
        _write_json(ann / f"captions_{folder}2017.json", dict(_coco_header(seed), images=images, annotations=caps))
        _write_json(ann / f"instances_{folder}2017.json",
                    dict(_coco_header(seed), images=images, annotations=inst, categories=categories))
    karpathy, sentid = [], 0
    for split in SPLITS:
        for s in worlds[split]:
            imgid = len(karpathy)
            sentences = []
            for c in s["captions"]:
                sentences.append({"tokens": re.findall(r"[a-z0-9]+", c.lower()), "raw": c, "imgid": imgid,
                                  "sentid": sentid})
                sentid += 1
            karpathy.append({"filepath": COCO_FOLDER[split], "filename": coco_name(s["image_id"]),
                             "sentences": sentences, "split": split, "cocoid": s["image_id"], "imgid": imgid,
                             "sentids": [x["sentid"] for x in sentences]})
    _write_json(out / "coco" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})


def _int_box(o: dict) -> dict:
    x0, y0, x1, y1 = bbox(o)
    x, y = math.floor(x0), math.floor(y0)
    return {"x": x, "y": y, "w": math.ceil(x1) - x, "h": math.ceil(y1) - y}


def _write_vg(out: Path, scenes: list[dict], size: int, geo: Geometry) -> None:
    image_data, regions, objects, attributes = [], [], [], []
    for s in scenes:
        iid = s["image_id"]
        image_data.append({"image_id": iid, "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{iid}.jpg",
                           "width": size, "height": size, "coco_id": iid, "flickr_id": None})
        objs = s["objects"]
        regs = []
        for k, o in enumerate(objs):
            b = _int_box(o)
            regs.append({"region_id": iid * 100 + k, "image_id": iid, "phrase": f"{o['size']} {o['colour']} "
                         f"{o['shape']}", "x": b["x"], "y": b["y"], "width": b["w"], "height": b["h"]})
        rels = relations(objs, geo.gap)
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, c = _int_box(objs[i]), _int_box(objs[j])
                x, y = min(a["x"], c["x"]), min(a["y"], c["y"])
                w = max(a["x"] + a["w"], c["x"] + c["w"]) - x
                h = max(a["y"] + a["h"], c["y"] + c["h"]) - y
                phrase = (f"{objs[i]['colour']} {objs[i]['shape']} {text.relation_words(rels[(i, j)], False)} "
                          f"{objs[j]['colour']} {objs[j]['shape']}")
                regs.append({"region_id": iid * 100 + len(regs), "image_id": iid, "phrase": phrase,
                             "x": x, "y": y, "width": w, "height": h})
        regions.append({"id": iid, "regions": regs})
        vg_objs, vg_attrs = [], []
        for k, o in enumerate(objs):
            b = _int_box(o)
            entry = {"object_id": iid * 10 + k, "x": b["x"], "y": b["y"], "w": b["w"], "h": b["h"],
                     "names": [o["shape"]], "synsets": []}
            vg_objs.append(entry)
            vg_attrs.append(dict(entry, attributes=[o["colour"], o["size"]]))
        objects.append({"image_id": iid, "objects": vg_objs})
        attributes.append({"image_id": iid, "attributes": vg_attrs})
    vg = out / "vg"
    _write_json(vg / "image_data.json", image_data)
    _write_json(vg / "region_descriptions.json", regions)
    _write_json(vg / "objects.json", objects)
    _write_json(vg / "attributes.json", attributes)


def _write_vqa(out: Path, worlds: dict, seed: int) -> None:
    info = {"description": f"vlp synthetic shapes world (data_recipes.shapes, seed {seed})", "url": "",
            "version": "2.0", "year": 2017, "contributor": "vlp", "date_created": ""}
    license_ = {"url": "", "name": "synthetic, public domain"}
    for subtype, splits in (("train2014", ("train",)), ("val2014", ("val", "test"))):
        qs, anns = [], []
        for sp in splits:
            for s in worlds[sp]:
                for k, q in enumerate(s["questions"]):
                    qid = s["image_id"] * 1000 + k
                    qs.append({"image_id": s["image_id"], "question": q["question"], "question_id": qid})
                    anns.append({"question_type": q["question_type"], "multiple_choice_answer": q["answer"],
                                 "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": a}
                                             for a in range(1, 11)],
                                 "image_id": s["image_id"], "answer_type": q["answer_type"], "question_id": qid})
        _write_json(out / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                    {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                     "license": license_, "questions": qs})
        _write_json(out / "vqa" / f"v2_mscoco_{subtype}_annotations.json",
                    {"info": info, "license": license_, "data_subtype": subtype, "data_type": "mscoco",
                     "annotations": anns})


# -- command line ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_recipes.shapes",
        description="Generate the synthetic shapes world (COCO, Karpathy, VG and VQA v2 raw formats).")
    p.add_argument("--out", required=True, help="output directory (new, empty, or a previous shapes world)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train", type=int, default=8000, help="train images (default 8000)")
    p.add_argument("--val", type=int, default=1000, help="val images (default 1000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels, 32..1024 (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2, message already printed)
        return int(e.code or 0)
    try:
        info = generate(args.out, seed=args.seed, train=args.train, val=args.val, test=args.test,
                        image_size=args.image_size, progress=not args.quiet)
    except WorldError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    c = info["counts"]
    print(f"shapes world in {info['out']}: {c['train']} train, {c['val']} val, {c['test']} test images, "
          f"{sum(info['questions'].values())} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
