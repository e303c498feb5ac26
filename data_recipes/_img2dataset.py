"""The reader of img2dataset output, shared by the Conceptual Captions (``cc``) and SBU (``sbu``) recipes.

img2dataset (the standard downloader of these datasets) writes, per sample, ``<key>.jpg`` (or png/webp),
``<key>.txt`` (the caption) and ``<key>.json`` (``status``, ``url``, ``caption``, ``width``, ``height``, ``key``,
...), either into tar shards (``--output_format webdataset``)::

    RAW/00000.tar, RAW/00001.tar, ...

or into numbered folders (``--output_format files``)::

    RAW/00000/000000001.jpg|.txt|.json, ...

One output sample per downloaded image, ``image_id`` = the img2dataset key. A sample whose json ``status`` is not
``success`` (or that has a json but no image) counts as ``download_failed``; img2dataset itself leaves failed
downloads out of the shards and counts them in ``<shard>_stats.json``, whose counters are summed into the index's
``meta.img2dataset_stats``. Images inside input tars are not
copied at listing time: a record points at the byte range of the member, which the shard writer reads.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

from data_recipes import _common as C
from data_recipes import _phrases as P

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


def _record(source: str, split: str, key: str, parts: dict, plan: C.Plan) -> None:
    """Turn one img2dataset sample (``parts``: ext -> bytes or image ref) into a record, or count why not."""
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            plan.skipped["malformed_json"] += 1
            return
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if meta.get("status", "success") != "success" or (image is None and meta):
        plan.skipped["download_failed"] += 1
        return
    if image is None:
        plan.skipped["missing_image"] += 1
        return
    caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get("caption")
    (caps,) = C.clean_captions([caption], plan.skipped)
    if not caps:
        return  # counted as empty_caption (one caption per image)
    js = {"image_id": key, "source": source, "split": split, "captions": caps}
    if meta.get("url"):
        js["url"] = meta["url"]
    plan.add({"key": f"{source}-{C.key_safe(key)}", "image": image, "json": js})


def _from_tars(tars: list[Path], source: str, split: str, plan: C.Plan) -> None:
    for tar_path in tars:
        groups: dict[str, dict] = defaultdict(dict)
        try:
            with tarfile.open(tar_path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if ext in IMAGE_EXTS:
                        groups[key][ext] = {"file": str(tar_path), "offset": m.offset_data, "size": m.size}
                    elif ext in ("txt", "json"):
                        groups[key][ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError):
            plan.skipped["corrupt_input_tar"] += 1  # the samples read before the damage are kept
        for key, parts in groups.items():
            _record(source, split, key, parts, plan)


def _from_files(folders: list[Path], source: str, split: str, plan: C.Plan) -> None:
    for folder in folders:
        groups: dict[str, dict] = defaultdict(dict)
        for f in sorted(folder.iterdir()):
            key, ext = _split_name(f.name)
            if ext in IMAGE_EXTS:
                groups[key][ext] = str(f)
            elif ext in ("txt", "json"):
                groups[key][ext] = f.read_bytes()
        for key in sorted(groups):
            _record(source, split, key, groups[key], plan)


def build_img2dataset(source: str, root, out, split=None, shard_size=1000, workers=1, progress=True, phrases=None):
    """``phrases``: an extractor spec (``_phrases.py``); each caption's concept tuples go into the json."""
    root = Path(root)
    extractor = P.extractor_for(phrases, source)
    C.require(root, f"the img2dataset output folder of {source}")
    split = split or "train"
    if "," in split:
        raise C.RecipeError(f"{source}: one split per run (the folder given by --root), got {split!r}")
    tars = sorted(p for p in root.glob("*.tar") if p.is_file())
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    plan = C.Plan()
    if tars:
        plan.meta["input_format"] = "webdataset"
        _from_tars(tars, source, split, plan)
    elif folders:
        plan.meta["input_format"] = "files"
        _from_files(folders, source, split, plan)
    else:
        raise C.RecipeError(f"expected img2dataset output in {root}: tar shards {root}/00000.tar, ... "
                            f"(output_format webdataset) or folders {root}/00000/ (output_format files); found neither")
    stats = _download_stats(root)
    if stats:
        plan.meta["img2dataset_stats"] = stats
    if extractor is not None:
        plan.meta.update(P.phrase_meta(extractor))
        for rec in plan.records:
            P.attach_phrases(rec["json"], extractor)
    return C.write_splits(out, source, {split: plan}, shard_size=shard_size, workers=workers, progress=progress,
                          raw=root)


STAT_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _download_stats(root: Path) -> dict[str, int]:
    """The download counters of img2dataset's ``<shard>_stats.json`` files, summed. (img2dataset keeps failed
    downloads out of the shards altogether, so these are where they show; the recipe's own ``download_failed``
    counts only failures it meets in the shards.)"""
    total = dict.fromkeys(STAT_KEYS, 0)
    found = False
    for f in sorted(root.glob("*_stats.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            found = True
            for k in STAT_KEYS:
                if isinstance(d.get(k), int):
                    total[k] += d[k]
    return total if found else {}


def main_for(source: str, doc: str, build, argv: list[str] | None) -> int:
    p = C.parser(source, doc, f"img2dataset output folder of {source} (00000.tar, ... or 00000/, ...)",
                 "the output split name (default train)")
    P.add_phrase_args(p)
    return C.run_main(build, p, argv)
