"""The phrase vocabulary of MVPTR (``vlp.data.concepts``): which concept tuples of the training captions are tokens.

Reads the json ``phrases`` of every sample of the ``--shards`` split directories (the shapes world writes them; the
real-data recipes attach them with ``--phrases rules|spacy|...``), counts each tuple once per caption, keeps those
seen in at least ``--min-count`` sentences (paper: 50) and writes ``phrase_vocab.json`` (atomically) beside the
tokenizer the first directory's ``index.json`` names -- where a run looks for it (``data.phrase_vocab`` overrides).
A single-word concept whose word is one token of the tokenizer reuses that id; every other tuple gets a new row
after the tokenizer's ids. Run it again after changing the captions or the tokenizer.

    python -m data_recipes.phrase_vocab --shards data/shards/shapes/coco/train --min-count 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_recipes.phrase_vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, type=Path, nargs="+", metavar="DIR",
                   help="training split directories (index.json + shards) whose captions carry phrases")
    p.add_argument("--min-count", type=int, default=50, help="sentences a tuple must occur in (default: 50)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the one the first directory's index.json names)")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write (default: phrase_vocab.json in the tokenizer's directory)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from vlp.data.concepts import PHRASE_VOCAB_FILE, build_phrase_vocab
    from vlp.data.config import ShardsDataConfig, SourceConfig
    from vlp.data.datamodule import resolve_tokenizer
    from vlp.data.shards import ShardFormatError
    from vlp.data.tokenizer import load_tokenizer

    if args.min_count < 1:
        print("error: --min-count must be >= 1", file=sys.stderr)
        return 2
    try:
        tok_path = args.tokenizer or resolve_tokenizer(
            ShardsDataConfig(train=[SourceConfig(path=str(args.shards[0]))], regions=False))
        tokenizer = load_tokenizer(tok_path)
        vocab, captions, corrupt = build_phrase_vocab(args.shards, tokenizer, args.min_count,
                                                      progress=not args.no_progress)
    except (ValueError, OSError, ShardFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not captions:
        print(f"error: no caption in {', '.join(map(str, args.shards))} carries phrases (json 'phrases'); attach "
              "them with the recipe's --phrases option", file=sys.stderr)
        return 2
    out = args.out or Path(tok_path) / PHRASE_VOCAB_FILE
    vocab.save(out)
    reused = len(vocab) - vocab.size
    print(f"wrote {out}: {len(vocab)} phrases seen in >= {args.min_count} of {captions} captions "
          f"({vocab.size} new rows after the tokenizer's {vocab.word_vocab_size} ids, {reused} reuse a word's id)"
          + (f"; {corrupt} unreadable sample(s) skipped" if corrupt else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
