"""Conceptual Captions (CC3M / CC12M) as downloaded by img2dataset -> shards (one sample per image).

Raw layout: the img2dataset output folder, tar shards ``RAW/00000.tar, ...`` (``--output_format webdataset``) or
numbered folders ``RAW/00000/000000001.jpg|.txt|.json`` (``--output_format files``); see ``_img2dataset.py``.
Failed downloads (json ``status`` != ``success``) are skipped and counted as ``download_failed``.
``--phrases rules|spacy|spacy:NAME_OR_PATH|auto`` adds MVPTR's concept phrases per caption, aligned with ``captions``
(``data_recipes/_phrases.py``).

    python -m data_recipes.cc --root RAW --out OUT [--split train] [--phrases rules]
"""

from __future__ import annotations

from data_recipes._img2dataset import build_img2dataset, main_for

SOURCE = "cc"


def build(root, out, split=None, shard_size=1000, workers=1, progress=True, *, phrases=None) -> dict[str, dict]:
    """Build CC shards into ``out/<split>`` (default ``train``); returns ``{split: index}``.
    ``phrases``: an extractor spec (see ``_phrases.py``)."""
    return build_img2dataset(SOURCE, root, out, split, shard_size, workers, progress, phrases=phrases)


def main(argv: list[str] | None = None) -> int:
    return main_for(SOURCE, __doc__, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
