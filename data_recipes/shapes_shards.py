"""The shapes world (``data_recipes.shapes``) -> shards and a tokenizer, through the real COCO, VG and VQA recipes.

    python -m data_recipes.shapes --out DIR             # the raw world (COCO / VG / VQA v2 formats)
    python -m data_recipes.shapes_shards --root DIR --out OUT

writes ``OUT/coco/{train,val,test}/`` (Karpathy splits of ``DIR/coco/dataset_coco.json``, with the phrases of
``DIR/phrases_{split}.json`` and the objects), ``OUT/vg/train/``, ``OUT/vqa/{train,val,test}/`` (+
``OUT/vqa/answers.json``; val2014 re-split into val/test by the same Karpathy file) and ``OUT/tokenizer/``: a small
WordPiece trained on the train captions (COCO and VG) and the train VQA questions and answers. Every ``index.json``
names the tokenizer relative to its own directory (``../../tokenizer``). A re-run does no work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

from data_recipes import _common as C
from data_recipes import coco, vg, vqa
from vlp.utils.io import atomic_write_text

TOKENIZER = "tokenizer"
STAMP = "vlp_texts.json"  # what the tokenizer was trained on; unchanged -> not retrained


def _jsons(split_dir: Path):
    """The json dicts of a split's samples, in shard order."""
    from vlp.data.shards import shard_paths

    for path in shard_paths(split_dir):
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    yield json.loads(tar.extractfile(m).read())


def train_texts(out: Path) -> list[str]:
    """Train captions (COCO, VG) and train VQA questions and answers, as they landed in the shards."""
    texts = []
    for source in ("coco", "vg"):
        for js in _jsons(out / source / "train"):
            texts += js["captions"]
    for js in _jsons(out / "vqa" / "train"):
        for q in js["questions"]:
            texts.append(q["question"])
            texts += [a["answer"] for a in q["answers"]]
    return texts


def train_tokenizer(out: Path, vocab_size: int) -> Path:
    """Train the WordPiece into ``out/tokenizer`` unless it already exists for exactly these texts and size."""
    from vlp.data.tokenizer import train_wordpiece

    texts = train_texts(out)
    h = hashlib.sha1("\n".join(texts).encode()).hexdigest()
    stamp = {"texts_sha1": h, "num_texts": len(texts), "vocab_size": vocab_size}
    tok_dir = out / TOKENIZER
    try:
        if json.loads((tok_dir / STAMP).read_text()) == stamp and (tok_dir / "tokenizer.json").exists():
            return tok_dir
    except (OSError, json.JSONDecodeError):
        pass
    train_wordpiece(texts, tok_dir, vocab_size=vocab_size)
    atomic_write_text(tok_dir / STAMP, json.dumps(stamp, sort_keys=True))
    print(f"tokenizer: WordPiece trained on {len(texts)} train texts -> {tok_dir}")
    return tok_dir


def build_shapes(raw_dir, out_dir, workers: int = 1, *, shard_size: int = 1000, vocab_size: int = 400,
                 progress: bool = True) -> dict[str, dict]:
    """Run coco, vg and vqa over the shapes world ``raw_dir`` and train the tokenizer; returns
    ``{"coco": {split: index}, "vg": {...}, "vqa": {...}}`` (indices as finally written, tokenizer included)."""
    raw, out = Path(raw_dir), Path(out_dir)
    for sub in ("coco", "vg", "vqa"):
        C.require(raw / sub, f"the shapes world's {sub}/ folder (python -m data_recipes.shapes --out {raw})")
    karpathy = C.require(raw / "coco" / "dataset_coco.json", "the shapes world's Karpathy split file")
    kw = dict(shard_size=shard_size, workers=workers, progress=progress)
    built = {
        "coco": coco.build(raw / "coco", out / "coco", karpathy=karpathy, phrases=str(raw / "phrases_{split}.json"),
                           **kw),
        "vg": vg.build(raw / "vg", out / "vg", exclude_coco=karpathy, **kw),
        "vqa": vqa.build(raw / "vqa", out / "vqa", karpathy=karpathy, **kw),
    }
    train_tokenizer(out, vocab_size)
    rel = str(Path("..") / ".." / TOKENIZER)  # from OUT/<source>/<split>/
    return {source: {split: C.set_index_tokenizer(out / source / split, rel) for split in indices}
            for source, indices in built.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_recipes.shapes_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="the shapes world (data_recipes.shapes)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument("--workers", type=C.positive_int, default=1, metavar="K", help="processes writing shards (1)")
    p.add_argument("--shard-size", type=C.positive_int, default=1000, metavar="N", help="samples per shard (1000)")
    p.add_argument("--vocab-size", type=C.positive_int, default=400, metavar="V", help="WordPiece vocabulary (400)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    C.add_force_arg(p)
    args = p.parse_args(argv)
    return C.call_reporting(p, build_shapes, args.root, args.out, args.workers, shard_size=args.shard_size,
                            vocab_size=args.vocab_size, progress=not args.no_progress, force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
