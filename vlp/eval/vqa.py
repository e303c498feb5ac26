"""VQA evaluation: the VQA score over an answer vocabulary, and the official per-question accuracy rule.

* :func:`vqa_score` / :class:`VQAScore`: classification-style VQA (BridgeTower, UNITER, ViLT): the prediction is the
  argmax answer and it earns that answer's soft target score (the VQA accuracy of that answer against the ten human
  answers, as stored in the soft targets). Reported in percent.
* :func:`vqa_accuracy`: the string-level rule of the official VQA evaluation (``vqaEval.py``): the mean over the ten
  leave-one-out subsets of the human answers of ``min(1, #matches / 3)``, after the official answer normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = ["VQAScore", "normalize_answer", "vqa_accuracy", "vqa_score"]


def _check(logits: torch.Tensor, target_scores: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape != target_scores.shape:
        raise ValueError(f"logits and target_scores must both be [N, A]; got {tuple(logits.shape)} and "
                         f"{tuple(target_scores.shape)}")


def _batch_score_sum(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    _check(logits, target_scores)
    pred = logits.argmax(dim=1, keepdim=True)
    return target_scores.gather(1, pred).double().sum()


@torch.no_grad()
def vqa_score(logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    """VQA score in percent: mean over questions of ``target_scores[n, argmax(logits[n])]``. NaN for N = 0."""
    if logits.shape[0] == 0:
        _check(logits, target_scores)
        return float("nan")
    return 100.0 * _batch_score_sum(logits, target_scores).item() / logits.shape[0]


class VQAScore(Metric):
    """Accumulating, distributed-reducible :func:`vqa_score` (percent): states ``score_sum`` and ``count``, both
    summed across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target_scores: torch.Tensor) -> None:
        self.score_sum += _batch_score_sum(logits.detach(), target_scores.detach()).to(self.score_sum.device)
        self.count += logits.shape[0]

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"))
        return (100.0 * self.score_sum / self.count).float()


# --------------------------------------------------------------------------------- official string-level rule ---
# Normalisation of the official VQA evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
# punctuation removal, number words to digits, articles dropped, apostrophe-less contractions restored.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # official periodStrip: its look-behind is a no-op
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    """Every spelling with some apostrophes dropped -> the canonical contraction ("dont" -> "don't",
    "couldnt've" -> "couldn't've"). Spellings that are ordinary words once the apostrophes go ("its", "well",
    "were", "shell", "id", "wed", "lets" ...) are left alone."""
    table: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        parts = canon.split("'")
        n = len(parts) - 1
        for mask in range(2**n - 1):  # every subset of apostrophes kept, except all of them
            s = parts[0]
            for a in range(n):
                s += ("'" if mask >> a & 1 else "") + parts[a + 1]
            table.setdefault(s, canon)
    for word in ("its", "lets", "well", "were", "wed", "id", "ill", "shell", "hell"):
        table.pop(word, None)
    return table


_CONTRACTIONS = _contraction_table()


def _process_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official answer normalisation: whitespace, punctuation, ``two -> 2``, articles, ``dont -> don't``."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(pred_answer: str, gt_answers: Sequence[str], *, normalize: bool = True) -> float:
    """Official VQA accuracy of one prediction, in [0, 1] (multiply by 100 for the percent the VQA server shows).

    ``mean_{i} min(1, #{j != i : gt_j == pred} / 3)`` over the leave-one-out subsets of the (usually ten) human
    answers: with 10 answers, 1/2/3/>=4 matches give 0.3/0.6/0.9/1.0.

    With ``normalize`` both sides go through :func:`normalize_answer`. The official script skips the normalisation
    when all human answers agree (they are pre-normalised in VQAv2); normalising always only differs for an
    un-normalised prediction, which it then counts correctly.
    """
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a list of answers, not a single string")
    gts = list(gt_answers)
    if not gts:
        raise ValueError("gt_answers is empty")
    if normalize:
        pred_answer = normalize_answer(pred_answer)
        gts = [normalize_answer(g) for g in gts]
    matches = sum(g == pred_answer for g in gts)
    # Leaving out a matching answer leaves matches - 1 matches; leaving out another one leaves all of them.
    total = matches * min(1.0, (matches - 1) / 3) + (len(gts) - matches) * min(1.0, matches / 3)
    return total / len(gts)
