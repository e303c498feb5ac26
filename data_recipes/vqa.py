"""VQA v2 -> shards: one sample per COCO image holding all its questions, answers, answer labels and soft scores.

Raw layout (visualqa.org)::

    RAW/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    RAW/v2_mscoco_{train,val}2014_annotations.json
    RAW/{train,val}2014/COCO_{train,val}2014_%012d.jpg
    RAW/v2_OpenEnded_mscoco_test{,-dev}2015_questions.json + RAW/test2015/   (optional: splits test, test-dev)

The answer vocabulary is the ``--num-answers`` (3129) most frequent normalised ``multiple_choice_answer`` of the
questions that land in the train split (ties: alphabetical); it is written to ``OUT/answers.json`` (a list, index =
label) and recorded in every ``index.json``'s meta. Each question gets ``answers`` = [{answer, count}] over its ten
normalised human answers, and ``labels``/``scores`` = the vocabulary entries among them with their soft score:
``--score-rule min1`` min(1, count/3) (the VQA accuracy, as ALBEF/UNITER report it) or ``vilt`` 0.3/0.6/0.9/1.0
for 1/2/3/4+ matches (the bottom-up-attention targets used by ViLT and BridgeTower). Answers are normalised as the
official VQA evaluation does: punctuation, number words -> digits, articles, contractions, lower case.

``--karpathy dataset_coco.json`` re-splits the images by ``cocoid`` with the Karpathy split (train and restval ->
train, val, test), as ALBEF/TCL do for their VQA development split.

    python -m data_recipes.vqa --root RAW --out OUT [--num-answers 3129] [--score-rule min1|vilt]
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from data_recipes import _common as C
from vlp.utils.io import atomic_write_text

SOURCE = "vqa"
ANSWERS = "answers.json"

# -- answer normalisation (the official VQA evaluation's processPunctuation + processDigitArticle) ---------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern; removes '.' not followed by a digit
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# The official table maps each contraction written without (some of) its apostrophes to its proper form. It is
# generated here from the proper forms; forms whose apostrophe-less spelling is a word (we'll, it's, i'd...) are
# absent, as in the official table.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for proper in _CONTRACTED:
        quotes = [i for i, ch in enumerate(proper) if ch == "'"]
        for k in range(1, len(quotes) + 1):
            for drop in combinations(quotes, k):
                table["".join(ch for i, ch in enumerate(proper) if i not in drop)] = proper
    return table


_CONTRACTIONS = _contraction_table()


def normalize_answer(answer: str) -> str:
    """VQA answer normalisation (official evaluation + bottom-up preprocessing, which also drops ',')."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


SCORE_RULES = ("min1", "vilt")


def soft_score(count: int, rule: str = "min1") -> float:
    """Soft target of an answer given by ``count`` of the ten annotators."""
    if rule == "min1":
        return min(1.0, count / 3)
    if rule == "vilt":
        return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0
    raise ValueError(f"unknown score rule {rule!r}; expected one of {SCORE_RULES}")


def build_vocab(answers, num_answers: int = 3129) -> list[str]:
    """The ``num_answers`` most frequent normalised answers (ties broken alphabetically)."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers]]


def question_entry(q: dict, ann: dict | None, ans2label: dict[str, int], rule: str) -> dict:
    """The json of one question: its answers with counts, and the vocabulary labels/scores among them."""
    entry = {"question_id": q["question_id"], "question": q["question"].strip()}
    if ann is None:  # test splits: no answers
        entry.update(answers=[], labels=[], scores=[])
        return entry
    counts = Counter(normalize_answer(a["answer"]) for a in ann.get("answers", []) if isinstance(a, dict))
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    entry["answers"] = [{"answer": a, "count": c} for a, c in ranked]
    scored = [(ans2label[a], round(soft_score(c, rule), 4)) for a, c in ranked if a in ans2label]
    entry["labels"] = [lab for lab, _ in scored]
    entry["scores"] = [s for _, s in scored]
    for k in ("answer_type", "question_type", "multiple_choice_answer"):
        if k in ann:
            entry[k] = ann[k]
    return entry


# -- raw files --------------------------------------------------------------------------------------------------------
def _qfile(root: Path, sub: str) -> Path:
    return root / f"v2_OpenEnded_mscoco_{sub}_questions.json"


def _afile(root: Path, sub: str) -> Path:
    return root / f"v2_mscoco_{sub}_annotations.json"


def _load_questions(root: Path, sub: str, skipped: Counter) -> list[dict]:
    path = _qfile(root, sub)
    data = C.load_json(path, f"the VQA v2 {sub} questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise C.RecipeError(f"{path}: expected a VQA questions file with a 'questions' list")
    good = []
    for q in data["questions"]:
        if not (isinstance(q, dict) and isinstance(q.get("image_id"), int) and "question_id" in q):
            skipped["malformed_record"] += 1
        elif not isinstance(q.get("question"), str) or not q["question"].strip():
            skipped["empty_question"] += 1
        else:
            good.append(q)
    return good


def _load_annotations(root: Path, sub: str) -> dict:
    path = _afile(root, sub)
    data = C.load_json(path, f"the VQA v2 {sub} annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise C.RecipeError(f"{path}: expected a VQA annotations file with an 'annotations' list")
    return {a["question_id"]: a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a}


def _image_candidates(root: Path, sub: str, image_id: int) -> list[str]:
    folder = "test2015" if sub.startswith("test") else sub
    return [str(root / folder / f"COCO_{folder}_{image_id:012d}.jpg"), str(root / folder / f"{image_id:012d}.jpg")]


def build(root, out, split=None, shard_size=1000, workers=1, progress=True, *, num_answers=3129,
          score_rule="min1", karpathy=None) -> dict[str, dict]:
    """Build VQA v2 shards and ``out/answers.json``; returns ``{split: index}``."""
    root, out = Path(root), Path(out)
    if score_rule not in SCORE_RULES:
        raise C.RecipeError(f"score rule {score_rule!r}: expected one of {', '.join(SCORE_RULES)}")
    if num_answers < 1:
        raise C.RecipeError(f"--num-answers must be at least 1, got {num_answers}")
    C.require(_qfile(root, "train2014"), "the VQA v2 train questions (the answer vocabulary is built from train)")
    C.require(_afile(root, "train2014"), "the VQA v2 train annotations (the answer vocabulary is built from train)")

    # which raw subsets feed which output split
    if karpathy is not None:
        kmap = {e["cocoid"]: ("train" if e.get("split") == "restval" else e.get("split"))
                for e in C.load_karpathy(Path(karpathy)) if isinstance(e, dict) and "cocoid" in e}
        available = ["train", "val", "test"]
        subs = ["train2014", "val2014"]
    else:
        kmap = None
        available = [s for s, sub in (("train", "train2014"), ("val", "val2014"))
                     if _qfile(root, sub).exists() and _afile(root, sub).exists()]
        available += [s for s, sub in (("test", "test2015"), ("test-dev", "test-dev2015"))
                      if _qfile(root, sub).exists()]
        subs = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
    wanted = C.parse_splits(split, available, SOURCE)
    if kmap is None:
        needed = sorted({subs[s] for s in wanted} | {"train2014"})
    else:
        needed = subs
        C.require(_qfile(root, "val2014"), "the VQA v2 val questions (re-split with --karpathy)")

    sub_split = {"train2014": "train", "val2014": "val", "test2015": "test", "test-dev2015": "test-dev"}
    listing: dict[str, Counter] = defaultdict(Counter)  # split -> raw-file problems of the questions bound for it
    per_split: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # split -> image -> [(q, ann)]
    origin: dict[int, str] = {}
    for sub in needed:
        questions = _load_questions(root, sub, listing[sub_split[sub]])
        anns = None if sub.startswith("test") else _load_annotations(root, sub)
        for q in questions:
            ann = None
            if anns is not None:
                ann = anns.get(q["question_id"])
            s = sub_split[sub] if kmap is None else kmap.get(q["image_id"])
            if s not in sub_split.values():
                listing[sub_split[sub]]["not_in_karpathy"] += 1
                continue
            if anns is not None and ann is None:
                listing[s]["missing_annotation"] += 1
                continue
            per_split[s][q["image_id"]].append((q, ann))
            origin[q["image_id"]] = sub

    mca = [ann.get("multiple_choice_answer", "") for qs in per_split["train"].values() for _, ann in qs]
    vocab = build_vocab(mca, num_answers)
    ans2label = {a: i for i, a in enumerate(vocab)}
    answers_path = out / ANSWERS
    text = json.dumps(vocab, indent=0, ensure_ascii=False)
    if not answers_path.exists() or answers_path.read_text(encoding="utf-8") != text:
        atomic_write_text(answers_path, text)

    for sub in sorted({origin[i] for s in wanted for i in per_split[s]}):
        folder = "test2015" if sub.startswith("test") else sub
        C.require(root / folder, f"the COCO {folder} images folder (for the VQA {sub} questions)")

    plans = {}
    for s in wanted:
        plan = C.Plan(skipped=Counter(listing[s]), meta={
            "answers_file": f"../{ANSWERS}", "num_answers": len(vocab), "answers": vocab, "score_rule": score_rule,
            "vocab_questions": len(mca), "karpathy": Path(karpathy).name if karpathy else None})
        unlabeled = 0
        for image_id in sorted(per_split[s]):
            qs = [question_entry(q, ann, ans2label, score_rule)
                  for q, ann in sorted(per_split[s][image_id], key=lambda qa: qa[0]["question_id"])]
            unlabeled += sum(1 for q in qs if not q["labels"])
            plan.add({"key": f"{SOURCE}-{C.key_safe(image_id)}",
                      "image": _image_candidates(root, origin[image_id], image_id),
                      "json": {"image_id": image_id, "source": SOURCE, "split": s, "captions": [], "questions": qs}})
        plan.meta["questions"] = sum(len(r["json"]["questions"]) for r in plan.records)
        plan.meta["questions_without_label"] = unlabeled
        plans[s] = plan
    return C.write_splits(out, SOURCE, plans, shard_size=shard_size, workers=workers, progress=progress, raw=root)


def main(argv: list[str] | None = None) -> int:
    p = C.parser("vqa", __doc__, "VQA v2 root (question/annotation JSONs, train2014/, val2014/)",
                 "split(s) to build, comma-separated: train,val[,test,test-dev] or with --karpathy train,val,test")
    p.add_argument("--num-answers", type=int, default=3129, metavar="N", help="answer vocabulary size (3129)")
    p.add_argument("--score-rule", choices=SCORE_RULES, default="min1",
                   help="soft score of an answer given by k annotators: min1 = min(1, k/3); vilt = 0.3/0.6/0.9/1")
    p.add_argument("--karpathy", type=Path, default=None, metavar="JSON",
                   help="re-split the images by cocoid with this Karpathy file (dataset_coco.json)")
    return C.run_main(build, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
