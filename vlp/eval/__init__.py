"""Evaluation: retrieval ranking (contrastive top-k, matching re-rank) and R@K, VQA score, ``results.json``.

Names load lazily, so ``from vlp.eval import recall_at_k`` does not pay for importing torchmetrics.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "retrieval": ("ScorePairs", "recall_at_k", "retrieval_ranks", "retrieval_scores"),
    "vqa": ("VQAScore", "normalize_answer", "vqa_accuracy", "vqa_score"),
    "results": ("RESULTS_FILE", "format_retrieval_table", "print_retrieval_table", "read_results",
                "results_path", "write_results"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vlp.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
