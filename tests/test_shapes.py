"""The synthetic shapes world (data_recipes.shapes): formats, determinism, and truth of every caption, box and answer.

The captions and questions are checked by a small parser written here from the grammar, not by re-running the
generator's own templates, and the boxes against the decoded JPEG pixels.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_recipes import shapes

SIZE = 64
COUNTS = {"train": 60, "val": 20, "test": 20}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
          "crosses": "cross"}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black"]
NUMBER = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
REL_PHRASES = [("to the left of", "left of"), ("to the right of", "right of"), ("left of", "left of"),
               ("right of", "right of"), ("above", "above"), ("below", "below")]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# location phrase -> (row, column) of the 3x3 grid
LOCATIONS = {"in the top left corner": (0, 0), "at the top": (0, 1), "in the top right corner": (0, 2),
             "on the left": (1, 0), "in the centre": (1, 1), "on the right": (1, 2),
             "in the bottom left corner": (2, 0), "at the bottom": (2, 1), "in the bottom right corner": (2, 2)}
FILLER = {"a", "an", "is", "are", "there", "and", "picture", "image", "of", "with", ":", ","}
OBJECT_DIFF = 60  # max-channel difference from the background of a clearly drawn object pixel
BACKGROUND_DIFF = 45  # noise and JPEG ringing stay below this


def _gen(out: Path, seed: int = 0, **kw) -> dict:
    args = dict(COUNTS, image_size=SIZE, progress=False)
    args.update(kw)
    return shapes.generate(out, seed=seed, **args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    info = _gen(root / "a")
    scenes = {sp: json.loads((root / "a" / f"scenes_{sp}.json").read_text()) for sp in COUNTS}
    return {"root": root, "dir": root / "a", "info": info, "scenes": scenes}


def _load(path: Path):
    return json.loads(path.read_text())


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _all_scenes(world) -> list[dict]:
    return [s for sp in COUNTS for s in world["scenes"][sp].values()]


# -- layout, determinism -----------------------------------------------------------------------------------------------
def test_layout_and_ids(world):
    d, info = world["dir"], world["info"]
    for rel in ["coco/annotations/captions_train2017.json", "coco/annotations/captions_val2017.json",
                "coco/annotations/instances_train2017.json", "coco/annotations/instances_val2017.json",
                "coco/dataset_coco.json", "vg/image_data.json", "vg/region_descriptions.json", "vg/objects.json",
                "vg/attributes.json", "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                "vqa/v2_OpenEnded_mscoco_val2014_questions.json", "vqa/v2_mscoco_train2014_annotations.json",
                "vqa/v2_mscoco_val2014_annotations.json", "shapes_world.json"] + \
            [f"{stem}_{sp}.json" for stem in ("phrases", "scenes") for sp in COUNTS]:
        assert (d / rel).is_file(), rel
    ids = {sp: sorted(int(k) for k in world["scenes"][sp]) for sp in COUNTS}
    assert ids["train"] == list(range(1, 61))
    assert ids["val"] == list(range(61, 81))
    assert ids["test"] == list(range(81, 101))
    assert info["counts"] == COUNTS and info["image_ids"]["val"] == [61, 80]
    assert Path(info["paths"]["karpathy"]) == (d / "coco/dataset_coco.json").resolve()
    assert sorted(os.listdir(d / "coco/train2017")) == [f"{i:012d}.jpg" for i in ids["train"]]
    assert sorted(os.listdir(d / "coco/val2017")) == [f"{i:012d}.jpg" for i in ids["val"] + ids["test"]]
    assert sorted(os.listdir(d / "vqa/train2014")) == [f"COCO_train2014_{i:012d}.jpg" for i in ids["train"]]
    assert sorted(os.listdir(d / "vqa/val2014")) == [f"COCO_val2014_{i:012d}.jpg"
                                                     for i in ids["val"] + ids["test"]]
    assert sorted(os.listdir(d / "vg/VG_100K"), key=lambda n: int(n[:-4])) == [f"{i}.jpg" for i in ids["train"]]
    # the VQA and VG copies are the COCO images (hard links here)
    for i in (1, 60):
        src = d / f"coco/train2017/{i:012d}.jpg"
        for other in (d / f"vqa/train2014/COCO_train2014_{i:012d}.jpg", d / f"vg/VG_100K/{i}.jpg"):
            assert other.read_bytes() == src.read_bytes()
            assert os.path.samefile(other, src)
    for i in (61, 100):
        assert (d / f"vqa/val2014/COCO_val2014_{i:012d}.jpg").read_bytes() == \
            (d / f"coco/val2017/{i:012d}.jpg").read_bytes()
    with Image.open(d / "coco/val2017/000000000100.jpg") as im:
        assert im.format == "JPEG" and im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_deterministic_by_seed(world):
    a = _files(world["dir"])
    _gen(world["root"] / "b")
    b = _files(world["root"] / "b")
    assert a.keys() == b.keys()
    different = [k for k in a if a[k] != b[k]]
    assert not different, f"same seed, different bytes: {different[:5]}"
    _gen(world["root"] / "c", seed=1)
    c = _files(world["root"] / "c")
    assert a.keys() == c.keys()
    assert a["scenes_test.json"] != c["scenes_test.json"]
    assert a["coco/val2017/000000000100.jpg"] != c["coco/val2017/000000000100.jpg"]


def test_val_test_do_not_depend_on_train_size(world):
    _gen(world["root"] / "small_train", train=7)
    for sp in ("val", "test"):
        other = _load(world["root"] / "small_train" / f"scenes_{sp}.json")
        mine = world["scenes"][sp]
        assert [s["captions"] for s in other.values()] == [s["captions"] for s in mine.values()]


def test_regenerating_into_a_world_replaces_it(tmp_path):
    _gen(tmp_path, train=3, val=2, test=2)
    assert len(os.listdir(tmp_path / "coco/train2017")) == 3
    _gen(tmp_path, train=2, val=1, test=1)
    assert len(os.listdir(tmp_path / "coco/train2017")) == 2  # no stale images left
    assert len(os.listdir(tmp_path / "vqa/val2014")) == 2
    assert _load(tmp_path / "shapes_world.json")["counts"] == {"train": 2, "val": 1, "test": 1}
    # an interrupted run (only the start marker written) is ours too, and is replaced
    (tmp_path / "shapes_world.json").write_text('{"generator":"data_recipes.shapes","complete":false}')
    _gen(tmp_path, train=1, val=1, test=1)
    assert _load(tmp_path / "shapes_world.json")["complete"] is True
    assert len(os.listdir(tmp_path / "coco/train2017")) == 1


# -- COCO, Karpathy ----------------------------------------------------------------------------------------------------
def test_coco_loads_with_pycocotools(world, capsys):
    from pycocotools.coco import COCO

    d = world["dir"] / "coco/annotations"
    for folder, splits in (("train", ["train"]), ("val", ["val", "test"])):
        scenes = {int(k): s for sp in splits for k, s in world["scenes"][sp].items()}
        caps = COCO(str(d / f"captions_{folder}2017.json"))
        assert sorted(caps.getImgIds()) == sorted(scenes)
        assert len(caps.getAnnIds()) == 5 * len(scenes)
        for iid, s in scenes.items():
            assert [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=[iid]))] == s["captions"]
        inst = COCO(str(d / f"instances_{folder}2017.json"))
        cats = inst.loadCats(inst.getCatIds())
        assert sorted(c["name"] for c in cats) == sorted(SHAPES)
        assert {c["supercategory"] for c in cats} == {"shape"}
        assert len(inst.getAnnIds()) == sum(len(s["objects"]) for s in scenes.values())
        for iid, s in scenes.items():
            img = inst.loadImgs([iid])[0]
            assert img["file_name"] == f"{iid:012d}.jpg" and img["width"] == img["height"] == SIZE
            anns = inst.loadAnns(inst.getAnnIds(imgIds=[iid]))
            assert len(anns) == len(s["objects"])
            for ann, o in zip(anns, s["objects"]):
                assert inst.loadCats([ann["category_id"]])[0]["name"] == o["shape"]
                x, y, w, h = ann["bbox"]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert [x, y, x + w, y + h] == o["bbox"]
                assert ann["iscrowd"] == 0
                mask = inst.annToMask(ann)
                assert mask.shape == (SIZE, SIZE)
                ys, xs = np.nonzero(mask)
                # the polygon's mask lies in the box and has about the stated area
                assert xs.min() >= math.floor(x) and xs.max() < math.ceil(x + w)
                assert ys.min() >= math.floor(y) and ys.max() < math.ceil(y + h)
                assert abs(mask.sum() - ann["area"]) <= 0.2 * ann["area"] + 6
    capsys.readouterr()


def test_karpathy_splits(world):
    data = _load(world["dir"] / "coco/dataset_coco.json")
    assert data["dataset"] == "coco"
    images = data["images"]
    assert len(images) == sum(COUNTS.values())
    seen_sentids = set()
    for k, im in enumerate(images):
        split = im["split"]
        scene = world["scenes"][split][str(im["cocoid"])]
        assert im["imgid"] == k
        assert im["filepath"] == ("train2017" if split == "train" else "val2017")
        assert im["filename"] == f"{im['cocoid']:012d}.jpg"
        assert (world["dir"] / "coco" / im["filepath"] / im["filename"]).is_file()
        assert [s["raw"] for s in im["sentences"]] == scene["captions"]
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == k
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
            assert s["sentid"] not in seen_sentids
            seen_sentids.add(s["sentid"])
    assert {sp: sum(im["split"] == sp for im in images) for sp in COUNTS} == COUNTS


# -- scene graphs and pixels -------------------------------------------------------------------------------------------
def _sep(a: list[float], b: list[float], axis: int) -> float:
    return max(b[axis] - a[axis + 2], a[axis] - b[axis + 2])


def test_scene_graphs_are_consistent(world):
    for s in _all_scenes(world):
        objs = s["objects"]
        assert 1 <= len(objs) <= 4
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        stated = {(i, j): set() for i in range(len(objs)) for j in range(len(objs)) if i != j}
        for i, r, j in s["relations"]:
            stated[(i, j)].add(r)
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert o["centre"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            side = x1 - x0
            assert (0.12 * SIZE <= side <= 0.2 * SIZE) if o["size"] == "small" else (0.25 * SIZE <= side <= 0.35 * SIZE)
            assert o["shape"] in SHAPES and o["colour"] in COLOURS
        for (i, j), rels in stated.items():
            a, b = objs[i]["bbox"], objs[j]["bbox"]
            sx, sy = _sep(a, b, 0), _sep(a, b, 1)
            assert sx >= 3 or sy >= 3, "objects overlap or touch"
            expected = set()
            for sep, lo, hi, axis in ((sx, "left of", "right of", 0), (sy, "above", "below", 1)):
                assert sep >= 3 or sep <= -3, f"ambiguous {lo}/{hi} between {objs[i]} and {objs[j]}"
                if sep >= 3:
                    expected.add(lo if a[axis + 2] <= b[axis] else hi)
            assert rels == expected
            for r in rels:
                axis = 0 if r in ("left of", "right of") else 1
                offset = objs[j]["centre"][axis] - objs[i]["centre"][axis]
                assert (offset if r in ("left of", "above") else -offset) > 0.15 * SIZE


def _diff(img: np.ndarray, bg: int) -> np.ndarray:
    return np.abs(img - bg).max(axis=-1)


def test_boxes_are_tight_around_the_drawn_objects(world):
    palette = {c: np.array(rgb) for c, rgb in shapes.RGB.items()}
    for s in _all_scenes(world):
        img = np.asarray(Image.open(world["dir"] / "coco" / s["file_name"]), dtype=np.int16)
        diff = _diff(img, s["render"]["background"])
        boxes = [[math.floor(o["bbox"][0]), math.floor(o["bbox"][1]), math.ceil(o["bbox"][2]),
                  math.ceil(o["bbox"][3])] for o in s["objects"]]
        covered = np.zeros(diff.shape, bool)
        for x0, y0, x1, y1 in boxes:
            covered[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
        # nothing is drawn outside the boxes (1 px slack for anti-aliasing)
        assert diff[~covered].max() < BACKGROUND_DIFF, s["image_id"]
        for o, (x0, y0, x1, y1) in zip(s["objects"], boxes):
            inside = diff[y0:y1, x0:x1] > OBJECT_DIFF
            rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
            # each side of the box touches the object within 2 px
            assert rows[0] <= 2 and rows[-1] >= (y1 - y0) - 3, (s["image_id"], o)
            assert cols[0] <= 2 and cols[-1] >= (x1 - x0) - 3, (s["image_id"], o)
            # the colour at the centre is recognisably the object's colour
            cx, cy = int(o["centre"][0]), int(o["centre"][1])
            patch = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
            nearest = min(palette, key=lambda c: np.abs(palette[c] - patch).sum())
            assert nearest == o["colour"], (s["image_id"], o, patch)


def test_shapes_are_distinguishable(world):
    """The fraction of the box an object fills tells the shapes apart (square > circle > cross > diamond ~ triangle;
    the diamond and the triangle differ in where the pixels are)."""
    fill: dict[str, list[float]] = {sh: [] for sh in SHAPES}
    top_row: dict[str, list[float]] = {sh: [] for sh in SHAPES}
    for s in _all_scenes(world):
        img = np.asarray(Image.open(world["dir"] / "coco" / s["file_name"]), dtype=np.int16)
        diff = _diff(img, s["render"]["background"])
        for o in s["objects"]:
            if o["size"] != "large":
                continue
            x0, y0, x1, y1 = (round(v) for v in o["bbox"])
            box = diff[y0:y1, x0:x1] > OBJECT_DIFF
            fill[o["shape"]].append(box.mean())
            top_row[o["shape"]].append(box[box.shape[0] // 4].mean())  # a quarter down: wide for square/cross
    mean = {k: float(np.mean(v)) for k, v in fill.items()}
    assert mean["square"] > 0.85 and 0.7 < mean["circle"] < 0.85
    assert 0.45 < mean["cross"] < 0.65 and mean["diamond"] < 0.55 and mean["triangle"] < 0.55
    assert np.mean(top_row["triangle"]) < np.mean(top_row["diamond"]) - 0.1


# -- captions ----------------------------------------------------------------------------------------------------------
def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|[:,]", caption)


def parse(caption: str) -> list[tuple]:
    """Caption -> items: ("np", det, size, colour, noun, plural), ("rel", relation), ("loc", (row, col))."""
    words, items, i = _tokens(caption), [], 0
    while i < len(words):
        rest = " ".join(words[i:])
        loc = next((p for p in LOCATIONS if rest == p or rest.startswith(p + " ")), None)
        if loc:
            items.append(("loc", LOCATIONS[loc]))
            i += len(loc.split())
            continue
        rel = next(((p, r) for p, r in REL_PHRASES if rest == p or rest.startswith(p + " ")), None)
        if rel:
            items.append(("rel", rel[1]))
            i += len(rel[0].split())
            continue
        if words[i] in ("a", "an", "the") or words[i] in NUMBER:
            j = i + 1
            size = words[j] if j < len(words) and words[j] in ("small", "large") else None
            j += size is not None
            colour = words[j] if j < len(words) and words[j] in COLOURS else None
            j += colour is not None
            noun = words[j] if j < len(words) else None
            if noun in SHAPES or noun in PLURAL or noun in ("shape", "shapes"):
                plural = noun in PLURAL or noun == "shapes"
                items.append(("np", words[i], size, colour, PLURAL.get(noun, noun), plural))
                i = j + 1
                continue
            assert size is None and colour is None, f"dangling words in {caption!r}"
        assert words[i] in FILLER, f"unexpected word {words[i]!r} in {caption!r}"
        i += 1
    return items


def _matches(np_item: tuple, objects: list[dict]) -> list[int]:
    _, _, size, colour, noun, _ = np_item
    return [k for k, o in enumerate(objects) if (noun in ("shape", "shapes") or o["shape"] == noun)
            and (size is None or o["size"] == size) and (colour is None or o["colour"] == colour)]


def relation_triples(items: list[tuple]) -> set[tuple[str, str, str]]:
    """(subject noun, relation, object noun) of every relation in a parsed caption."""
    out = set()
    for k, it in enumerate(items):
        if it[0] == "rel":
            subj = next(items[m] for m in range(k - 1, -1, -1) if items[m][0] == "np")
            obj = next(items[m] for m in range(k + 1, len(items)) if items[m][0] == "np")
            out.add((subj[4], it[1], obj[4]))
    return out


def check_caption(caption: str, scene: dict) -> list[tuple]:
    """Assert that a caption is true of its scene; return its parsed items."""
    objs = scene["objects"]
    rel_set = {(i, r, j) for i, r, j in scene["relations"]}
    items = parse(caption)
    for k, it in enumerate(items):
        if it[0] == "np":
            found = _matches(it, objs)
            if it[1] in NUMBER:
                assert len(found) == NUMBER[it[1]], (caption, objs)
            elif it[1] == "the":
                assert len(found) == 1, (caption, objs)
            else:
                assert found, (caption, objs)
        elif it[0] == "rel":
            subj = next(items[m] for m in range(k - 1, -1, -1) if items[m][0] == "np")
            obj = next(items[m] for m in range(k + 1, len(items)) if items[m][0] == "np")
            assert any((a, it[1], b) in rel_set for a in _matches(subj, objs) for b in _matches(obj, objs)), \
                (caption, it, scene["relations"])
        elif it[0] == "loc":
            subj = next(items[m] for m in range(k - 1, -1, -1) if items[m][0] == "np")
            row, col = it[1]
            for a in _matches(subj, objs):
                cx, cy = objs[a]["centre"]
                assert int(cx // (SIZE / 3)) == col and int(cy // (SIZE / 3)) == row, (caption, objs[a])
    return items


def test_captions_are_true_of_their_scenes(world):
    kinds = set()
    for s in _all_scenes(world):
        for c in s["captions"]:
            items = check_caption(c, s)
            kinds.add(tuple(sorted({it[0] for it in items})))
    # relations, locations and plain object lists all occur
    assert ("np", "rel") in kinds and ("loc", "np") in kinds and ("np",) in kinds


def test_the_checker_rejects_false_captions(world):
    s = next(s for s in world["scenes"]["test"].values() if len(s["objects"]) >= 2)
    a, b = s["objects"][0], s["objects"][1]
    wrong_colour = next(c for c in COLOURS if (c, a["shape"]) not in {(o["colour"], o["shape"]) for o in s["objects"]})
    i, r, j = s["relations"][0]
    oi, oj = s["objects"][i], s["objects"][j]
    for bad in (f"a {wrong_colour} {a['shape']}",
                f"the {oi['colour']} {oi['shape']} is {INVERSE[r]} the {oj['colour']} {oj['shape']}",
                f"there are {['zero', 'one', 'two', 'three', 'four'][len(s['objects']) - 1]} shapes"):
        with pytest.raises(AssertionError):
            check_caption(bad, s)
    check_caption(f"a {a['colour']} {a['shape']} and a {b['colour']} {b['shape']}", s)


def test_five_distinct_captions_and_a_unique_full_first_caption(world):
    for sp in COUNTS:
        firsts = []
        for s in world["scenes"][sp].values():
            caps = s["captions"]
            assert len(caps) == 5 and len(set(caps)) == 5
            items = parse(caps[0])
            nps = [it for it in items if it[0] == "np"]
            # every object named with size, colour and shape, each exactly once
            assert all(it[1] == "a" or it[1] == "an" for it in nps)
            assert all(it[2] and it[3] for it in nps)
            named = sorted(_matches(it, s["objects"])[0] for it in nps)
            assert named == list(range(len(s["objects"])))
            rels = [it for it in items if it[0] == "rel"]
            if len(s["objects"]) == 1:
                assert any(it[0] == "loc" for it in items)
            else:
                assert len(rels) >= len(s["objects"]) - 1
            # short enough for a 32-token text encoder (+ [CLS], [SEP])
            assert all(len(_tokens(c)) <= 30 for c in caps)
            firsts.append(caps[0])
        assert len(set(firsts)) == len(firsts), f"{sp}: first captions are not unique"
    # the captions are varied: several templates among the non-first captions
    openings = {c.split()[0] + " " + c.split()[1] for s in _all_scenes(world) for c in s["captions"][1:]}
    assert len(openings) >= 10


def test_first_captions_stay_unique_in_a_large_split():
    """1500 scenes (no images): lone objects alone would collide by chance, so uniqueness needs the regeneration."""
    scenes = shapes.generate_split("test", 1500, seed=3, geo=shapes.Geometry(32))
    assert len(scenes) == 1500
    firsts = [s["captions"][0] for s in scenes]
    assert len(set(firsts)) == len(firsts)
    counts = np.bincount([len(s["objects"]) for s in scenes], minlength=5)
    assert counts[0] == 0 and all(counts[1:] > 50)
    assert 0.3 <= sum(s["twin"] is not None for s in scenes) / len(scenes) <= 0.5


def test_vocabulary_is_small(world):
    words = set()
    for s in _all_scenes(world):
        for c in s["captions"]:
            words |= set(re.findall(r"[a-z]+", c))
    for name in ("train", "val"):
        for q in _load(world["dir"] / f"vqa/v2_OpenEnded_mscoco_{name}2014_questions.json")["questions"]:
            words |= set(re.findall(r"[a-z]+", q["question"]))
    assert len(words) < 100
    assert words <= set(shapes.text.vocabulary())


def test_phrases_refer_to_the_scene_and_the_caption(world):
    for sp in COUNTS:
        phrases = _load(world["dir"] / f"phrases_{sp}.json")
        assert phrases.keys() == world["scenes"][sp].keys()
        for key, per_caption in phrases.items():
            s = world["scenes"][sp][key]
            objs = s["objects"]
            rel_set = {(objs[i]["shape"], r, objs[j]["shape"]) for i, r, j in s["relations"]}
            assert len(per_caption) == 5
            for caption, tuples in zip(s["captions"], per_caption):
                items = parse(caption)
                nouns = {it[4] for it in items if it[0] == "np" and it[4] not in ("shape", "shapes")}
                assert {t[0] for t in tuples} == nouns, (caption, tuples)
                assert len({tuple(t) for t in tuples}) == len(tuples)
                for t in tuples:
                    assert t[0] in SHAPES
                    if len(t) == 1:
                        assert any(o["shape"] == t[0] for o in objs)
                    elif len(t) == 2:
                        assert any(o["shape"] == t[0] and t[1] in (o["colour"], o["size"]) for o in objs), t
                        assert t[1] in caption.split()
                    else:
                        assert len(t) == 3 and tuple(t) in rel_set, (t, caption)
                # the relation tuples are exactly the caption's relations
                assert {tuple(t) for t in tuples if len(t) == 3} == relation_triples(items), (caption, tuples)


# -- VQA ---------------------------------------------------------------------------------------------------------------
def expected_answer(question: str, objs: list[dict], relations: list) -> str:
    def one(pred) -> dict:
        found = [o for o in objs if pred(o)]
        assert len(found) == 1, (question, objs)
        return found[0]

    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        return one(lambda o: o["shape"] == m[2] and m[1] in (None, o["size"]))["colour"]
    if m := re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object\?", question):
        return one(lambda o: o["colour"] == m[2] and m[1] in (None, o["size"]))["shape"]
    if m := re.fullmatch(r"how many (\w+)(?: shapes)? are there\?", question):
        w = m[1]
        if w == "shapes":
            return str(len(objs))
        return str(sum(o["shape"] == PLURAL.get(w) or o["colour"] == w or o["size"] == w for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        a = objs.index(one(lambda o: (o["colour"], o["shape"]) == (m[1], m[2])))
        b = objs.index(one(lambda o: (o["colour"], o["shape"]) == (m[4], m[5])))
        stated = {r for i, r, j in relations if (i, j) == (a, b)}
        if m[3] in stated:
            return "yes"
        assert INVERSE[m[3]] in stated, f"uncertain relation question {question!r}"
        return "no"
    raise AssertionError(f"unknown question form {question!r}")


def test_vqa_answers_are_correct(world):
    d = world["dir"] / "vqa"
    types = {}
    for subtype, splits in (("train2014", ["train"]), ("val2014", ["val", "test"])):
        qfile = _load(d / f"v2_OpenEnded_mscoco_{subtype}_questions.json")
        afile = _load(d / f"v2_mscoco_{subtype}_annotations.json")
        assert qfile["task_type"] == "Open-Ended" and qfile["data_subtype"] == subtype
        assert afile["data_subtype"] == subtype
        scenes = {int(k): s for sp in splits for k, s in world["scenes"][sp].items()}
        qs, anns = qfile["questions"], {a["question_id"]: a for a in afile["annotations"]}
        assert len(qs) == len(anns) == len({q["question_id"] for q in qs})
        asked = {iid: [] for iid in scenes}
        for q in qs:
            s = scenes[q["image_id"]]
            a = anns[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            answers = [x["answer"] for x in a["answers"]]
            assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert {x["answer_confidence"] for x in a["answers"]} == {"yes"}
            assert set(answers) == {a["multiple_choice_answer"]}
            ans = a["multiple_choice_answer"]
            assert ans == ans.strip().lower()
            assert ans == expected_answer(q["question"], s["objects"], s["relations"]), q
            kind = {"yes": "yes/no", "no": "yes/no"}.get(ans, "number" if ans.isdigit() else "other")
            assert a["answer_type"] == kind
            asked[q["image_id"]].append(q["question"])
            types.setdefault(q["question"].split()[0] + " " + q["question"].split()[1], []).append(ans)
        for iid, questions in asked.items():
            assert any(q.startswith("what color") for q in questions) or \
                all(sum(o["shape"] == p["shape"] for p in scenes[iid]["objects"]) > 1
                    for o in scenes[iid]["objects"])
            assert any(q.startswith("how many") for q in questions)
            assert any(q.startswith("is there") for q in questions)
            if len(scenes[iid]["objects"]) > 1:
                assert any(q.startswith("is the") for q in questions)
    assert {"what color", "what shape", "how many", "is there", "is the"} <= types.keys()
    yes_no = types["is there"] + types["is the"]
    assert 0.3 < yes_no.count("yes") / len(yes_no) < 0.7


# -- VG ----------------------------------------------------------------------------------------------------------------
def test_visual_genome_files(world):
    d = world["dir"] / "vg"
    train = world["scenes"]["train"]
    image_data = _load(d / "image_data.json")
    assert [im["image_id"] for im in image_data] == [int(k) for k in train]
    for im in image_data:
        assert im["url"].endswith(f"/VG_100K/{im['image_id']}.jpg") and im["coco_id"] == im["image_id"]
        assert (im["width"], im["height"]) == (SIZE, SIZE) and im["flickr_id"] is None
    objects = {e["image_id"]: e["objects"] for e in _load(d / "objects.json")}
    attributes = {e["image_id"]: e["attributes"] for e in _load(d / "attributes.json")}
    regions = {e["id"]: e["regions"] for e in _load(d / "region_descriptions.json")}
    assert objects.keys() == attributes.keys() == regions.keys() == {int(k) for k in train}
    for key, s in train.items():
        iid = int(key)
        assert len(objects[iid]) == len(attributes[iid]) == len(s["objects"])
        for vo, va, o in zip(objects[iid], attributes[iid], s["objects"]):
            assert vo["names"] == [o["shape"]] and va["attributes"] == [o["colour"], o["size"]]
            x0, y0, x1, y1 = o["bbox"]
            assert vo["x"] <= x0 < vo["x"] + 1 and vo["y"] <= y0 < vo["y"] + 1
            assert vo["x"] + vo["w"] - 1 < x1 <= vo["x"] + vo["w"] and vo["y"] + vo["h"] - 1 < y1 <= vo["y"] + vo["h"]
        assert len({r["region_id"] for r in regions[iid]}) == len(regions[iid])
        for r in regions[iid]:
            assert r["image_id"] == iid
            assert 0 <= r["x"] and r["x"] + r["width"] <= SIZE and 0 <= r["y"] and r["y"] + r["height"] <= SIZE
            # "red circle left of and above blue square" -> a caption the checker reads
            check_caption("a " + re.sub(r"(left of|right of|above|below) (?!and)", r"\1 a ", r["phrase"]), s)
        assert len(regions[iid]) == len(s["objects"]) + len(s["objects"]) * (len(s["objects"]) - 1) // 2


# -- twins -------------------------------------------------------------------------------------------------------------
def test_twins_differ_in_exactly_one_thing(world):
    for sp in COUNTS:
        scenes = world["scenes"][sp]
        with_twin = [s for s in scenes.values() if s["twin"]]
        if sp == "test":
            assert len(with_twin) >= 0.2 * len(scenes), "too few twins in the test split"
        for s in with_twin:
            t = scenes[str(s["twin"]["image_id"])]  # the twin is in the same split
            assert t["twin"] == {"image_id": s["image_id"], "change": s["twin"]["change"]}
            assert t["captions"][0] != s["captions"][0]
            a, b = s["objects"], t["objects"]
            assert len(a) == len(b)
            diffs = {field: sum(x[field] != y[field] for x, y in zip(a, b))
                     for field in ("colour", "shape", "size", "centre")}
            change = s["twin"]["change"]
            if change == "colour":
                assert diffs == {"colour": 1, "shape": 0, "size": 0, "centre": 0}
            elif change == "shape":
                assert diffs == {"colour": 0, "shape": 1, "size": 0, "centre": 0}
            else:
                assert change == "relation" and diffs["colour"] == diffs["shape"] == diffs["size"] == 0
                assert diffs["centre"] >= 1
                ident = lambda sc: {(sc["objects"][i]["colour"], sc["objects"][i]["shape"], r,  # noqa: E731
                                     sc["objects"][j]["colour"], sc["objects"][j]["shape"])
                                    for i, r, j in sc["relations"]}
                assert ident(s) != ident(t)
            if change != "relation":
                assert s["render"] == t["render"]


# -- command line ------------------------------------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert shapes.main(["--out", str(out), "--train", "3", "--val", "2", "--test", "1", "--image-size", "32",
                        "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert "3 train, 2 val, 1 test" in captured.out
    assert "shapes" in captured.err and "6/6" in captured.err  # the progress bar
    manifest = _load(out / "shapes_world.json")
    assert manifest["seed"] == 5 and manifest["image_size"] == 32
    with Image.open(out / "coco/val2017/000000000006.jpg") as im:
        assert im.size == (32, 32)

    # the `vlp data shapes` entry point reaches the same main
    from vlp.cli import main as vlp_main

    assert vlp_main(["data", "shapes", "--out", str(tmp_path / "via_vlp"), "--train", "1", "--val", "0",
                     "--test", "0", "--quiet"]) == 0
    assert _load(tmp_path / "via_vlp" / "shapes_world.json")["counts"] == {"train": 1, "val": 0, "test": 0}
    capsys.readouterr()


def test_generate_quiet_prints_nothing(tmp_path, capfd):
    _gen(tmp_path, train=2, val=1, test=1)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("args, message", [
    (["--train", "-1"], "--train"),
    (["--test", "-3"], "--test"),
    (["--train", "0", "--val", "0", "--test", "0"], "nothing to generate"),
    (["--image-size", "16"], "--image-size"),
    (["--seed", "-1"], "--seed"),
    (["--train", "many"], "invalid int value"),
    (["--colour", "red"], "unrecognized arguments"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert shapes.main(["--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "shapes_world.json").exists()


def test_cli_needs_out_and_refuses_foreign_directories(tmp_path, capsys):
    assert shapes.main(["--train", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("keep me")
    assert shapes.main(["--out", str(tmp_path), "--train", "1", "--val", "0", "--test", "0"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "coco").exists()
    (tmp_path / "file").write_text("x")
    assert shapes.main(["--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert shapes.main(["--help"]) == 0
    assert "--image-size" in capsys.readouterr().out
