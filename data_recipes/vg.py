"""Visual Genome -> shards: region descriptions become the captions (with their boxes), objects become ``objects``.

Raw layout (visualgenome.org, v1.2/v1.4)::

    RAW/image_data.json               [{"image_id": 1, "url": ".../VG_100K_2/1.jpg", "width", "height", "coco_id"}]
    RAW/region_descriptions.json      [{"id": 1, "regions": [{"phrase", "x", "y", "width", "height"}, ...]}, ...]
    RAW/objects.json                  (optional) [{"image_id": 1, "objects": [{"x","y","w","h","names": [...]}]}]
    RAW/VG_100K/<id>.jpg, RAW/VG_100K_2/<id>.jpg

json: ``captions`` (one per region), ``region_boxes`` (xyxy pixels, aligned with captions), ``objects``. Boxes are
given in ``image_data.json``'s size; if an image file has another size they are rescaled to it. Everything goes to
one split (``train``). ``--exclude-coco dataset_coco.json`` drops VG images whose ``coco_id`` is in the Karpathy
val/test splits (as ALBEF does), counted as ``coco_eval_overlap``. ``--phrases rules|spacy|spacy:NAME_OR_PATH|auto``
adds MVPTR's concept phrases per region description, aligned with ``captions`` (``data_recipes/_phrases.py``).

    python -m data_recipes.vg --root RAW --out OUT [--exclude-coco RAW_COCO/dataset_coco.json] [--phrases rules]
"""

from __future__ import annotations

from pathlib import Path

from data_recipes import _common as C
from data_recipes import _phrases as P

SOURCE = "vg"
FOLDERS = ("VG_100K", "VG_100K_2")


def _box(d: dict, w: str, h: str) -> list[float]:
    x, y = float(d["x"]), float(d["y"])
    return [round(x, 2), round(y, 2), round(x + float(d[w]), 2), round(y + float(d[h]), 2)]


def _objects(path: Path) -> dict[int, dict]:
    data = C.load_json(path, "Visual Genome objects.json")
    if not isinstance(data, list):
        raise C.RecipeError(f"{path}: expected a JSON list of {{'image_id', 'objects'}}")
    out = {}
    for entry in data:
        try:
            image_id = entry.get("image_id", entry.get("id"))
            boxes, labels = [], []
            for o in entry["objects"]:
                names = o.get("names") or ([o["name"]] if o.get("name") else [])
                if not names or not str(names[0]).strip():
                    continue
                boxes.append(_box(o, "w", "h"))
                labels.append(str(names[0]).strip())
            out[image_id] = {"boxes": boxes, "labels": labels}
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # a bad objects entry only loses that image's objects
    return out


def _eval_coco_ids(path: Path) -> set[int]:
    return {e["cocoid"] for e in C.load_karpathy(path)
            if isinstance(e, dict) and e.get("split") in ("val", "test") and "cocoid" in e}


def build(root, out, split=None, shard_size=1000, workers=1, progress=True, *, exclude_coco=None,
          objects=True, phrases=None) -> dict[str, dict]:
    """Build Visual Genome shards into ``out/<split>`` (default ``train``); returns ``{split: index}``.
    ``phrases``: an extractor spec (see ``_phrases.py``)."""
    root = Path(root)
    extractor = P.extractor_for(phrases, SOURCE)
    split = split or "train"
    if "," in split:
        raise C.RecipeError(f"vg: one split only (all images go to it), got {split!r}")
    images = C.load_json(root / "image_data.json", "Visual Genome image_data.json")
    regions = C.load_json(root / "region_descriptions.json", "Visual Genome region_descriptions.json")
    if not isinstance(images, list) or not isinstance(regions, list):
        raise C.RecipeError(f"{root}: image_data.json and region_descriptions.json must be JSON lists")
    if not any((root / f).is_dir() for f in FOLDERS):
        raise C.RecipeError(f"expected the Visual Genome images in {root / FOLDERS[0]}/ or {root / FOLDERS[1]}/, "
                            f"found neither folder")
    obj_path = root / "objects.json"
    obj = _objects(obj_path) if objects and obj_path.exists() else None
    excluded = _eval_coco_ids(Path(exclude_coco)) if exclude_coco else set()

    plan = C.Plan(meta={"objects": obj is not None, "exclude_coco": Path(exclude_coco).name if exclude_coco else None})
    if extractor is not None:
        plan.meta.update(P.phrase_meta(extractor))
    by_id = {}
    for r in regions:
        if isinstance(r, dict) and isinstance(r.get("regions"), list):
            rid = r.get("id", r.get("image_id"))
            if rid is None and r["regions"]:
                rid = r["regions"][0].get("image_id")
            by_id[rid] = r["regions"]
        else:
            plan.skipped["malformed_record"] += 1
    for img in images:
        image_id = img.get("image_id", img.get("id")) if isinstance(img, dict) else None
        if image_id is None:
            plan.skipped["malformed_record"] += 1
            continue
        if img.get("coco_id") is not None and img["coco_id"] in excluded:
            plan.skipped["coco_eval_overlap"] += 1
            continue
        caps, boxes = [], []
        for reg in by_id.get(image_id, []):
            try:
                box = _box(reg, "width", "height")
            except (KeyError, TypeError, ValueError):
                plan.skipped["malformed_record"] += 1
                continue
            caps.append(reg.get("phrase"))
            boxes.append(box)
        caps, boxes = C.clean_captions(caps, plan.skipped, boxes)
        if not caps:
            plan.skipped["no_caption"] += 1
            continue
        name = f"{image_id}.jpg"
        cands = []
        url = img.get("url") or ""
        if url:
            cands.append(str(root / Path(url).parent.name / Path(url).name))
        cands += [str(root / f / name) for f in FOLDERS]
        js = {"image_id": image_id, "source": SOURCE, "split": split, "captions": caps, "region_boxes": boxes}
        if img.get("coco_id") is not None:
            js["coco_id"] = img["coco_id"]
        if obj is not None:
            js["objects"] = obj.get(image_id, {"boxes": [], "labels": []})
        if extractor is not None:
            P.attach_phrases(js, extractor)
        rec = {"key": f"{SOURCE}-{C.key_safe(image_id)}", "image": list(dict.fromkeys(cands)), "json": js}
        if img.get("width") and img.get("height"):
            rec["ann_size"] = [int(img["width"]), int(img["height"])]
        plan.add(rec)
    return C.write_splits(out, SOURCE, {split: plan}, shard_size=shard_size, workers=workers, progress=progress,
                          raw=root)


def main(argv: list[str] | None = None) -> int:
    p = C.parser("vg", __doc__, "Visual Genome root (image_data.json, region_descriptions.json, VG_100K*/)",
                 "the output split name (default train; VG has no official splits)")
    p.add_argument("--exclude-coco", type=Path, default=None, metavar="KARPATHY_JSON",
                   help="drop images whose coco_id is in this Karpathy file's val/test splits")
    p.add_argument("--no-objects", dest="objects", action="store_false", help="do not attach objects.json")
    P.add_phrase_args(p)
    return C.run_main(build, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
