"""VQA questions: which questions a sample uses (per visit of its image), their checks, and their batch rows.

A VQA sample is an image with its questions; the batch has one row per (image, question) and keeps images (or
regions) once per image, with ``question_image`` mapping a row to its image (batch keys in ``vlp.data.collate``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vlp.data.stream import CorruptSample, stable_hash

__all__ = ["question_index", "pick_questions", "parse_question", "QuestionRows"]


def question_index(seed: int, key: str, n: int, visit: int) -> int:
    """Which of an image's ``n`` questions its ``visit``-th visit uses: visits ``r*n .. r*n + n-1`` walk through a
    permutation seeded by (seed, key, r), so every ``n`` consecutive visits use every question exactly once."""
    rnd, pos = divmod(visit, n)
    return int(np.random.default_rng(stable_hash(seed, "questions", key, rnd)).permutation(n)[pos])


def pick_questions(info, key: str, meta: dict, *, seed: int, num_answers: int, all_questions: bool) -> list[dict]:
    """The checked questions a visit uses: one (training; :func:`question_index` with visit ``epoch x passes +
    cycle``, ``passes`` = the stream's passes over the source per epoch) or all of them (evaluation)."""
    questions = info.get("questions") if isinstance(info, dict) else None
    if not questions or not isinstance(questions, list):
        raise CorruptSample(f"sample {key}: json field 'questions' must be a non-empty list (a VQA shard?)")
    if all_questions:
        picked = questions
    else:
        epoch, cycle = int(meta.get("epoch", 0)), int(meta.get("cycle", 0))
        visit = epoch * max(1, int(meta.get("passes", 1))) + cycle
        picked = [questions[question_index(seed, key, len(questions), visit)]]
    return [parse_question(key, q, num_answers) for q in picked]


def parse_question(key: str, q, num_answers: int) -> dict:
    """A checked question: int id, text, answer labels in ``[0, num_answers)`` with their soft scores."""
    if not isinstance(q, dict) or not isinstance(q.get("question"), str):
        raise CorruptSample(f"sample {key}: every entry of 'questions' needs a 'question' string")
    labels, scores = q.get("labels") or [], q.get("scores") or []
    if len(labels) != len(scores):
        raise CorruptSample(f"sample {key}, question {q.get('question_id')}: {len(labels)} labels but "
                            f"{len(scores)} scores")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < num_answers for x in labels):
        raise CorruptSample(f"sample {key}, question {q.get('question_id')}: labels {labels} outside the answer "
                            f"vocabulary [0, {num_answers}); shards and answers.json disagree?")
    qid = q.get("question_id")
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise CorruptSample(f"sample {key}: question_id {qid!r} is not an integer")
    return {"question_id": qid, "question": q["question"].strip(), "labels": list(labels),
            "scores": [float(x) for x in scores], "answered": bool(q.get("answers") or labels)}


class QuestionRows:
    """Samples with ``questions`` -> the question rows of a VQA batch: ``input_ids``, ``attention_mask``
    (tokenised by ``tokenize``, a ``TextTokenizer``, without caption pre-processing), ``vqa_targets`` [Q, A] (soft
    scores at the labels), ``question_image``, ``question_ids``, ``vqa_answered``, ``questions``."""

    def __init__(self, tokenize, num_answers: int):
        if num_answers < 1:
            raise ValueError("VQA batches need num_answers >= 1 (the answer vocabulary's size)")
        self.tokenize, self.num_answers = tokenize, num_answers

    def targets(self, questions: Sequence[dict]) -> torch.Tensor:
        out = torch.zeros(len(questions), self.num_answers)
        for r, q in enumerate(questions):
            if q["labels"]:
                out[r, torch.tensor(q["labels"], dtype=torch.long)] = torch.tensor(q["scores"])
        return out

    def __call__(self, samples: Sequence[dict]) -> dict:
        rows = [(i, q) for i, s in enumerate(samples) for q in s["questions"]]
        questions = [q for _, q in rows]
        text = self.tokenize.questions([q["question"] for q in questions])
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "vqa_targets": self.targets(questions),
                "question_image": torch.tensor([i for i, _ in rows], dtype=torch.long),
                "question_ids": torch.tensor([q["question_id"] for q in questions], dtype=torch.long),
                "vqa_answered": torch.tensor([q["answered"] for q in questions], dtype=torch.bool),
                "questions": [q["question"] for q in questions]}
