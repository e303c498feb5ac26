"""NLVR2 -> shards: one sample per example (a sentence about a pair of images, True/False).

Raw layout (github.com/lil-lab/nlvr, nlvr2/data, and the images as distributed)::

    RAW/train.json, RAW/dev.json, RAW/test1.json    one JSON object per line: identifier ("train-10171-0-0"),
                                                    sentence, label ("True"/"False"), left_url, right_url, ...
    RAW/images/train/<directory>/train-10171-0-img0.png, ...-img1.png
    RAW/dev/dev-850-0-img0.png, RAW/test1/...       (or RAW/images/dev/, RAW/images/test1/)

An example's images are ``<identifier without its last part>-img0.png`` / ``-img1.png``; they are found by name
anywhere under ``RAW/images/<split>/`` or ``RAW/<split>/``. Sample fields: ``img0.png``, ``img1.png`` (the
original bytes; some NLVR2 "png" files are JPEGs, which every PIL-based decoder reads all the same) and ``json``
with ``identifier``, ``sentence``, ``label`` (bool), ``captions`` = [sentence], ``width``/``height`` (one per image).

    python -m data_recipes.nlvr2 --root RAW --out OUT [--split train,dev,test1]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_recipes import _common as C

SOURCE = "nlvr2"
SPLITS = ("train", "dev", "test1")
_LABELS = {"true": True, "false": False}


def _image_index(dirs: list[Path]) -> dict[str, str]:
    """File name -> path of every image under ``dirs`` (the first found wins)."""
    index: dict[str, str] = {}
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for f in sorted(filenames):
                index.setdefault(f, os.path.join(dirpath, f))
    return index


def _parse(line: str) -> tuple[str, str, bool] | None:
    try:
        ex = json.loads(line)
        ident, sentence, label = ex["identifier"], ex.get("sentence"), ex["label"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(ident, str) or ident.count("-") < 2:
        return None
    label = _LABELS.get(str(label).strip().lower())
    if label is None:
        return None
    return ident, sentence, label


def build(root, out, split=None, shard_size=1000, workers=1, progress=True) -> dict[str, dict]:
    """Build NLVR2 shards; returns ``{split: index}``."""
    root = Path(root)
    C.require(root, "the NLVR2 root folder")
    available = [s for s in SPLITS if (root / f"{s}.json").exists()]
    if not available:
        raise C.RecipeError(f"expected NLVR2 data files {root}/train.json, {root}/dev.json or {root}/test1.json, "
                            f"found none")
    wanted = C.parse_splits(split, available, SOURCE)
    plans = {}
    for s in wanted:
        dirs = [d for d in (root / "images" / s, root / s) if d.is_dir()]
        if not dirs:
            raise C.RecipeError(f"expected the NLVR2 {s} images in {root / 'images' / s}/ or {root / s}/, "
                                f"found neither folder")
        images = _image_index(dirs)
        plan = C.Plan()
        with open(root / f"{s}.json", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                parsed = _parse(line)
                if parsed is None:
                    plan.skipped["malformed_line"] += 1
                    continue
                ident, sentence, label = parsed
                (caps,) = C.clean_captions([sentence], plan.skipped)
                if not caps:
                    continue
                prefix = ident.rsplit("-", 1)[0]
                refs = {f"img{j}.png": images.get(f"{prefix}-img{j}.png", str(dirs[0] / f"{prefix}-img{j}.png"))
                        for j in (0, 1)}
                plan.add({"key": f"{SOURCE}-{C.key_safe(ident)}", "images": refs,
                          "json": {"image_id": ident, "identifier": ident, "source": SOURCE, "split": s,
                                   "sentence": caps[0], "captions": caps, "label": label}})
        plans[s] = plan
    return C.write_splits(out, SOURCE, plans, shard_size=shard_size, workers=workers, progress=progress, raw=root)


def main(argv: list[str] | None = None) -> int:
    p = C.parser("nlvr2", __doc__, "NLVR2 root (train.json, dev.json, test1.json, images/)",
                 "split(s) to build, comma-separated: train,dev,test1; default all present")
    return C.run_main(build, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
