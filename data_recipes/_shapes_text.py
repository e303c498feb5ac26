"""Text for the shapes world: vocabulary, captions with their concept phrases, and VQA questions.

Everything here is a pure function of a scene graph and a ``random.Random``; no image or file handling (that lives in
``data_recipes.shapes``). A scene object is a dict with ``shape``, ``colour``, ``size`` and ``loc`` (a location phrase
such as ``"on the left"``, or ``None`` when the centre lies too close to a third's boundary to say). ``rels`` maps an
ordered pair of object indices ``(i, j)`` to the relations that hold from ``i`` to ``j``, horizontal first
(``"left of"``/``"right of"``, then ``"above"``/``"below"``). Within a scene every (colour, shape) pair is unique, so
"the red circle" always names exactly one object.

Grammar (the tests parse it back, so keep it regular):
- noun phrase: ``(a|an|the) [small|large] [colour] shape`` (plural ``shapes``/``circles``/``crosses`` in counts);
- relation: ``NP [is] [to the] REL [and REL] NP`` where REL is ``left of|right of|above|below`` and the subject is the
  noun phrase right before the relation words, the object the one right after;
- location: ``NP LOC`` with LOC one of ``LOCATIONS``.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black"]
SIZES = ["small", "large"]
HORIZONTAL = ["left of", "right of"]
VERTICAL = ["above", "below"]
RELATIONS = HORIZONTAL + VERTICAL
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ["zero", "one", "two", "three", "four"]
# (row, column) of the image's 3x3 grid -> phrase
LOCATIONS = {
    ("top", "left"): "in the top left corner", ("top", "centre"): "at the top",
    ("top", "right"): "in the top right corner", ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left corner", ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right corner",
}

Obj = dict
Rels = dict  # (i, j) -> list[str]
Phrases = list  # list of tuples-as-lists


# -- noun phrases ------------------------------------------------------------------------------------------------------
def article(next_word: str, definite: bool = False) -> str:
    if definite:
        return "the"
    return "an" if next_word[0] in "aeiou" else "a"


def noun_phrase(o: Obj, size: bool, colour: bool = True, definite: bool = False) -> str:
    words = ([o["size"]] if size else []) + ([o["colour"]] if colour else []) + [o["shape"]]
    return f"{article(words[0], definite)} {' '.join(words)}"


def object_tuples(o: Obj, size: bool, colour: bool = True) -> Phrases:
    out = [[o["shape"]]]
    if colour:
        out.append([o["shape"], o["colour"]])
    if size:
        out.append([o["shape"], o["size"]])
    return out


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def relation_words(rels: list[str], long_form: bool) -> str:
    """``["left of", "above"]`` -> ``"left of and above"`` (or ``"to the left of and above"``)."""
    words = [f"to the {r}" if long_form and r in HORIZONTAL else r for r in rels]
    return " and ".join(words)


def _dedup(tuples: Phrases) -> Phrases:
    seen, out = set(), []
    for t in tuples:
        if tuple(t) not in seen:
            seen.add(tuple(t))
            out.append(t)
    return out


# -- the first caption: the whole scene, unique within a split ---------------------------------------------------------
def scene_order(objects: list[Obj]) -> list[int]:
    """Objects left to right (ties top to bottom): the order the first caption names them in."""
    return sorted(range(len(objects)), key=lambda i: (objects[i]["cx"], objects[i]["cy"]))


def full_caption(objects: list[Obj], rels: Rels) -> tuple[str, Phrases]:
    """Every object with size, colour and shape, chained left to right by the relations between neighbours.

    ``a large red circle left of and above a small blue square above a small green triangle``: each relation links the
    noun phrases on either side. One object: its location instead (``a large red circle on the left``).
    """
    order = scene_order(objects)
    first = objects[order[0]]
    parts = [noun_phrase(first, size=True)]
    tuples = object_tuples(first, size=True)
    if len(order) == 1:
        assert first["loc"] is not None, "a lone object must have a sayable location"
        parts.append(first["loc"])
    for a, b in zip(order, order[1:]):
        rel = rels[(a, b)]
        assert rel, "neighbours must be related (objects never overlap)"
        parts.append(relation_words(rel, long_form=False))
        parts.append(noun_phrase(objects[b], size=True))
        tuples += object_tuples(objects[b], size=True)
        tuples += [[objects[a]["shape"], r, objects[b]["shape"]] for r in rel]
    return " ".join(parts), _dedup(tuples)


# -- the other captions ------------------------------------------------------------------------------------------------
Template = Callable[[random.Random, list[Obj], Rels], Optional[tuple[str, Phrases]]]


def _shuffled(rng: random.Random, objects: list[Obj]) -> list[Obj]:
    objs = list(objects)
    rng.shuffle(objs)
    return objs


def t_list_colour(rng, objects, rels):
    objs = _shuffled(rng, objects)
    text = join_list([noun_phrase(o, size=False) for o in objs])
    return text, _dedup(sum((object_tuples(o, size=False) for o in objs), []))


def t_list_full(rng, objects, rels):
    objs = _shuffled(rng, objects)
    lead = rng.choice(["", "a picture of ", "an image of "]) if len(objs) > 1 else rng.choice(["", "a picture of "])
    text = lead + join_list([noun_phrase(o, size=True) for o in objs])
    return text, _dedup(sum((object_tuples(o, size=True) for o in objs), []))


def t_count(rng, objects, rels):
    objs = _shuffled(rng, objects)
    n = len(objs)
    head = "there is one shape" if n == 1 else f"there are {NUMBERS[n]} shapes"
    text = head + ": " + join_list([noun_phrase(o, size=False) for o in objs])
    return text, _dedup(sum((object_tuples(o, size=False) for o in objs), []))


def t_sizes(rng, objects, rels):
    objs = _shuffled(rng, objects)
    if len(objs) == 1:
        text = f"one {objs[0]['size']} {objs[0]['shape']}"
    else:
        text = join_list([noun_phrase(o, size=True, colour=False) for o in objs])
    return text, _dedup(sum((object_tuples(o, size=True, colour=False) for o in objs), []))


def t_shape_counts(rng, objects, rels):
    counts: dict[str, int] = {}
    for o in _shuffled(rng, objects):
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    items = [f"{NUMBERS[c]} {PLURALS[s] if c > 1 else s}" for s, c in counts.items()]
    return join_list(items), [[s] for s in counts]


def t_one_object(rng, objects, rels):
    o = rng.choice(objects)
    lead = rng.choice(["a picture of", "an image of", "a picture with", "an image with"])
    return f"{lead} {noun_phrase(o, size=True)}", object_tuples(o, size=True)


def t_location(rng, objects, rels):
    located = [o for o in objects if o["loc"] is not None]
    if not located:
        return None
    o = rng.choice(located)
    size = rng.random() < 0.5
    if rng.random() < 0.5:
        text = f"{noun_phrase(o, size=size)} {o['loc']}"
    else:
        text = f"there is {noun_phrase(o, size=size)} {o['loc']}"
    return text, object_tuples(o, size=size)


def t_relation(rng, objects, rels):
    pairs = [p for p, r in rels.items() if r]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    rel = rels[(a, b)]
    if len(rel) == 2 and rng.random() < 0.6:
        rel = [rng.choice(rel)]
    size = rng.random() < 0.35
    long_form = rng.random() < 0.5
    style = rng.randrange(3)
    subj = noun_phrase(objects[a], size=size, definite=style == 1)
    obj = noun_phrase(objects[b], size=size, definite=style == 1)
    words = relation_words(rel, long_form)
    if style == 0:
        text = f"{subj} {words} {obj}"
    elif style == 1:
        text = f"{subj} is {words} {obj}"
    else:
        text = f"there is {subj} {words} {obj}"
    tuples = object_tuples(objects[a], size) + object_tuples(objects[b], size)
    tuples += [[objects[a]["shape"], r, objects[b]["shape"]] for r in rel]
    return text, _dedup(tuples)


ALL_OBJECT_TEMPLATES: list[Template] = [t_list_colour, t_list_full, t_count, t_sizes, t_shape_counts]
TEMPLATES: list[Template] = ALL_OBJECT_TEMPLATES + [t_one_object, t_location, t_relation]


def captions(rng: random.Random, objects: list[Obj], rels: Rels, n: int = 5) -> tuple[list[str], list[Phrases]]:
    """``n`` different captions and their phrases: the full scene first, then (for several objects) one naming all
    objects and one relation, then random others."""
    first = full_caption(objects, rels)
    texts, phrases = [first[0]], [first[1]]
    # a template says the same thing in another word order at most once: (template, its concepts) must be new too
    keys = {("full", tuple(map(tuple, first[1])))}

    def add(template: Template) -> bool:
        result = template(rng, objects, rels)
        if result is None or result[0] in texts:
            return False
        key = (template.__name__, tuple(sorted(map(tuple, result[1]))))
        if key in keys:
            return False
        keys.add(key)
        texts.append(result[0])
        phrases.append(result[1])
        return True

    if len(objects) > 1:
        for pool in (ALL_OBJECT_TEMPLATES, [t_relation]):
            for _ in range(8):
                if add(rng.choice(pool)):
                    break
    for _ in range(60):
        if len(texts) >= n:
            break
        add(rng.choice(TEMPLATES))
    # fallbacks: each template in turn, retried with fresh randomness
    for _ in range(5):
        for template in TEMPLATES:
            if len(texts) >= n:
                break
            add(template)
    if len(texts) < n:
        raise RuntimeError(f"could not phrase {n} different captions for {objects}")
    return texts[:n], phrases[:n]


# -- VQA ---------------------------------------------------------------------------------------------------------------
def _qa(question: str, answer: str, question_type: str, answer_type: str) -> dict:
    return {"question": question, "answer": answer, "question_type": question_type, "answer_type": answer_type}


def _unique_by(objects: list[Obj], keys: tuple[str, ...]) -> list[Obj]:
    out = []
    for o in objects:
        if sum(all(p[k] == o[k] for k in keys) for p in objects) == 1:
            out.append(o)
    return out


def questions(rng: random.Random, objects: list[Obj], rels: Rels) -> list[dict]:
    """One question per type where the scene allows it: colour, shape, count, existence, relation (2+ objects).

    Questions only name objects the scene identifies uniquely, and relation questions only ask about an axis on which
    the pair is clearly related, so every answer is certain. Yes and no are equally likely.
    """
    out = []
    # colour of an object named by its shape (or size and shape)
    for keys in (("shape",), ("size", "shape")):
        cands = _unique_by(objects, keys)
        if cands:
            o = rng.choice(cands)
            name = " ".join(o[k] for k in keys)
            out.append(_qa(f"what color is the {name}?", o["colour"], "what color is the", "other"))
            break
    # shape of an object named by its colour (or size and colour)
    for keys in (("colour",), ("size", "colour")):
        cands = _unique_by(objects, keys)
        if cands:
            o = rng.choice(cands)
            name = " ".join(o[k] for k in keys)
            out.append(_qa(f"what shape is the {name} object?", o["shape"], "what", "other"))
            break
    # counts
    kind = rng.randrange(4)
    if kind == 0:
        out.append(_qa("how many shapes are there?", str(len(objects)), "how many", "number"))
    elif kind == 1:
        shape = rng.choice([o["shape"] for o in objects]) if rng.random() < 0.7 else rng.choice(SHAPES)
        n = sum(o["shape"] == shape for o in objects)
        out.append(_qa(f"how many {PLURALS[shape]} are there?", str(n), "how many", "number"))
    elif kind == 2:
        colour = rng.choice([o["colour"] for o in objects]) if rng.random() < 0.7 else rng.choice(COLOURS)
        n = sum(o["colour"] == colour for o in objects)
        out.append(_qa(f"how many {colour} shapes are there?", str(n), "how many", "number"))
    else:
        size = rng.choice(SIZES)
        n = sum(o["size"] == size for o in objects)
        out.append(_qa(f"how many {size} shapes are there?", str(n), "how many", "number"))
    # existence: half the time an object that is there, else a near miss (a present shape or colour, recombined)
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        o = rng.choice(objects)
        if rng.random() < 0.5:
            options = [(c, o["shape"]) for c in COLOURS if (c, o["shape"]) not in present]
        else:
            options = [(o["colour"], s) for s in SHAPES if (o["colour"], s) not in present]
        colour, shape = rng.choice(options)
    answer = "yes" if (colour, shape) in present else "no"
    out.append(_qa(f"is there {article(colour)} {colour} {shape}?", answer, "is there a", "yes/no"))
    # relation: a relation that holds, or its inverse
    pairs = [p for p, r in sorted(rels.items()) if r]
    if pairs:
        a, b = rng.choice(pairs)
        rel = rng.choice(rels[(a, b)])
        asked = rel if rng.random() < 0.5 else INVERSE[rel]
        sa = f"{objects[a]['colour']} {objects[a]['shape']}"
        sb = f"{objects[b]['colour']} {objects[b]['shape']}"
        out.append(_qa(f"is the {sa} {asked} the {sb}?", "yes" if asked == rel else "no", "is the", "yes/no"))
    return out


def vocabulary() -> list[str]:
    """Every word the captions and questions can use (for the tests and the tokenizer's sanity checks)."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLOURS) | set(SIZES) | set(NUMBERS)
    for phrase in RELATIONS + list(LOCATIONS.values()):
        words |= set(phrase.split())
    words |= set("a an the is are there and to of picture image with shape shapes".split())
    words |= set("what color object how many yes no".split())
    return sorted(words)
