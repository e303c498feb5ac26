"""Concept-phrase extraction for real captions (data_recipes/_phrases.py): the rule extractor on COCO-style captions,
the spaCy parse -> tuples conversion on hand-built parses (spaCy itself is not installed here), choosing an
extractor (and the one-line errors when spaCy is missing), and ``--phrases rules`` in the recipes' shards. Every
expected tuple list is written out by hand."""

from __future__ import annotations

import json
import sys
import types

import pytest
import recipe_fixtures as F
from test_recipes import read_back

from data_recipes import _phrases as P
from data_recipes import cc, coco, flickr30k, vg
from data_recipes._common import RecipeError


# -- the rule extractor -----------------------------------------------------------------------------------------------
RULE_CASES = {
    "A man riding a brown horse on a beach.":
        [("man",), ("horse",), ("horse", "brown"), ("man", "ride", "horse"), ("beach",), ("man", "on", "beach")],
    "Two dogs sitting on a red couch.":
        [("dog",), ("dog", "two"), ("couch",), ("couch", "red"), ("dog", "sit on", "couch")],
    "A kitchen filled with stainless steel appliances.":
        [("kitchen",), ("appliance",), ("appliance", "stainless"), ("appliance", "steel"),
         ("kitchen", "fill with", "appliance")],
    "A plate of food with broccoli and rice.":
        [("plate",), ("food",), ("plate", "of", "food"), ("broccoli",), ("plate", "with", "broccoli"), ("rice",),
         ("plate", "with", "rice")],
    "A woman holding an umbrella in the rain.":
        [("woman",), ("umbrella",), ("woman", "hold", "umbrella"), ("rain",), ("woman", "in", "rain")],
    "A man and a woman sitting on a bench.":  # a coordinated subject: both sit
        [("man",), ("woman",), ("bench",), ("man", "sit on", "bench"), ("woman", "sit on", "bench")],
    "A large giraffe standing next to a tree.":  # a multiword preposition
        [("giraffe",), ("giraffe", "large"), ("tree",), ("giraffe", "stand next to", "tree")],
    "A teddy bear sitting on top of a bed.":  # a COCO two-word category stays one object
        [("teddy bear",), ("bed",), ("teddy bear", "sit on top of", "bed")],
    "The bus is red and white.":  # a predicate after "is"
        [("bus",), ("bus", "red"), ("bus", "white")],
    "A person holding a glass of wine.":  # "glass" is not a plural
        [("person",), ("glass",), ("person", "hold", "glass"), ("wine",), ("glass", "of", "wine")],
    "Buses parked on the side of a street.":
        [("bus",), ("side",), ("bus", "park on", "side"), ("street",), ("side", "of", "street")],
    "A man's hand holding a phone next to it.":  # the possessed noun holds; no tuple for a pronoun
        [("man",), ("hand",), ("phone",), ("hand", "hold", "phone")],
    "A dog chasing a flowered frisbee.":  # "chasing": not in the verb table, lemma from the spelling rules
        [("dog",), ("frisbee",), ("frisbee", "flowered"), ("dog", "chase", "frisbee")],
    "Two giraffes are standing next to each other in a zoo.":  # "each other" is no noun: the relation ends there
        [("giraffe",), ("giraffe", "two"), ("zoo",), ("giraffe", "in", "zoo")],
    "A close up of a pizza with cheese.":  # "a close up of": no subject
        [("pizza",), ("cheese",), ("pizza", "with", "cheese")],
    "A dog and a dog.": [("dog",)],  # de-duplicated
    "": [],
    "?!": [],
}


@pytest.mark.parametrize("caption", list(RULE_CASES))
def test_rule_extractor_on_coco_style_captions(caption):
    assert P.RuleExtractor().extract(caption) == RULE_CASES[caption]


@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("buses", "bus"), ("glass", "glass"), ("glasses", "glass"), ("boxes", "box"),
    ("benches", "bench"), ("berries", "berry"), ("horses", "horse"), ("men", "man"), ("knives", "knife"),
    ("cookies", "cookie"), ("tomatoes", "tomato"), ("tennis", "tennis"), ("pants", "pants"), ("bus", "bus")])
def test_plural_stripping(plural, singular):
    assert P.singular(plural) == singular


@pytest.mark.parametrize("word, lemma", [
    ("kicking", "kick"), ("running", "run"), ("rolling", "roll"), ("cleaning", "clean"), ("moving", "move"),
    ("throwing", "throw"), ("trying", "try"), ("carried", "carry"), ("skiing", "ski"),
    ("chasing", "chasing")])  # chas or chase? kept as written
def test_unknown_verbs_are_lemmatised_only_where_the_spelling_tells(word, lemma):
    assert P._guess_lemma(word) == lemma


# -- the spaCy conversion, on hand-built parses -----------------------------------------------------------------------
class FakeToken:
    """The part of spaCy's Token that the conversion reads."""

    def __init__(self, doc, i, text, lemma, pos, dep, head):
        self.doc, self.i, self.text, self.lemma_, self.pos_, self.dep_, self._head = doc, i, text, lemma, pos, dep, head

    @property
    def head(self):
        return self.doc[self._head]

    @property
    def children(self):
        return [t for t in self.doc if t._head == self.i and t is not self]


def parse(rows):
    """``(text, lemma, pos, dep, head index)`` per token -> a list of FakeTokens (a ROOT is its own head)."""
    doc = []
    doc.extend(FakeToken(doc, i, *row) for i, row in enumerate(rows))
    return doc


# as en_core_web_sm parses them
PARSES = {
    "A kitchen filled with stainless steel appliances.": [
        ("A", "a", "DET", "det", 1), ("kitchen", "kitchen", "NOUN", "ROOT", 1), ("filled", "fill", "VERB", "acl", 1),
        ("with", "with", "ADP", "prep", 2), ("stainless", "stainless", "ADJ", "amod", 5),
        ("steel", "steel", "NOUN", "compound", 6), ("appliances", "appliance", "NOUN", "pobj", 3),
        (".", ".", "PUNCT", "punct", 1)],
    "A man and a woman sitting on a bench in a park.": [
        ("A", "a", "DET", "det", 1), ("man", "man", "NOUN", "ROOT", 1), ("and", "and", "CCONJ", "cc", 1),
        ("a", "a", "DET", "det", 4), ("woman", "woman", "NOUN", "conj", 1), ("sitting", "sit", "VERB", "acl", 1),
        ("on", "on", "ADP", "prep", 5), ("a", "a", "DET", "det", 8), ("bench", "bench", "NOUN", "pobj", 6),
        ("in", "in", "ADP", "prep", 8), ("a", "a", "DET", "det", 11), ("park", "park", "NOUN", "pobj", 9),
        (".", ".", "PUNCT", "punct", 1)],
    "A girl picks up two teddy bears and the couch is red and white.": [
        ("A", "a", "DET", "det", 1), ("girl", "girl", "NOUN", "nsubj", 2), ("picks", "pick", "VERB", "ROOT", 2),
        ("up", "up", "ADP", "prt", 2), ("two", "two", "NUM", "nummod", 6), ("teddy", "teddy", "NOUN", "compound", 6),
        ("bears", "bear", "NOUN", "dobj", 2), ("and", "and", "CCONJ", "cc", 2), ("the", "the", "DET", "det", 9),
        ("couch", "couch", "NOUN", "nsubj", 10), ("is", "be", "AUX", "conj", 2), ("red", "red", "ADJ", "acomp", 10),
        ("and", "and", "CCONJ", "cc", 11), ("white", "white", "ADJ", "conj", 11), (".", ".", "PUNCT", "punct", 2)],
    "It is on a red table.": [
        ("It", "it", "PRON", "nsubj", 1), ("is", "be", "AUX", "ROOT", 1), ("on", "on", "ADP", "prep", 1),
        ("a", "a", "DET", "det", 5), ("red", "red", "ADJ", "amod", 5), ("table", "table", "NOUN", "pobj", 2),
        (".", ".", "PUNCT", "punct", 1)],
}
SPACY_EXPECTED = {
    "A kitchen filled with stainless steel appliances.":  # the same as the rules give
        RULE_CASES["A kitchen filled with stainless steel appliances."],
    # acl verb: its subject is the noun it modifies, with the noun joined to it; "in a park" hangs on the bench
    "A man and a woman sitting on a bench in a park.":
        [("man",), ("woman",), ("bench",), ("man", "sit on", "bench"), ("woman", "sit on", "bench"), ("park",),
         ("bench", "in", "park")],
    # a particle, a number, a merged compound name; "is" with a subject of its own: a predicate, no inheritance
    "A girl picks up two teddy bears and the couch is red and white.":
        [("girl",), ("teddy bear",), ("teddy bear", "two"), ("girl", "pick up", "teddy bear"), ("couch",),
         ("couch", "red"), ("couch", "white")],
    "It is on a red table.": [("table",), ("table", "red")],  # a pronoun is no concept, so no relation
}


@pytest.mark.parametrize("caption", list(PARSES))
def test_spacy_conversion_on_fake_parses(caption):
    assert P.concepts_from_parse(parse(PARSES[caption])) == SPACY_EXPECTED[caption]


def test_spacy_extractor_runs_the_pipeline_it_is_given():
    ex = P.SpacyExtractor(nlp=lambda text: parse(PARSES[text]))
    caption = "A man and a woman sitting on a bench in a park."
    assert ex.name == "spacy:en_core_web_sm" and ex.extract(caption) == SPACY_EXPECTED[caption]


# -- choosing an extractor --------------------------------------------------------------------------------------------
@pytest.fixture
def no_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError, installed or not


@pytest.fixture
def fake_spacy(monkeypatch):
    """A spaCy whose load records what it was asked for; names starting with 'missing' fail as spaCy's do."""
    loaded = []

    def load(name):
        if str(name).startswith("missing"):
            raise OSError(f"[E050] Can't find model '{name}'. It doesn't seem to be a Python package or a valid path")
        loaded.append(name)
        return lambda text: parse(PARSES[text])

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    return loaded


def test_make_extractor_specs(fake_spacy, capsys):
    assert isinstance(P.make_extractor("rules"), P.RuleExtractor)
    ex = P.make_extractor("spacy")
    assert isinstance(ex, P.SpacyExtractor) and ex.name == "spacy:en_core_web_sm"
    assert P.make_extractor("spacy:/models/en_core_web_trf").name == "spacy:/models/en_core_web_trf"
    assert fake_spacy == ["en_core_web_sm", "/models/en_core_web_trf"]
    assert P.make_extractor("auto").name == "spacy:en_core_web_sm"
    assert "using the spaCy pipeline en_core_web_sm" in capsys.readouterr().err
    for bad in ("bogus", "RAW/phrases_{split}.json"):
        with pytest.raises(RecipeError, match="unknown extractor .*expected rules, spacy, spacy:NAME_OR_PATH or auto"):
            P.make_extractor(bad)
    with pytest.raises(RecipeError, match="needs a pipeline name"):
        P.make_extractor("spacy:")
    with pytest.raises(RecipeError, match=r"cannot load the spaCy pipeline 'missing_model' \(\[E050\].*"
                                          r"python -m spacy download missing_model.*--phrases rules"):
        P.make_extractor("spacy:missing_model")
    assert [P.is_extractor_spec(s) for s in ("rules", "spacy", "spacy:x", "auto", "phrases.json", None)] == \
        [True, True, True, True, False, False]


@pytest.mark.parametrize("spec", ["spacy", "spacy:/models/mine"])
def test_spacy_missing_is_a_clear_one_line_error(no_spacy, spec):
    with pytest.raises(RecipeError) as e:
        P.make_extractor(spec)
    msg = str(e.value)
    assert "\n" not in msg and "spaCy is not installed" in msg and "pip install spacy" in msg
    assert "python -m spacy download en_core_web_sm" in msg and "--phrases rules" in msg
    assert spec.partition(":")[2] in msg


def test_auto_falls_back_to_rules_and_says_so(no_spacy, capsys):
    assert isinstance(P.make_extractor("auto"), P.RuleExtractor)
    err = capsys.readouterr().err
    assert "using the rule-based extractor" in err and "spaCy is not installed" in err


# -- the recipes ------------------------------------------------------------------------------------------------------
def _aligned(js):
    assert len(js["phrases"]) == len(js["captions"])
    assert all(isinstance(t, list) and t and all(isinstance(w, str) for w in t) for ph in js["phrases"] for t in ph)


def test_coco_phrases_rules_in_the_shards(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "out"
    F.make_coco(root)
    coco.build(root, out, split="train", shard_size=10, progress=False)  # first without phrases: then rebuilt
    idx = coco.build(root, out, split="train", shard_size=10, progress=False, phrases="rules")["train"]
    assert idx["meta"]["phrases"] is True and idx["meta"]["phrase_extractor"] == "rules"
    assert "phrase_stats" not in idx["meta"]
    s = read_back(out / "train")
    assert sorted(s) == ["coco-1", "coco-4", "coco-6"]
    one = s["coco-1"]["json"]
    assert one["captions"] == ["A red circle.", "a circle on the left"]
    assert one["phrases"] == [[["circle"], ["circle", "red"]], [["circle"], ["left"], ["circle", "on", "left"]]]
    # image 4's empty first caption is dropped before extraction, so phrases stay aligned
    assert s["coco-4"]["json"]["captions"] == ["a blue square"]
    assert s["coco-4"]["json"]["phrases"] == [[["square"], ["square", "blue"]]]
    assert s["coco-6"]["json"]["phrases"] == [[["image"], ["image", "png"]]]
    for sample in s.values():
        _aligned(sample["json"])
    # Karpathy splits and the command line take it too
    assert coco.main(["--root", str(root), "--out", str(tmp_path / "k"), "--karpathy", str(root / "dataset_coco.json"),
                      "--split", "val", "--phrases", "rules", "--no-progress"]) == 0
    assert read_back(tmp_path / "k" / "val")["coco-11"]["json"]["phrases"] == [[["val"]]]


def test_flickr_vg_cc_phrases_from_the_command_line(tmp_path):
    F.make_flickr30k(tmp_path / "flickr30k")
    F.make_vg(tmp_path / "vg")
    F.make_img2dataset(tmp_path / "cc", "webdataset")
    for module, name in ((flickr30k, "flickr30k"), (vg, "vg"), (cc, "cc")):
        assert module.main(["--root", str(tmp_path / name), "--out", str(tmp_path / "out" / name), "--split", "train",
                            "--phrases", "rules", "--no-progress"]) == 0
    fl = read_back(tmp_path / "out" / "flickr30k" / "train")["flickr30k-100"]["json"]
    assert fl["captions"] == ["A dog runs.", "two dogs"]
    assert fl["phrases"] == [[["dog"]], [["dog"], ["dog", "two"]]]
    v = read_back(tmp_path / "out" / "vg" / "train")["vg-1"]["json"]
    assert v["captions"] == ["red circle", "sky"] and v["phrases"] == [[["circle"], ["circle", "red"]], [["sky"]]]
    c = read_back(tmp_path / "out" / "cc" / "train")
    assert c["cc-000000000"]["json"]["phrases"] == [[["photo"], ["cat"], ["photo", "of", "cat"]]]
    for samples in (c, read_back(tmp_path / "out" / "vg" / "train")):
        for sample in samples.values():
            _aligned(sample["json"])
    index = json.loads((tmp_path / "out" / "cc" / "train" / "index.json").read_text())
    assert index["meta"]["phrase_extractor"] == "rules"


def test_recipe_phrase_errors_are_one_line(tmp_path, no_spacy, capsys):
    F.make_flickr30k(tmp_path / "f")
    args = ["--root", str(tmp_path / "f"), "--out", str(tmp_path / "o"), "--no-progress", "--phrases"]
    assert flickr30k.main(args + ["phrases.json"]) == 2
    err = capsys.readouterr().err
    assert "flickr30k: --phrases takes rules, spacy" in err and "coco recipe only" in err
    assert flickr30k.main(args + ["spacy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "spaCy is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written
