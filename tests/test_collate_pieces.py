"""The collator's pieces, each alone: caption choice, image views and their batch normalisation, caption
pre-processing (ALBEF/TCL ``pre_caption``) and tokenisation, regions (loading, padding, labels), VQA question rows,
and the evaluation resize (square vs BridgeTower's short side + centre crop) on a non-square image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.collate import CaptionChoice, ImageBatcher, ImageViews
from vlp.data.questions import QuestionRows, parse_question
from vlp.data.regions import load_regions, pad_regions
from vlp.data.stream import CorruptSample
from vlp.data.text import TextTokenizer, pre_caption, preprocess_caption
from vlp.data.tokenizer import train_wordpiece
from vlp.data.transforms import ImageTransform, denormalize


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["a red ball left of a blue cube", "what color is the square", "two shapes and a person"] * 5
    return train_wordpiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=80)


# ---------------------------------------------------------------------------------------------------------------------
# captions


def test_caption_choice_first_random_and_first_prob():
    assert {CaptionChoice("first")(5, b) for b in range(50)} == {0}
    picks = [CaptionChoice("random")(5, b) for b in range(400)]
    assert set(picks) == {0, 1, 2, 3, 4} and picks == [CaptionChoice("random")(5, b) for b in range(400)]
    mostly_first = [CaptionChoice("random", first_prob=0.75)(5, b) for b in range(2000)]
    assert abs(mostly_first.count(0) / 2000 - (0.75 + 0.25 / 5)) < 0.04
    with pytest.raises(ValueError, match="data.caption='best'"):
        CaptionChoice("best")


def test_pre_caption_is_the_official_rule():
    # lower-case; , . ' ! ? " ( ) * # : ; ~ deleted; - and / -> space; <person> -> person; 2+ spaces -> 1; strip
    assert pre_caption("A Man's (red) bike, parked: here!  ") == "a mans red bike parked here"
    assert pre_caption("black-and-white/grey  dog\n") == "black and white grey dog"
    assert pre_caption("<person> rides a horse; ~fast~ #1 *wow*") == "person rides a horse fast 1 wow"
    assert pre_caption('He said "hi"?') == "he said hi"
    assert pre_caption("a b   c d e", max_words=3) == "a b c"
    assert pre_caption("left & right") == "left & right"  # only the listed characters go
    for text in ("A Man's (red) bike, parked: here!  ", "x - y", "a b c d e"):
        once = pre_caption(text, 4)
        assert pre_caption(once, 4) == once  # idempotent: retrieval texts may go through it twice
    assert preprocess_caption("  As Is, Kept.  ", "none") == "As Is, Kept."
    with pytest.raises(ValueError, match="caption_preprocess='bert'"):
        preprocess_caption("x", "bert")


def test_text_tokenizer_preprocesses_truncates_and_gives_word_ids(tok):
    t = TextTokenizer(tok, 6, preprocess="albef")
    out = t(["A red BALL!", "a red ball left of a blue cube"], word_ids=True)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["word_ids"].shape == (2, 6)
    assert out["input_ids"].dtype == torch.long and out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert torch.equal(out["input_ids"][0, :5], tok("a red ball", return_tensors="pt")["input_ids"][0])
    assert out["word_ids"][0].tolist() == [-1, 0, 1, 2, -1, -1]
    long = TextTokenizer(tok, 16, preprocess="albef")
    question = ["What color is the square?"]
    assert long.questions(question)["input_ids"].shape[1] == long(question)["input_ids"].shape[1] + 1  # keeps "?"
    assert t.for_eval(30).max_len == 30 and t.for_eval(None).max_len == 6 and t.for_eval(30).preprocess == "albef"


# ---------------------------------------------------------------------------------------------------------------------
# images


def _split_image(w: int, h: int) -> Image.Image:
    """Left third red, middle green, right third blue (so a crop and a squeeze look different)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3] = (255, 0, 0)
    arr[:, w // 3: 2 * w // 3] = (0, 255, 0)
    arr[:, 2 * w // 3:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_short_side_crop_keeps_the_aspect_and_crops_the_centre():
    img = _split_image(96, 32)  # 3:1
    crop = ImageTransform(16, resize="short_side_crop", train=False).pil(img)
    square = ImageTransform(16, resize="square", train=False).pil(img)
    assert crop.size == square.size == (16, 16)
    c, s = np.asarray(crop).astype(int), np.asarray(square).astype(int)
    # short side 32 -> 16, long side 96 -> 48, centre 16 columns = columns 16..31 of 48: all in the green third
    assert (c[:, 2:-2, 1] > 200).all() and (c[:, 2:-2, [0, 2]] < 60).all()
    # the square resize squeezes the whole width in: red on the left, blue on the right
    assert s[:, 1, 0].min() > 200 and s[:, -2, 2].min() > 200
    # a square image: both rules agree
    sq = _split_image(48, 48)
    assert np.array_equal(np.asarray(ImageTransform(16, resize="short_side_crop", train=False).pil(sq)),
                          np.asarray(ImageTransform(16, resize="square", train=False).pil(sq)))
    with pytest.raises(ValueError, match="data.resize='crop'"):
        ImageTransform(16, resize="crop")


def test_image_views_are_seeded_and_share_the_flip():
    views = ImageViews(ImageTransform(16, augment="albef"), hflip=True, two_views=True)
    img = _split_image(32, 32)
    a, a2, fa = views(img, 7)
    b, b2, fb = views(img, 7)
    assert torch.equal(a, b) and torch.equal(a2, b2) and fa == fb and a.dtype == torch.uint8
    flips = {views(img, s)[2] for s in range(20)}
    assert flips == {True, False}
    assert views(img, 3, allow_flip=False)[2] is False
    assert ImageViews(ImageTransform(16))(img, 0)[1] is None  # one view unless two_views


def test_image_batcher_normalises_uint8_and_keeps_float():
    views = [torch.full((4, 4, 3), 255, dtype=torch.uint8), torch.zeros(4, 4, 3, dtype=torch.uint8)]
    out = ImageBatcher("clip")(views)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(denormalize(out, "clip"), torch.stack([torch.ones(3, 4, 4), torch.zeros(3, 4, 4)]),
                          atol=1e-5)
    floats = [torch.randn(3, 4, 4), torch.randn(3, 4, 4)]
    assert torch.equal(ImageBatcher()(floats), torch.stack(floats))
    assert ImageBatcher().batch([{"key": "a"}]) == {}  # region-only samples: no image keys
    with pytest.raises(ValueError, match="lack 'image'"):
        ImageBatcher().batch([{"key": "a", "image": floats[0]}, {"key": "b"}])


# ---------------------------------------------------------------------------------------------------------------------
# regions


def _npz(n: int, labels: bool = True, c: int = 3) -> dict:
    out = {"features": np.arange(n * 2, dtype=np.float16).reshape(n, 2) + 1,
           "boxes": np.tile(np.array([[0.0, 0.1, 0.5, 0.6]], np.float32), (n, 1)),
           "cls_prob": np.full((n, c), 1.0 / c, np.float16)}
    if labels:
        out["labels"] = np.array([f"o{k}" for k in range(n)], dtype=str)
    return out


def test_load_regions_checks_shapes_and_reads_labels():
    r = load_regions(_npz(3), "k")
    # fp16 as stored per sample; the batch is float32 with the same values (converted once, while padding)
    assert r["region_features"].dtype == torch.float16 and r["region_features"].shape == (3, 2)
    padded = pad_regions([r, load_regions(_npz(2), "k2")])
    assert padded["region_features"].dtype == torch.float32 and padded["region_cls_prob"].dtype == torch.float32
    assert torch.equal(padded["region_features"][0], torch.from_numpy(_npz(3)["features"].astype(np.float32)))
    assert padded["region_features"][1, 2].abs().sum() == 0 and padded["region_mask"].tolist() == [[True] * 3,
                                                                                                   [True, True, False]]
    assert load_regions({**_npz(2), "features": np.ones((2, 2), np.int64)})["region_features"].dtype == torch.float32
    assert r["region_boxes"].shape == (3, 4) and r["region_cls_prob"].shape == (3, 3)
    assert r["region_labels"] == ["o0", "o1", "o2"]
    assert "region_labels" not in load_regions(_npz(3, labels=False))
    bad = _npz(3)
    bad["labels"] = np.array(["x", "y"])
    with pytest.raises(CorruptSample, match=r"sample k7: regions.npz labels \(2,\) does not match 3 regions"):
        load_regions(bad, "k7")
    with pytest.raises(CorruptSample, match="sample k8: regions.npz needs 'features' and 'boxes'"):
        load_regions({"features": np.zeros((2, 2))}, "k8")


def test_mirror_boxes_follow_a_horizontal_flip():
    from vlp.data.collate import mirror_boxes

    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.5], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(mirror_boxes(boxes), torch.tensor([[0.6, 0.2, 0.9, 0.5], [0.0, 0.0, 1.0, 1.0]]))


def test_pad_regions_pads_masks_and_keeps_labels_only_when_all_have_them():
    samples = [{"key": "a", **load_regions(_npz(1))}, {"key": "b", **load_regions(_npz(3))}]
    out = pad_regions(samples)
    assert out["region_features"].shape == (2, 3, 2) and out["region_mask"].tolist() == [[True, False, False],
                                                                                         [True, True, True]]
    assert out["region_features"][0, 1:].abs().sum() == 0 and out["region_cls_prob"].shape == (2, 3, 3)
    assert out["region_labels"] == [["o0"], ["o0", "o1", "o2"]]
    mixed = [samples[0], {"key": "c", **load_regions(_npz(2, labels=False))}]
    assert "region_labels" not in pad_regions(mixed)
    with pytest.raises(ValueError, match="sample d: 4 detector classes != 3 of sample a"):
        pad_regions([samples[0], {"key": "d", **load_regions(_npz(2, c=4))}])


# ---------------------------------------------------------------------------------------------------------------------
# VQA questions


def test_question_rows_soft_targets_and_image_map(tok):
    rows = QuestionRows(TextTokenizer(tok, 16, preprocess="albef"), num_answers=4)
    q = lambda qid, labels, scores: {"question_id": qid, "question": "What color is the square?",  # noqa: E731
                                     "labels": labels, "scores": scores, "answered": bool(labels)}
    out = rows([{"questions": [q(1, [3], [1.0])]}, {"questions": [q(2, [], []), q(3, [0, 2], [0.3, 0.9])]}])
    assert torch.equal(out["vqa_targets"], torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0] * 4, [0.3, 0.0, 0.9, 0.0]]))
    assert out["question_image"].tolist() == [0, 1, 1] and out["question_ids"].tolist() == [1, 2, 3]
    assert out["vqa_answered"].tolist() == [True, False, True] and out["input_ids"].shape[0] == 3
    assert out["questions"] == ["What color is the square?"] * 3  # questions are not caption-pre-processed
    with pytest.raises(CorruptSample, match=r"sample s, question 5: labels \[4\] outside the answer vocabulary"):
        parse_question("s", {"question_id": 5, "question": "q?", "labels": [4], "scores": [1.0]}, 4)
    with pytest.raises(ValueError, match="num_answers >= 1"):
        QuestionRows(None, 0)


def test_read_npz_equals_np_load_checks_crc_and_falls_back_for_compressed_members(monkeypatch):
    import io

    from vlp.data import regions as regions_lib
    from vlp.data.regions import read_npz

    fallbacks = []
    np_load = regions_lib._np_load
    monkeypatch.setattr(regions_lib, "_np_load", lambda data: fallbacks.append(1) or np_load(data))

    rng = np.random.default_rng(0)
    arrays = {"features": rng.standard_normal((5, 7)).astype(np.float16), "boxes": rng.random((5, 4)).astype(np.float32),
              "labels": np.array(["ball", "cube", "a", "b", "c"]), "scalar": np.array(3.5),
              "fortran": np.asfortranarray(rng.random((3, 4)))}
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        got = read_npz(buf.getvalue())
        assert sorted(got) == sorted(arrays)
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), (save, k)
        got["features"][0, 0] = 1  # writable (torch.from_numpy needs it)
        assert len(fallbacks) == (save is np.savez_compressed)  # stored members: the fast path, zip64 and all
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    damaged = bytearray(buf.getvalue())
    damaged[damaged.find(arrays["features"].tobytes()) + 9] ^= 0x10  # one bit inside the features' data
    with pytest.raises(ValueError, match="features.npy: CRC-32 mismatch"):
        read_npz(bytes(damaged))
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="object arrays"):
        read_npz(buf.getvalue())
