"""Flickr30k (Karpathy splits) -> shards: one sample per image with its five captions.

Raw layout (the Karpathy split file and the images as distributed)::

    RAW/dataset_flickr30k.json          {"images": [{"filename": "1000092795.jpg", "split": "train|val|test",
                                                      "sentences": [{"raw": ...}, ...]}, ...]}
    RAW/flickr30k-images/1000092795.jpg

``image_id`` is the file name without its extension (``flickr30k-1000092795``). ``--phrases rules|spacy|
spacy:NAME_OR_PATH|auto`` adds MVPTR's concept phrases per caption, aligned with ``captions``
(``data_recipes/_phrases.py``).

    python -m data_recipes.flickr30k --root RAW --out OUT [--split train,val,test] [--phrases rules]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from data_recipes import _common as C
from data_recipes import _phrases as P

SOURCE = "flickr30k"
SPLITS = ("train", "val", "test")


def build(root, out, split=None, shard_size=1000, workers=1, progress=True, *, karpathy=None,
          phrases=None) -> dict[str, dict]:
    """Build Flickr30k shards; returns ``{split: index}``. ``phrases``: an extractor spec (see ``_phrases.py``)."""
    root = Path(root)
    extractor = P.extractor_for(phrases, SOURCE)
    kfile = Path(karpathy) if karpathy else root / "dataset_flickr30k.json"
    entries = C.load_karpathy(kfile)
    img_dir = C.require(root / "flickr30k-images", "the Flickr30k images folder")
    wanted = C.parse_splits(split, SPLITS, SOURCE)
    grouped, bad = defaultdict(list), Counter()  # malformed: in their split if it can be told, else the first
    for e in entries:
        s = e.get("split") if isinstance(e, dict) else None
        if s not in SPLITS or not isinstance(e.get("filename"), str):
            bad[s if s in SPLITS else wanted[0]] += 1
            continue
        grouped[s].append(e)
    plans = {}
    for s in wanted:
        plan = C.Plan(meta={"karpathy": kfile.name})
        if extractor is not None:
            plan.meta.update(P.phrase_meta(extractor))
        if bad[s]:
            plan.skipped["malformed_record"] += bad[s]
        for e in grouped[s]:
            raw = C.karpathy_sentences(e)
            if raw is None:
                plan.skipped["malformed_record"] += 1
                continue
            (caps,) = C.clean_captions(raw, plan.skipped)
            if not caps:
                plan.skipped["no_caption"] += 1
                continue
            image_id = Path(e["filename"]).stem
            js = {"image_id": image_id, "source": SOURCE, "split": s, "captions": caps}
            if extractor is not None:
                P.attach_phrases(js, extractor)
            plan.add({"key": f"{SOURCE}-{C.key_safe(image_id)}", "image": str(img_dir / e["filename"]), "json": js})
        plans[s] = plan
    return C.write_splits(out, SOURCE, plans, shard_size=shard_size, workers=workers, progress=progress, raw=root)


def main(argv: list[str] | None = None) -> int:
    p = C.parser("flickr30k", __doc__, "Flickr30k root (dataset_flickr30k.json, flickr30k-images/)",
                 "split(s) to build, comma-separated: train,val,test; default all")
    p.add_argument("--karpathy", type=Path, default=None, metavar="JSON",
                   help="Karpathy split file (default RAW/dataset_flickr30k.json)")
    P.add_phrase_args(p)
    return C.run_main(build, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
