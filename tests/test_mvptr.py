"""MVPTR's pieces on hand examples: the phrase vocabulary, phrase insertion and corruption, tags, the hard-negative
layout on odd and even batches, and weakly-supervised phrase grounding (including images with 1-2 regions)."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from vlp.data.concepts import PhraseRows, PhraseVocab, TagRows, image_tags
from vlp.data.masking import MaskingConfig
from vlp.data.tokenizer import train_wordpiece
from vlp.losses.grounding import draw_wpg_choices, gather_rows, text_image_scores, wpg_loss
from vlp.losses.matching import hardest_negatives

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a red circle and blue square left of the green cross zebra".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # every word of WORDS is one token (no sub-words: min_frequency 1, a vocabulary larger than the alphabet)
    return train_wordpiece([" ".join(WORDS)] * 20, tmp_path_factory.mktemp("tok"), vocab_size=200)


def tid(tok, word):
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


@pytest.fixture(scope="module")
def vocab(tokenizer):
    counts = Counter({("circle",): 60, ("circle", "red"): 55, ("square", "blue"): 10, ("square",): 50,
                      ("cross", "left of", "circle"): 70, ("zebrafish",): 80})
    return PhraseVocab.from_counts(counts, tokenizer, min_count=50)


def test_vocabulary_reuses_single_word_ids_and_numbers_new_rows(tokenizer, vocab):
    v = len(tokenizer)
    assert vocab.word_vocab_size == v
    # kept: count >= 50; new rows by (count desc, tuple): zebrafish 80 (not one token), cross-left-of 70, red circle 55
    assert vocab.entries == {("zebrafish",): v, ("cross", "left of", "circle"): v + 1, ("circle",): tid(tokenizer, "circle"),
                             ("circle", "red"): v + 2, ("square",): tid(tokenizer, "square")}
    assert vocab.size == 3 and vocab.total_rows == v + 3
    # ids: known tuples only, normalised, de-duplicated, in order
    assert vocab.ids([["Circle", " red "], ["square", "blue"], ["circle", "red"], ["circle"]]) == [v + 2, tid(tokenizer, "circle")]


def test_vocabulary_file_round_trip_and_errors(tmp_path, tokenizer, vocab):
    path = vocab.save(tmp_path / "phrase_vocab.json")
    back = PhraseVocab.load(path, tokenizer)
    assert back.entries == vocab.entries and back.size == vocab.size and back.min_count == 50
    with pytest.raises(ValueError, match="no phrase vocabulary.*phrase_vocab"):
        PhraseVocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{]")
    with pytest.raises(ValueError, match="bad.json: cannot read"):
        PhraseVocab.load(tmp_path / "bad.json")
    other = train_wordpiece(["x y z"] * 5, tmp_path / "tok2", vocab_size=60)
    with pytest.raises(ValueError, match="built for a tokenizer of"):
        PhraseVocab.load(path, other)


def encode(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_phrases_follow_the_words_and_a_masked_word_masks_its_phrases(tokenizer, vocab):
    v = len(tokenizer)
    rows = PhraseRows(vocab, tokenizer, max_text_len=8, max_phrases=2, masking=MaskingConfig(probability=0.0))
    text = encode(tokenizer, ["a red circle", "the blue square"])
    cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
    # row 0: "circle" (position 3) chosen for MLM -> both phrases holding "circle" become [MASK]; row 1: nothing
    labels = torch.full_like(text["input_ids"], -100)
    labels[0, 3] = tid(tokenizer, "circle")
    mlm_ids = text["input_ids"].clone()
    mlm_ids[0, 3] = mask
    phrases = [[("circle", "red"), ("circle",), ("zebrafish",)], [("square",)]]
    out = rows(text, phrases, mlm=(mlm_ids, labels), seeds=[1, 2])
    w = [tid(tokenizer, x) for x in ("a", "red", "circle", "the", "blue", "square")]
    # 3 words leave 8 - 2 - 3 = 3 word slots + 2 phrase slots: all three phrases of row 0 fit
    assert out["input_ids"].tolist() == [[cls, w[0], w[1], w[2], v + 2, w[2], v, sep],
                                         [cls, w[3], w[4], w[5], w[5], sep, 0, 0]]
    assert out["mlm_input_ids"].tolist() == [[cls, w[0], w[1], mask, mask, mask, v, sep],
                                             [cls, w[3], w[4], w[5], w[5], sep, 0, 0]]
    assert out["mlm_labels"][0].tolist() == [-100, -100, -100, w[2], -100, -100, -100, -100]  # phrases: never targets
    assert out["phrase_mask"].tolist() == [[False] * 4 + [True] * 3 + [False],
                                           [False] * 4 + [True] + [False] * 3]
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]


def test_phrase_slots_and_corruption_rules(tokenizer, vocab):
    v = len(tokenizer)
    text = encode(tokenizer, ["a red circle and blue square"])  # 6 words
    phrases = [[("zebrafish",), ("circle", "red"), ("cross", "left of", "circle")]]
    none = (text["input_ids"].clone(), torch.full_like(text["input_ids"], -100))
    # official slots: max_phrases + max_text_len - 2 - words = 1 + 8 - 2 - 6 = 1
    short = PhraseRows(vocab, tokenizer, max_text_len=8, max_phrases=1, masking=MaskingConfig(probability=0.0))
    assert short(text, phrases)["input_ids"][0, 7:9].tolist() == [v, tokenizer.sep_token_id]
    rows = lambda **m: PhraseRows(vocab, tokenizer, max_text_len=32, max_phrases=5, masking=MaskingConfig(**m))
    all_masked = rows(probability=1.0, mask_ratio=1.0, random_ratio=0.0)(text, phrases, none, seeds=[7])
    assert all_masked["mlm_input_ids"][0, 7:10].tolist() == [tokenizer.mask_token_id] * 3
    randomised = rows(probability=1.0, mask_ratio=0.0, random_ratio=1.0)(text, phrases, none, seeds=[7])
    assert all(v <= i < v + vocab.size for i in randomised["mlm_input_ids"][0, 7:10].tolist())  # new rows only
    kept = rows(probability=1.0, mask_ratio=0.0, random_ratio=0.0)(text, phrases, none, seeds=[7])
    assert torch.equal(kept["mlm_input_ids"], kept["input_ids"])
    # a row's draws are a function of its sample's seed alone, not of the other rows or the padded length
    alone = rows()(text, phrases, none, seeds=[11])["mlm_input_ids"][0]
    pair = encode(tokenizer, ["a red circle and blue square", "a"])
    none2 = (pair["input_ids"].clone(), torch.full_like(pair["input_ids"], -100))
    together = rows()(pair, phrases + [[("circle",)]], none2, seeds=[11, 12])["mlm_input_ids"][0]
    assert torch.equal(alone, together[: alone.shape[0]])


def test_corruption_rate_over_many_rows(tokenizer, vocab):
    """15 % of unlinked phrases are selected; of those 80 % [MASK], 10 % random, 10 % kept."""
    v = len(tokenizer)
    rows = PhraseRows(vocab, tokenizer, max_text_len=32, max_phrases=5, masking=MaskingConfig())
    text = encode(tokenizer, ["a"] * 4000)
    none = (text["input_ids"].clone(), torch.full_like(text["input_ids"], -100))
    out = rows(text, [[("zebrafish",)]] * 4000, none, seeds=list(range(4000)))
    got = out["mlm_input_ids"][:, 2]
    masked = (got == tokenizer.mask_token_id).float().mean().item()
    randomised = ((got >= v) & (got != v)).float().mean().item()  # a random draw of row v itself looks kept
    assert abs(masked - 0.15 * 0.8) < 0.02 and abs(randomised - 0.15 * 0.1 * 2 / 3) < 0.01


def test_tags_deduplicate_drop_background_and_mask(tokenizer):
    assert image_tags(["circle", "__background__", "square", "circle", " "]) == ["circle", "square"]
    rows = TagRows(tokenizer, max_tags=4, masking=MaskingConfig(probability=1.0, mask_ratio=1.0, random_ratio=0.0))
    out = rows([["circle", "circle", "square", "cross"], ["__background__"]], seeds=[3, 4])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert out["tag_ids"].tolist() == [[cls, tid(tokenizer, "circle"), tid(tokenizer, "square"), sep],
                                       [cls, sep, 0, 0]]
    assert out["tag_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["tag_mlm_ids"][0].tolist() == [cls, tokenizer.mask_token_id, tokenizer.mask_token_id, sep]
    assert out["tag_mlm_labels"][0].tolist() == [-100, tid(tokenizer, "circle"), tid(tokenizer, "square"), -100]
    assert "tag_mlm_ids" not in rows([["circle"]])  # no seeds (retrieval images): no masking


def official_hard_negatives(sim, dice):
    """The official encode_hn index bookkeeping, written out as a loop."""
    n = sim.shape[0]
    masked = sim - 2 * torch.eye(n)
    hard_img, hard_txt = masked.max(1)[1], masked.max(0)[1]
    texts = [int(i) for i in dice[: n // 2]] + [int(hard_txt[j]) for j in dice[n // 2:]]
    images = [int(hard_img[i]) for i in dice[: n // 2]] + [int(j) for j in dice[n // 2:]]
    return texts, images


@pytest.mark.parametrize("b", [2, 3, 4, 5, 8])
def test_hard_negative_layout_odd_and_even(b):
    g = torch.Generator().manual_seed(b)
    sim = F.normalize(torch.randn(b, 6, generator=g), dim=1) @ F.normalize(torch.randn(b, 6, generator=g), dim=1).t()
    dice = torch.randperm(b, generator=g)
    texts, images = hardest_negatives(sim, dice)
    assert (texts.tolist(), images.tolist()) == official_hard_negatives(sim, dice)
    assert all(t != i for t, i in zip(texts.tolist(), images.tolist()))  # never the pair itself
    # with image ids: a second caption of the same image is never a negative
    ids = torch.arange(b) // 2
    texts, images = hardest_negatives(sim, dice, ids)
    assert all(ids[t] != ids[i] for t, i in zip(texts.tolist(), images.tolist())) or b == 2


def test_wpg_hand_example():
    # 2 texts, 2-d states. Text 0: one phrase along x; text 1: two phrases (x and y).
    phrases = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    pmask = torch.tensor([[True, False], [True, True]])
    # image 0: regions at 0, 60, 90 degrees; image 1: regions at 45 and 180 degrees (only 2 regions, 1 pad)
    d = lambda deg: [torch.cos(torch.deg2rad(torch.tensor(float(deg)))).item(),
                     torch.sin(torch.deg2rad(torch.tensor(float(deg)))).item()]
    regions = torch.tensor([[d(0), d(60), d(90)], [d(45), d(180), [0.0, 0.0]]])
    rmask = torch.tensor([[True, True, True], [True, True, False]])
    c45, c60 = 2 ** -0.5, 0.5
    # top-k (k = 3) sorted similarities: text 0 / image 0: [1, .5, 0]; text 0 / image 1: [c45, -1] (2 regions)
    pick_pos = torch.tensor([[1, 0], [0, 2]])  # text 0 picks 0.5; text 1: x-phrase 1 (top), y-phrase 3rd = 0
    pick_neg = torch.tensor([[1, 0], [0, 0]])
    neg_image = torch.tensor([1, 0])
    out = wpg_loss(phrases, pmask, regions, rmask, neg_image, pick_pos, pick_neg, margin=0.2)
    # text 1's own image is image 1 (regions 45, 180): x-phrase top = c45; y-phrase sorted [c45, 0.0 (180 deg)], 3rd
    # of 2 -> clamped to the 2nd = sin(180) = 0
    pos = torch.tensor([c60, (c45 + 0.0) / 2])
    # negatives: text 0 vs image 1: 2nd of [c45, -1] = -1; text 1 vs image 0: x top = 1, y top = 1
    neg = torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(out["pos"], pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["neg"], neg, atol=1e-6, rtol=0)
    expect = ((neg + 0.2 - pos).clamp(min=0)).mean()
    torch.testing.assert_close(out["loss"], expect)


def test_wpg_images_with_one_or_two_regions_and_no_phrases():
    g = torch.Generator().manual_seed(0)
    b, p, n, h = 4, 3, 3, 8
    phrases, regions = torch.randn(b, p, h, generator=g), torch.randn(b, n, h, generator=g, requires_grad=True)
    pmask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]]).bool()
    rmask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]).bool()
    neg, pick_pos, pick_neg = draw_wpg_choices(b, p, torch.Generator().manual_seed(1))
    assert (neg != torch.arange(b)).all()
    out = wpg_loss(phrases, pmask, regions, rmask, neg, pick_pos, pick_neg)
    assert torch.isfinite(out["loss"]) and out["valid"].tolist() == [True, False, True, True]
    out["loss"].backward()
    assert torch.isfinite(regions.grad).all()
    # an image with one region: whatever the pick, its score is that region's similarity
    one = text_image_scores(phrases[:1, :1], pmask[:1, :1], regions[:1], rmask[3:4], torch.tensor([[0.99]]))
    torch.testing.assert_close(one.detach(), F.cosine_similarity(phrases[0, 0], regions[0, 0], dim=0).reshape(1).detach())


def test_gather_rows_packs_the_selected_positions():
    states = torch.arange(2 * 5 * 1, dtype=torch.float).reshape(2, 5, 1)
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1]]).bool()
    rows, keep = gather_rows(states, mask)
    assert rows.squeeze(-1).tolist() == [[1, 3, 4], [9, 0, 0]] and keep.tolist() == [[1, 1, 1], [1, 0, 0]]
