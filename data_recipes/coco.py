"""COCO Captions -> shards (one sample per image, all its captions; objects from the instances file when present).

Raw layout (as distributed by cocodataset.org)::

    RAW/annotations/captions_{train,val}2017.json      (or captions_{train,val}2014.json)
    RAW/annotations/instances_{train,val}2017.json     (optional: objects, bbox xywh -> xyxy, category names)
    RAW/{train,val}2017/000000391895.jpg               (or {train,val}2014/COCO_val2014_000000391895.jpg)

With ``--karpathy RAW/dataset_coco.json`` the Karpathy split (train/restval/val/test; restval is merged into train
unless ``--keep-restval``) decides the split and gives the captions; images are found by ``filepath``/``filename``,
falling back to the 2017 file of the same ``cocoid`` (2014 split file, 2017 images).

Concept phrases (MVPTR) per caption, aligned with ``captions``: ``--phrases rules|spacy|spacy:NAME_OR_PATH|auto``
extracts them from each kept caption (``data_recipes/_phrases.py``); any other ``--phrases PATTERN`` reads side files
``{image_id: [[concept tuple, ...] per caption]}``, ``{split}`` in the pattern a wildcard, all matching files merged.

    python -m data_recipes.coco --root RAW --out OUT [--karpathy RAW/dataset_coco.json] [--split train]
                                [--phrases rules]
"""

from __future__ import annotations

import glob
from collections import Counter, defaultdict
from pathlib import Path

from data_recipes import _common as C
from data_recipes import _phrases as P

SOURCE = "coco"
YEARS = ("2017", "2014")


def _image_candidates(root: Path, cocoid: int, first: Path | None = None) -> list[str]:
    c = [] if first is None else [str(first)]
    c += [str(root / f"{d}2017" / f"{cocoid:012d}.jpg") for d in ("train", "val")]
    c += [str(root / f"{d}2014" / f"COCO_{d}2014_{cocoid:012d}.jpg") for d in ("train", "val")]
    return list(dict.fromkeys(c))


def _load_objects(files: list[Path]) -> dict[int, dict]:
    """image_id -> {"boxes": xyxy, "labels": names} from COCO instances files (crowd regions left out)."""
    objects: dict[int, dict] = {}
    for path in files:
        data = C.load_json(path, "a COCO instances file")
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            for img in data["images"]:
                objects.setdefault(img["id"], {"boxes": [], "labels": []})
            for a in data["annotations"]:
                if a.get("iscrowd"):
                    continue
                x, y, w, h = a["bbox"]
                o = objects.setdefault(a["image_id"], {"boxes": [], "labels": []})
                o["boxes"].append([round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)])
                o["labels"].append(names[a["category_id"]])
        except (KeyError, TypeError, ValueError) as e:
            raise C.RecipeError(f"{path}: not a COCO instances file (missing or bad field {e})") from None
    return objects


def load_phrases(pattern: str | Path) -> dict[str, list]:
    """Merge phrase side files matching ``pattern`` (``{split}`` = wildcard) into ``{str(image_id): [...]}``."""
    pattern = str(pattern)
    files = sorted(glob.glob(pattern.replace("{split}", "*"))) if "{split}" in pattern else [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise C.RecipeError(f"expected phrase files matching {pattern} ({{split}} = any split), found none")
    merged: dict[str, list] = {}
    for f in files:
        data = C.load_json(Path(f), "a phrases file {image_id: [[phrase, ...] per caption]}")
        if not isinstance(data, dict):
            raise C.RecipeError(f"{f}: expected a JSON object {{image_id: [[phrase, ...] per caption]}}")
        merged.update({str(k): v for k, v in data.items()})
    return merged


def _concept(p) -> str | list[str]:
    """A phrase concept: a string, or a tuple of strings ((object), (object, attribute), (subject, relation,
    object) as SPICE/MVPTR and the shapes world write them), kept as a list."""
    return [str(x) for x in p] if isinstance(p, (list, tuple)) else str(p)


class _Attach:
    """Adds captions (dropping empties, keeping side-file phrases aligned), objects and phrases (from side files, or
    extracted from the kept captions) to one image's json."""

    def __init__(self, objects: dict | None, phrases: dict | None, extractor: P.PhraseExtractor | None = None):
        self.objects, self.phrases, self.extractor = objects, phrases, extractor
        self.stats: dict[str, Counter] = defaultdict(Counter)  # split -> phrases_missing / phrases_mismatch

    def json(self, image_id: int, split: str, captions: list, skipped: Counter) -> dict | None:
        phr = None
        if self.phrases is not None:
            phr = self.phrases.get(str(image_id))
            if phr is None:
                self.stats[split]["phrases_missing"] += 1
            elif (not isinstance(phr, list) or len(phr) != len(captions)
                  or not all(isinstance(ph, (list, tuple)) for ph in phr)):
                self.stats[split]["phrases_mismatch"] += 1
                phr = None
        if phr is None:
            (keep_caps,) = C.clean_captions(captions, skipped)
        else:
            keep_caps, keep_phr = C.clean_captions(captions, skipped, [[_concept(p) for p in ph] for ph in phr])
        if not keep_caps:
            skipped["no_caption"] += 1
            return None
        js = {"image_id": image_id, "source": SOURCE, "split": split, "captions": keep_caps}
        if phr is not None:
            js["phrases"] = keep_phr
        elif self.extractor is not None:
            P.attach_phrases(js, self.extractor)
        if self.objects is not None:
            js["objects"] = self.objects.get(image_id, {"boxes": [], "labels": []})
        return js


def _year_files(ann: Path, kind: str) -> dict[str, tuple[str, Path]]:
    """split -> (year, path) of ``annotations/<kind>_<split><year>.json``, 2017 preferred."""
    found = {}
    for split in ("train", "val"):
        for year in YEARS:
            p = ann / f"{kind}_{split}{year}.json"
            if p.exists():
                found[split] = (year, p)
                break
    return found


def _image_order(img) -> int:
    return img["id"] if isinstance(img, dict) and isinstance(img.get("id"), int) else -1


def _plan_official(root: Path, splits, attach: _Attach) -> dict[str, C.Plan]:
    ann = root / "annotations"
    caps_files = _year_files(ann, "captions")
    if not caps_files:
        raise C.RecipeError(f"expected COCO captions at {ann}/captions_train2017.json (or captions_val2017.json, or "
                            f"the 2014 files), found none")
    plans = {}
    for split in C.parse_splits(splits, list(caps_files), SOURCE):
        year, path = caps_files[split]
        img_dir = C.require(root / f"{split}{year}", f"the COCO {split}{year} images folder (for {path.name})")
        data = C.load_json(path, "a COCO captions file")
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise C.RecipeError(f"{path}: expected a COCO captions file with 'images' and 'annotations'")
        plan = C.Plan(meta={"captions_file": path.name, "karpathy": False})
        caps = defaultdict(list)
        for a in data["annotations"]:
            if not isinstance(a, dict) or "image_id" not in a:
                plan.skipped["malformed_record"] += 1
                continue
            caps[a["image_id"]].append(a.get("caption"))
        for img in sorted(data["images"], key=_image_order):
            if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not img.get("file_name"):
                plan.skipped["malformed_record"] += 1
                continue
            js = attach.json(img["id"], split, caps.get(img["id"], []), plan.skipped)
            if js is None:
                continue
            plan.add({"key": f"{SOURCE}-{C.key_safe(img['id'])}", "image": str(img_dir / img["file_name"]),
                      "json": js})
        plans[split] = plan
    return plans


def _plan_karpathy(root: Path, karpathy: Path, splits, keep_restval: bool, attach: _Attach) -> dict[str, C.Plan]:
    entries = C.load_karpathy(karpathy)
    order = ["train", "restval", "val", "test"] if keep_restval else ["train", "val", "test"]
    grouped: dict[str, list] = defaultdict(list)
    wanted = C.parse_splits(splits, order, SOURCE)
    bad = Counter()  # malformed entries, counted in their split if it can be told, else in the first one built
    for e in entries:
        split = e.get("split") if isinstance(e, dict) else None
        split = "train" if split == "restval" and not keep_restval else split
        if split not in order or not isinstance(e.get("cocoid"), int):
            bad[split if split in order else wanted[0] if wanted else None] += 1
            continue
        grouped[split].append(e)
    dirs = {e.get("filepath", "") for e in entries if isinstance(e, dict)} | {"train2017", "val2017"}
    if not any((root / d).is_dir() for d in dirs if d):
        raise C.RecipeError(f"expected COCO images under {root}/<filepath>/ (filepath from {karpathy.name}: "
                            f"{', '.join(sorted(d for d in dirs if d))}), found none of these folders")
    plans = {}
    for split in wanted:
        plan = C.Plan(meta={"karpathy": karpathy.name, "keep_restval": keep_restval})
        if bad[split]:
            plan.skipped["malformed_record"] += bad[split]
        for e in sorted(grouped.get(split, []), key=lambda e: e["cocoid"]):
            raw = C.karpathy_sentences(e)
            if raw is None:
                plan.skipped["malformed_record"] += 1
                continue
            js = attach.json(e["cocoid"], split, raw, plan.skipped)
            if js is None:
                continue
            first = root / e["filepath"] / e["filename"] if e.get("filepath") and e.get("filename") else None
            plan.add({"key": f"{SOURCE}-{C.key_safe(e['cocoid'])}", "json": js,
                      "image": _image_candidates(root, e["cocoid"], first)})
        plans[split] = plan
    return plans


def build(root, out, split=None, shard_size=1000, workers=1, progress=True, *, karpathy=None, keep_restval=False,
          phrases=None, objects=True) -> dict[str, dict]:
    """Build COCO shards; returns ``{split: index}``. See the module docstring for the raw layout."""
    root = Path(root)
    C.require(root, "the COCO root folder")
    ann = root / "annotations"
    objects_map = None
    if objects:
        inst = _year_files(ann, "instances")
        if inst:
            if karpathy is not None:  # one year only: 2014 and 2017 hold the same images
                year = "2017" if any(y == "2017" for y, _ in inst.values()) else "2014"
                files = [p for y, p in inst.values() if y == year]
            else:
                files = [p for _, p in inst.values()]
            objects_map = _load_objects(files)
    extractor = P.extractor_for(phrases, SOURCE, side_files=True)
    phrase_map = load_phrases(phrases) if phrases and extractor is None else None
    attach = _Attach(objects_map, phrase_map, extractor)
    if karpathy is not None:
        plans = _plan_karpathy(root, Path(karpathy), split, keep_restval, attach)
    else:
        plans = _plan_official(root, split, attach)
    for s, plan in plans.items():
        plan.meta.update(objects=objects_map is not None, phrases=phrase_map is not None)
        if phrase_map is not None:
            plan.meta["phrase_stats"] = dict(attach.stats[s])
        if extractor is not None:
            plan.meta.update(P.phrase_meta(extractor))
    return C.write_splits(out, SOURCE, plans, shard_size=shard_size, workers=workers, progress=progress, raw=root)


def main(argv: list[str] | None = None) -> int:
    p = C.parser("coco", __doc__, "COCO root (annotations/, train2017/, val2017/ or the 2014 folders)",
                 "split(s) to build, comma-separated: train,val (official) or train,val,test (Karpathy); default all")
    p.add_argument("--karpathy", type=Path, default=None, metavar="JSON",
                   help="Karpathy split file (dataset_coco.json): its splits decide where each image goes")
    p.add_argument("--keep-restval", action="store_true", help="with --karpathy: keep restval as its own split")
    P.add_phrase_args(p, side_files=True)
    p.add_argument("--no-objects", dest="objects", action="store_false",
                   help="do not attach objects from instances_*.json")
    return C.run_main(build, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())

