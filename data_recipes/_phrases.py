"""Concept phrases of a caption, the way MVPTR reads them: ``(object,)``, ``(object, attribute)`` and
``(subject, relation, object)`` tuples, e.g. ``("kitchen",)``, ``("umbrella", "flowered")``,
``("kitchen", "fill with", "appliance")``.

MVPTR's released code takes these tuples from the SPICE scene-graph parser (Java, CoreNLP). The recipes here take them
from a ``PhraseExtractor`` instead, so that real captions (COCO, Flickr30k, CC, SBU, VG) carry ``phrases`` exactly as
the shapes world writes them: per caption a list of tuples (JSON lists of lower-cased strings), aligned with
``captions``. Two extractors:

* ``RuleExtractor``: no dependencies; closed word lists and a left-to-right walk over noun phrases, good enough for
  short COCO-style captions ("a man riding a brown horse on a beach").
* ``SpacyExtractor``: an installed spaCy pipeline's dependency parse (closer to what SPICE does, and it copes with
  longer web captions); spaCy is not a dependency of vlp and is imported only when asked for.

Both return tuples de-duplicated and ordered by where they are complete in the caption: a tuple sits at the position of
its last word; at one position objects come before attributes before relations, then by the positions of the other
words. The same order from both extractors keeps their outputs comparable tuple by tuple.

Where we differ from SPICE: no synonym merging (WordNet) and no coreference; attributes are the words as written
("flowered"), objects and verbs are lemmas ("appliances" -> "appliance", "filled with" -> "fill with"); a noun modifying
another noun ("steel appliances") is an attribute of the head, except the two-word names of COCO categories
("teddy bear", "fire hydrant"), which stay one object.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

from data_recipes._common import RecipeError

Concept = tuple[str, ...]
SPECS = "rules, spacy, spacy:NAME_OR_PATH or auto"
DEFAULT_SPACY = "en_core_web_sm"

# two-word nouns kept as one object (COCO's category names, and two rooms/foods as common in captions)
COMPOUND_NOUNS = frozenset({
    "fire hydrant", "stop sign", "parking meter", "teddy bear", "hot dog", "cell phone", "tennis racket",
    "baseball bat", "baseball glove", "traffic light", "wine glass", "dining table", "hair drier", "sports ball",
    "living room", "ice cream"})


class PhraseExtractor:
    """Turns one caption into its concept tuples; ``name`` is what the shard index records as the extractor."""

    name = "base"

    def extract(self, caption: str) -> list[Concept]:
        """The caption's tuples: lower-cased, de-duplicated, ordered as in the module docstring."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _ordered(found: Iterable[tuple[tuple[int, ...], Concept]]) -> list[Concept]:
    """``(positions of its words, tuple)`` pairs -> the tuples, each once, in the order of the module docstring."""
    ranked = sorted(found, key=lambda f: (max(f[0]), len(f[1]), f[0]))
    return list(dict.fromkeys(c for _, c in ranked))


# =====================================================================================================================
# rules: closed word lists, noun-phrase chunks, a left-to-right walk
# =====================================================================================================================
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words("a an the this that these those some each every another any no its their his her my your our "
                     "all both several many few other")
PRONOUNS = _words("it he she they them him we you i me us there who whom which what someone something somebody "
                  "everyone everything anyone anything itself himself herself themselves")
AUXILIARIES = _words("is are was were be been being am do does did can could will would may might must should")
CONJUNCTIONS = _words("and or but nor plus")
CLAUSE_BREAKS = _words("while where when whilst as because so then")  # a new clause: the subject is found again
PREPOSITIONS = _words("on in at with of near by under over above below behind beside besides between among amongst "
                      "inside outside into onto upon across along alongside through around from to toward towards "
                      "against beneath underneath atop past for like off up down out about after before during "
                      "without within beyond via")
MULTIWORD_PREPOSITIONS = ("in front of", "on top of", "next to", "close to", "out of", "in between")
ADVERBS = _words("very really quite too also just nearby together here not only almost partially still away "
                 "outdoors indoors close closeup close-up")  # "close to" is a preposition, matched first
NUMBERS = _words("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty "
                 "dozen hundred")
ADJECTIVES = _words(
    # colour
    "red blue green yellow orange purple pink brown black white gray grey silver gold golden tan beige dark light "
    "bright colorful colourful multicolored multicoloured pale "
    # size and shape
    "large big small little tiny huge giant tall short long wide narrow thin thick fat round square "
    # material
    "wooden metallic plastic stainless ceramic leather "
    # state and others common in captions
    "old young new empty full open closed clean dirty wet dry fresh hot cold warm sunny cloudy snowy grassy sandy "
    "rocky busy crowded cute pretty beautiful happy striped spotted various different double single fried sliced "
    "cooked baked stuffed frosted electric modern antique vintage many"
)
# -ing / -ed words that are nouns (the suffix rules below would make them verbs after a noun)
SUFFIX_NOUNS = _words("building ceiling clothing painting wedding string ring king wing thing evening morning "
                      "frosting topping icing filling stuffing dressing railing awning siding lighting bedding "
                      "seating parking living dining pudding sibling duckling dumpling sapling ping "
                      "bed bread shed sled seed weed speed flowerbed hundred")

# lemma: its inflected forms (the verbs of COCO captions; other -ing/-ed verbs are guessed by _guess_lemma)
_VERB_TABLE = """
sit: sits sitting sat seated | stand: stands standing stood | hold: holds holding held | ride: rides riding rode
ridden | walk: walks walking walked | eat: eats eating ate eaten | play: plays playing played | lie: lies lying
| lay: lays laying laid | look: looks looking looked | fly: flies flying flew flown | fill: fills filling filled
| park: parks parked | cover: covers covering covered | top: topped | carry: carries carrying carried
| wear: wears wearing wore worn | watch: watching watched | use: using used | take: takes taking took taken
| talk: talks talking talked | run: runs running ran | throw: throws throwing threw thrown | hit: hitting
| wait: waits waiting waited | drive: drives driving drove driven | cross: crosses crossing crossed
| graze: grazes grazing grazed | pull: pulls pulling pulled | lean: leans leaning leaned | hang: hangs hanging
hung | rest: resting rested | drink: drinks drinking drank | cut: cutting | read: reads reading | pose: poses
posing posed | make: makes making made | load: loaded loading | stack: stacked stacking | display: displayed
| show: shows showing shown showed | sleep: sleeps sleeping slept | kick: kicks kicking kicked | catch: catches
catching caught | jump: jumps jumping jumped | swim: swims swimming swam | chase: chases chasing chased
| feed: feeding fed | prepare: preparing prepared | serve: served serving | place: placed | face: facing faces
| line: lined | surround: surrounded surrounding | decorate: decorated | dress: dressed | pile: piled
| contain: contains containing | have: has have having had | go: goes going went | come: comes coming came
| head: heading | move: moving moved | fill: filling | wash: washing | perch: perched | mount: mounted
| attach: attached | float: floating | sail: sailing | skateboard: skateboarding | ski: skiing | surf: surfing
| snowboard: snowboarding | brush: brushing | cook: cooking cooked | try: trying tries tried | get: gets getting
got | give: gives giving gave | set: sets setting | point: pointing | climb: climbing | grab: grabbing
| push: pushing | pet: petting | hug: hugging | smile: smiling | gather: gathered | stop: stopped stopping
"""
VERBS: dict[str, str] = {form: lemma.strip() for entry in _VERB_TABLE.split("|")
                         for lemma, forms in [entry.split(":")] for form in forms.split()}

# plural -> singular where the suffix rules would be wrong; INVARIANT nouns end in -s but are not plurals
IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "teeth": "tooth", "feet": "foot",
                     "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
                     "loaves": "loaf", "wolves": "wolf", "halves": "half", "scarves": "scarf", "calves": "calf",
                     "tomatoes": "tomato", "potatoes": "potato", "mangoes": "mango", "cookies": "cookie",
                     "movies": "movie", "pies": "pie", "ties": "tie", "brownies": "brownie", "veggies": "veggie",
                     "selfies": "selfie", "smoothies": "smoothie"}
INVARIANT = _words("bus glass grass dress tennis gas canvas christmas pants jeans shorts scissors clothes news "
                   "series species sheep fish deer lens bias chassis")

_VOWELS = frozenset("aeiou")
_TOKEN = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[,.;:!?]")


def singular(noun: str) -> str:
    """A plural noun's singular by suffix rules: "dogs" -> "dog", "buses" -> "bus", "boxes" -> "box",
    "berries" -> "berry"; words that only end in -s ("glass", "bus", "tennis") are left alone."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if len(noun) <= 3 or noun in INVARIANT or not noun.endswith("s") or noun.endswith(("ss", "us", "ous", "is")):
        return noun
    if noun.endswith("ies"):
        return noun[:-3] + "y"
    if noun.endswith(("sses", "uses", "xes", "ches", "shes", "zzes")):
        return noun[:-2]
    return noun[:-1]


def _guess_lemma(word: str) -> str:
    """The base of an -ing/-ed verb not in ``VERBS``, only where the spelling tells it: "kicking" -> "kick",
    "running" -> "run", "cleaning" -> "clean", "moving" -> "move". Where it does not ("riding": "rid" or "ride"?)
    the word is kept as written: a readable concept beats a wrong lemma."""
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            stem = word[: -len(suffix)]
            break
    else:
        return word
    if suffix == "ed" and stem.endswith("i"):
        return stem[:-1] + "y"  # carried -> carry
    last, before = stem[-1], stem[-2]
    if last == before and last not in _VOWELS and last not in "lsz":
        return stem[:-1]  # running -> run (but rolling, passing keep theirs)
    if last == "v":
        return stem + "e"  # no English word ends in v: moving -> move
    if last in _VOWELS:
        return stem if suffix == "ing" else word  # skiing -> ski
    if last in "wxy" and before in _VOWELS:
        return stem  # throwing -> throw, fixing -> fix, playing -> play
    if before not in _VOWELS:
        return stem  # a consonant cluster: kicking -> kick, trying -> try
    if len(stem) >= 3 and stem[-3] in _VOWELS:
        return stem  # two vowels: cleaning -> clean, looking -> look
    return word


@dataclass
class _Word:
    text: str  # lower-cased, as written ("appliances", "next to")
    tag: str  # DET PRON AUX CONJ BREAK COMMA STOP PREP ADV NUM ADJ NOUN VERB
    lemma: str
    i: int  # position in the caption's word list: what the output order is made of
    possessive: bool = False  # "man's": ends its noun phrase


@dataclass
class _Chunk:
    """A noun phrase: its head noun and the words before it that modify it (adjectives, numbers, nouns)."""

    head: _Word
    mods: list[_Word] = field(default_factory=list)


def _tokens(caption: str) -> list[str]:
    """Lower-cased words and punctuation; multiword prepositions and COMPOUND_NOUNS joined into one token."""
    raw = _TOKEN.findall(caption.lower().replace("\u2019", "'"))
    out, k = [], 0
    while k < len(raw):
        for prep in MULTIWORD_PREPOSITIONS:
            n = prep.count(" ") + 1
            if " ".join(raw[k:k + n]) == prep:
                out.append(prep)
                k += n
                break
        else:
            pair = f"{raw[k]} {singular(raw[k + 1])}" if k + 1 < len(raw) else ""
            if pair in COMPOUND_NOUNS:
                out.append(pair)
                k += 2
            else:
                out.append(raw[k])
                k += 1
    return out


def _lexical_tag(word: str) -> tuple[str, str] | None:
    """(tag, lemma) from the word lists alone; None where the neighbours decide (verbs, unknown -ing/-ed words)."""
    if word in COMPOUND_NOUNS:
        return "NOUN", word
    if word == ",":
        return "COMMA", word
    if word in (".", ";", ":", "!", "?"):
        return "STOP", word
    for tag, words in (("DET", DETERMINERS), ("PRON", PRONOUNS), ("AUX", AUXILIARIES), ("CONJ", CONJUNCTIONS),
                       ("BREAK", CLAUSE_BREAKS), ("ADV", ADVERBS)):
        if word in words:
            return tag, word
    if word in PREPOSITIONS or word in MULTIWORD_PREPOSITIONS:
        return "PREP", word
    if word in NUMBERS or word.isdigit():
        return "NUM", word
    if word in ADJECTIVES or ("-" in word and word.endswith("ed")):  # multi-colored, long-haired
        return "ADJ", word
    if word in SUFFIX_NOUNS:
        return "NOUN", singular(word)
    if word in VERBS or word.endswith(("ing", "ed")):
        return None
    return "NOUN", singular(word)


def _tag(tokens: list[str]) -> list[_Word]:
    """Tags from the word lists, then the verbs by their left neighbour: after a determiner, adjective or number
    a verb form is a noun or modifier ("a parking lot", "a flowered umbrella"); an unknown -ing/-ed word is a verb
    only after a noun, pronoun or auxiliary ("a dog chasing", "is covered")."""
    words: list[_Word] = []
    for i, tok in enumerate(tokens):
        possessive = tok.endswith("'s") and len(tok) > 2
        text = tok[:-2] if possessive else tok
        tagged = _lexical_tag(text)
        if tagged is None:
            prev = words[-1].tag if words else None
            if prev in ("DET", "ADJ", "NUM"):
                tagged = ("ADJ", text) if text.endswith("ed") else ("NOUN", singular(text))
            elif text in VERBS:
                tagged = ("VERB", VERBS[text])
            elif prev in ("NOUN", "PRON", "AUX"):
                tagged = ("VERB", _guess_lemma(text))
            else:
                tagged = ("ADJ", text) if text.endswith("ed") else ("NOUN", singular(text))
        tag, lemma = tagged
        words.append(_Word(text, tag, lemma, i, possessive and tag == "NOUN"))  # "that's": just "that"
    return words


_IN_CHUNK = frozenset({"DET", "NUM", "ADJ", "NOUN", "ADV"})


def _chunk_at(words: list[_Word], k: int) -> tuple[_Chunk | None, list[_Word], int]:
    """The noun phrase starting at ``words[k]``: ``(chunk, [], next k)``; without a noun, ``(None, adjectives, next k)``
    (a predicate, "is red and white") or ``(None, [], k)`` (not a phrase). "a red and white bus" is one phrase; the
    head is its last noun, nouns before it are modifiers; a determiner after a noun starts the next phrase."""
    body, j = [], k
    while j < len(words):
        w = words[j]
        if w.tag == "DET" and any(b.tag == "NOUN" for b in body):
            break
        if w.tag in _IN_CHUNK:
            body.append(w)
            j += 1
            if w.possessive:
                break
        elif w.tag in ("CONJ", "COMMA") and body and body[-1].tag == "ADJ" and j + 1 < len(words) \
                and words[j + 1].tag == "ADJ":
            j += 1  # "red and white"
        else:
            break
    nouns = [b for b in body if b.tag == "NOUN"]
    if nouns:
        head = nouns[-1]
    elif body and body[0].tag == "DET" and body[-1].tag == "ADJ":
        head = body[-1]  # "an orange": a colour word as the noun
        head = _Word(head.text, "NOUN", singular(head.text), head.i)
    else:
        adjectives = [b for b in body if b.tag == "ADJ"]
        return None, adjectives, (j if adjectives else k)
    mods = [b for b in body if b.i < head.i and b.tag in ("ADJ", "NUM", "NOUN")]
    return _Chunk(head, mods), [], head.i + 1


@dataclass
class _Relation:
    """A relation being read: its words so far ("sit", "sit on"), the phrases it starts from, where it starts."""

    words: list[str]
    source: list[_Chunk]
    i: int


class _Walk:
    """The left-to-right reading of one caption's chunks and words; ``found`` collects (positions, tuple).

    The clause subject is the first noun phrase (grown by "and": "a man and a woman"). A verb relates the subject to
    what follows ("a man riding a horse"); a preposition relates the subject too ("a woman holding an umbrella in the
    rain": the woman is in the rain), except "of", which binds the nearest phrase ("a plate of food"). A phrase joined
    by "and" or "," gets the same relation as the phrase before it ("with broccoli and rice")."""

    def __init__(self):
        self.found: list[tuple[tuple[int, ...], Concept]] = []
        self.subject: list[_Chunk] | None = None
        self.last: list[_Chunk] = []  # the latest group of coordinated phrases
        self.last_rel: _Relation | None = None  # the relation that led to `last`
        self.pending: _Relation | None = None
        self.coordinating = self.after_aux = False

    def mention(self, chunk: _Chunk) -> None:
        """A phrase's own tuples: its object and attributes."""
        head = chunk.head
        self.found.append(((head.i,), (head.lemma,)))
        self.found += [((head.i, m.i), (head.lemma, m.text)) for m in chunk.mods]

    def phrase(self, chunk: _Chunk) -> None:
        """A phrase's tuples and its part in the clause: subject, object of a pending relation, or joined to the
        phrase before it. A possessor ("a man's hand holding a phone") takes no part: the possessed noun does."""
        self.mention(chunk)
        if chunk.head.possessive:
            return
        if self.coordinating and self.last:
            self.last.append(chunk)  # when `last` is the subject list, the subject grows with it
            if self.last_rel is not None:
                self._link(self.last_rel, [chunk])
        elif self.pending is not None:
            self._link(self.pending, [chunk])
            self.last_rel, self.last, self.pending = self.pending, [chunk], None
        else:
            self.last, self.last_rel = [chunk], None
            if self.subject is None:
                self.subject = self.last
        self.coordinating = self.after_aux = False

    def predicate(self, adjectives: list[_Word]) -> None:
        """ "the bus is red and white" -> (bus, red), (bus, white)."""
        if self.after_aux and self.subject:
            self.found += [((s.head.i, a.i), (s.head.lemma, a.text)) for s in self.subject for a in adjectives]
        self.coordinating = False

    def word(self, w: _Word) -> None:
        if w.tag in ("CONJ", "COMMA"):
            self.coordinating = bool(self.last) and self.pending is None
            return
        self.coordinating = False
        if w.tag in ("STOP", "BREAK"):
            self._new_clause()
        elif w.tag == "VERB":
            self.pending = _Relation([w.lemma], list(self.subject or []), w.i)
        elif w.tag == "PREP":
            if self.pending is not None:
                self.pending.words.append(w.lemma)  # "sit" + "on"
            else:
                source = self.last if w.lemma == "of" else (self.subject or self.last)
                self.pending = _Relation([w.lemma], list(source), w.i)
        elif w.tag == "AUX":
            self.after_aux = True
        elif w.tag in ("PRON", "DET"):
            self.pending = None  # "next to it", "next to each other": no noun to relate to

    def _new_clause(self) -> None:
        """After "." or "while": the next clause has its own subject."""
        found = self.found
        self.__init__()
        self.found = found

    def _link(self, rel: _Relation, objects: list[_Chunk]) -> None:
        name = " ".join(rel.words)
        for s in rel.source:
            for o in objects:
                if s is not o:
                    self.found.append(((s.head.i, rel.i, o.head.i), (s.head.lemma, name, o.head.lemma)))


class RuleExtractor(PhraseExtractor):
    """Concept tuples from word lists and word order alone: no model, no dependencies, deterministic.

    Good enough for COCO-style captions ("two dogs sitting on a red couch" -> (dog,), (dog, two), (couch,),
    (couch, red), (dog, sit on, couch)); long, clause-heavy web captions are better served by ``SpacyExtractor``."""

    name = "rules"

    def extract(self, caption: str) -> list[Concept]:
        words = _tag(_tokens(caption))
        walk, k = _Walk(), 0
        while k < len(words):
            chunk, adjectives, nxt = _chunk_at(words, k)
            if chunk is not None:
                walk.phrase(chunk)
            elif adjectives:
                walk.predicate(adjectives)
            else:
                walk.word(words[k])
                nxt = k + 1
            k = nxt
        return _ordered(walk.found)


# =====================================================================================================================
# spaCy: the dependency parse -> tuples (written against token.text/lemma_/pos_/dep_/head/children/i only)
# =====================================================================================================================
NOUN_POS = frozenset({"NOUN", "PROPN"})  # not PRON: "it", "who" are no concepts
MODIFIER_DEPS = frozenset({"amod", "compound", "nummod"})
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})
PREP_DEPS = frozenset({"prep", "agent"})
INHERIT_SUBJECT_DEPS = frozenset({"conj", "xcomp", "advcl"})  # "sitting and eating": eating's subject is sitting's


def _is_noun(t: Any) -> bool:
    return t.pos_ in NOUN_POS


def _children(t: Any, deps: frozenset[str] | set[str]) -> list[Any]:
    return [c for c in t.children if c.dep_ in deps]


def _with_conjuncts(t: Any) -> list[Any]:
    """``t`` and the nouns joined to it by "and" ("broccoli and rice")."""
    out = [t]
    for c in _children(t, {"conj"}):
        if _is_noun(c):
            out += _with_conjuncts(c)
    return out


def _nouns(tokens: Iterable[Any]) -> list[Any]:
    return [n for t in tokens if _is_noun(t) for n in _with_conjuncts(t)]


def _merged_compound(noun: Any) -> Any | None:
    """The modifier that makes a COMPOUND_NOUNS name with ``noun`` ("teddy" of "teddy bears"), if any."""
    for c in noun.children:
        if c.dep_ in ("compound", "amod") and c.i == noun.i - 1 \
                and f"{c.text.lower()} {noun.lemma_.lower()}" in COMPOUND_NOUNS:
            return c
    return None


def _noun_name(noun: Any) -> str:
    c = _merged_compound(noun)
    lemma = noun.lemma_.lower()
    return f"{c.text.lower()} {lemma}" if c is not None else lemma


def _is_object(t: Any) -> bool:
    """A noun that names an object: not a noun modifying another noun ("steel" of "steel appliances")."""
    return _is_noun(t) and not (t.dep_ == "compound" and t.head is not t and _is_noun(t.head))


def _modifiers(noun: Any) -> list[Any]:
    """The words that describe ``noun``: its amod/compound/nummod children, what is joined to them by "and"
    ("red and white"), and their own modifiers ("stainless" of "stainless steel appliances")."""
    merged = _merged_compound(noun)
    out, todo = [], [c for c in _children(noun, MODIFIER_DEPS) if c is not merged]
    while todo:
        m = todo.pop()
        out.append(m)
        todo += _children(m, MODIFIER_DEPS | {"conj"})
    return sorted(out, key=lambda m: m.i)


def _subjects(verb: Any) -> list[Any]:
    """The nouns a verb is said of: its subjects; for "a man riding ..." (acl/relcl) the noun it modifies; for the
    second of two joined verbs, the first one's. A pronoun subject ("it is red") gives none: nothing to name."""
    subjects = _children(verb, SUBJECT_DEPS)
    if subjects:
        return _nouns(subjects)
    if verb.dep_ in ("acl", "relcl") and _is_noun(verb.head):
        return _with_conjuncts(verb.head)
    if verb.dep_ in INHERIT_SUBJECT_DEPS and verb.head is not verb:
        return _subjects(verb.head)
    return []


def _verb_concepts(verb: Any) -> list[tuple[tuple[int, ...], Concept]]:
    """(subject, verb [particle] [preposition], object) for each subject and object; for "be" the preposition alone
    ("the cat is on the table" -> (cat, on, table)) and the predicate adjectives ("the bus is red" -> (bus, red))."""
    subjects = _subjects(verb)
    if not subjects:
        return []
    is_be = verb.lemma_.lower() == "be"
    base = [] if is_be else [verb.lemma_.lower()] + [c.text.lower() for c in _children(verb, {"prt"})]
    links: list[tuple[str, Any]] = []
    if base:
        links += [(" ".join(base), o) for o in _nouns(_children(verb, {"dobj"}))]
    for p in _children(verb, PREP_DEPS):
        links += [(" ".join(base + [p.text.lower()]), o) for o in _nouns(_children(p, {"pobj"}))]
    found = [((s.i, verb.i, o.i), (_noun_name(s), rel, _noun_name(o))) for s in subjects for rel, o in links]
    if is_be:
        adjectives = [a for c in _children(verb, {"acomp"}) for a in [c] + _children(c, {"conj"})]
        found += [((s.i, a.i), (_noun_name(s), a.text.lower())) for s in subjects for a in adjectives]
    return found


def concepts_from_parse(tokens: Iterable[Any]) -> list[Concept]:
    """The concept tuples of a dependency-parsed caption (a spaCy ``Doc``, or anything iterating over tokens with
    ``text, lemma_, pos_, dep_, head, children, i``): objects, their modifiers, verb relations and
    noun-preposition-noun relations ("a plate of food" -> (plate, of, food))."""
    found: list[tuple[tuple[int, ...], Concept]] = []
    for t in tokens:
        if _is_object(t):
            name = _noun_name(t)
            found.append(((t.i,), (name,)))
            found += [((t.i, m.i), (name, m.text.lower())) for m in _modifiers(t)]
            for p in _children(t, {"prep"}):
                found += [((t.i, p.i, o.i), (name, p.text.lower(), _noun_name(o)))
                          for o in _nouns(_children(p, {"pobj"}))]
        elif t.pos_ in ("VERB", "AUX"):
            found += _verb_concepts(t)
    return _ordered(found)


def load_spacy(name_or_path: str):
    """``spacy.load(name_or_path)``, with one-line errors saying how to get spaCy or the pipeline (or use rules)."""
    try:
        import spacy
    except ImportError:
        raise RecipeError(f"phrases: spaCy is not installed (needed for the spaCy extractor {name_or_path!r}); "
                          f"install it with `pip install spacy && python -m spacy download {DEFAULT_SPACY}`, "
                          f"or use --phrases rules (no dependencies)") from None
    try:
        return spacy.load(name_or_path)
    except (OSError, ImportError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"phrases: cannot load the spaCy pipeline {name_or_path!r} ({first}); download it with "
                          f"`python -m spacy download {name_or_path}` or give a pipeline folder as "
                          f"spacy:PATH, or use --phrases rules") from None


class SpacyExtractor(PhraseExtractor):
    """Concept tuples from a spaCy pipeline's dependency parse (see ``concepts_from_parse``).

    ``nlp`` may be given ready (anything that turns a string into tokens), which is how the tests run without
    spaCy; otherwise the pipeline ``name_or_path`` is loaded, which needs spaCy and that pipeline installed."""

    def __init__(self, name_or_path: str = DEFAULT_SPACY, *, nlp=None):
        self.name = f"spacy:{name_or_path}"
        self.nlp = nlp if nlp is not None else load_spacy(name_or_path)

    def extract(self, caption: str) -> list[Concept]:
        return concepts_from_parse(self.nlp(caption))


# =====================================================================================================================
# choosing an extractor, and the recipes' --phrases option
# =====================================================================================================================
def is_extractor_spec(value: Any) -> bool:
    """Whether a --phrases value names an extractor (else it is a side-file pattern, for the recipes that take one)."""
    return isinstance(value, str) and (value in ("rules", "spacy", "auto") or value.startswith("spacy:"))


def make_extractor(spec: str) -> PhraseExtractor:
    """``rules`` | ``spacy`` (en_core_web_sm) | ``spacy:NAME_OR_PATH`` | ``auto`` (spaCy's en_core_web_sm if it
    loads, else rules; the choice is logged on stderr, so a run's log says which produced its phrases)."""
    if spec == "rules":
        return RuleExtractor()
    if spec == "spacy":
        return SpacyExtractor(DEFAULT_SPACY)
    if isinstance(spec, str) and spec.startswith("spacy:"):
        name = spec[len("spacy:"):]
        if not name:
            raise RecipeError("phrases: 'spacy:' needs a pipeline name or folder, e.g. spacy:en_core_web_sm")
        return SpacyExtractor(name)
    if spec == "auto":
        try:
            extractor: PhraseExtractor = SpacyExtractor(DEFAULT_SPACY)
            print(f"phrases: using the spaCy pipeline {DEFAULT_SPACY}", file=sys.stderr)
        except RecipeError as e:
            extractor = RuleExtractor()
            print(f"phrases: spaCy's {DEFAULT_SPACY} is not available, using the rule-based extractor ({e})",
                  file=sys.stderr)
        return extractor
    raise RecipeError(f"phrases: unknown extractor {spec!r}; expected {SPECS}")


def add_phrase_args(parser: argparse.ArgumentParser, *, side_files: bool = False) -> None:
    """The recipes' ``--phrases`` option: an extractor spec (and, with ``side_files``, a side-file pattern)."""
    extractors = ("'rules' (built-in, no dependencies), 'spacy' or 'spacy:NAME_OR_PATH' (a spaCy pipeline's parse; "
                  "needs `pip install spacy` and the pipeline), 'auto' (spaCy's en_core_web_sm if installed, else "
                  "rules)")
    if side_files:
        parser.add_argument("--phrases", default=None, metavar="SPEC|PATTERN",
                            help=f"concept phrases per caption: extracted with {extractors}; or read from side files "
                                 f"{{image_id: [[tuple, ...] per caption]}}, e.g. 'RAW/phrases_{{split}}.json' "
                                 f"(a file named like an extractor: give it as ./rules)")
    else:
        parser.add_argument("--phrases", default=None, metavar="SPEC",
                            help=f"concept phrases per caption, extracted with {extractors}")


def extractor_for(value: Any, source: str, *, side_files: bool = False) -> PhraseExtractor | None:
    """The extractor a recipe's ``phrases`` argument asks for: a spec or a ready ``PhraseExtractor``; None for no
    phrases, or (``side_files``) for a side-file pattern. Anything else is an error naming the recipe."""
    if not value:
        return None
    if isinstance(value, PhraseExtractor):
        return value
    if not is_extractor_spec(value):
        if side_files:
            return None
        raise RecipeError(f"{source}: --phrases takes {SPECS}, got {value!r} (phrase side files are read by the "
                          f"coco recipe only)")
    return make_extractor(value)


def attach_phrases(info: dict, extractor: PhraseExtractor) -> dict:
    """Set ``info["phrases"]``: per caption of ``info["captions"]``, its tuples as JSON lists (in place; returned)."""
    info["phrases"] = [[list(t) for t in extractor.extract(c)] for c in info["captions"]]
    return info


def phrase_meta(extractor: PhraseExtractor) -> dict:
    """What a split's index records about extracted phrases."""
    return {"phrases": True, "phrase_extractor": extractor.name}
