"""The streaming data pipeline: batch format, MLM masking by the model's rule, transforms, node/worker split,
mixtures, corrupt data, what is decoded (images / regions), caption pre-processing, retrieval evaluation data. Tiny
32 px JPEG shards written in a temp dir; resume is in test_resume.py, the masker alone in test_masking.py, the
collator's pieces in test_collate_pieces.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _resume_shards import caption_texts, make_shards
from vlp.data.collate import Collator, SampleProcessor, stable_image_id
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
from vlp.data.masking import MaskingConfig
from vlp.data.shards import shard_name, write_index, write_shard
from vlp.data.stream import CorruptDataError, scan_tar
from vlp.data.tokenizer import train_wordpiece
from vlp.data.transforms import denormalize, swap_left_right


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    texts = caption_texts() + [f"ball number {i} caption {j}" for i in range(200) for j in range(3)]
    train_wordpiece(texts, root / "a" / "tokenizer", vocab_size=160)
    a = make_shards(root / "a", [10, 10, 7, 5], tokenizer="tokenizer")  # 32 samples
    b = make_shards(root / "b", [6, 6], source="vg", start=100)  # 12 samples
    val = make_shards(root / "val", [5, 4], source="coco", split="val", start=500, tokenizer="../a/tokenizer")
    reg = make_shards(root / "reg", [6, 6], source="vg", start=300, regions=True, tokenizer="../a/tokenizer")
    return {"root": root, "a": str(a), "b": str(b), "val": str(val), "reg": str(reg)}


def cfg_for(world, *sources, **kw):
    srcs = [SourceConfig(path=world[s] if isinstance(s, str) else world[s[0]],
                         weight=1.0 if isinstance(s, str) else s[1]) for s in (sources or ("a",))]
    base = dict(train=srcs, batch_size=4, image_size=32, num_workers=0)
    base.update(kw)
    return ShardsDataConfig(**base)


def epoch_batches(dm, rank_world=None, epoch=0):
    stream = dm.build_train_stream() if rank_world is None else ShardDataModule(
        dm.cfg, tokenizer=dm.tokenizer, rank=rank_world[0], world_size=rank_world[1]).build_train_stream()
    stream.set_epoch(epoch)
    return list(DataLoader(stream, batch_size=None, num_workers=dm.cfg.num_workers)), stream


# ---------------------------------------------------------------------------------------------------------------------
# batch format


def test_batch_keys_shapes_dtypes_and_regions(world):
    cfg = cfg_for(world, "reg", two_views=True, regions=True, augment="albef", max_text_len=12)
    dm = ShardDataModule(cfg)  # tokenizer resolved from reg/index.json ("../a/tokenizer", relative to reg/)
    batches, stream = epoch_batches(dm)
    assert len(batches) == len(stream) == 3  # 12 samples / 4
    b = batches[0]
    assert b["image"].shape == b["image_aug"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    L = b["input_ids"].shape[1]
    assert L <= 12
    for k in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert b[k].shape == (4, L) and b[k].dtype == torch.long, k
    tok = dm.tokenizer
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    assert ((b["input_ids"] == tok.pad_token_id) == (b["attention_mask"] == 0)).all()
    assert b["image_ids"].dtype == torch.long and b["image_ids"].tolist() == [int(k.split("-")[1]) for k in b["keys"]]
    assert isinstance(b["keys"], list) and isinstance(b["captions"], list) and len(b["captions"]) == 4
    n = b["region_features"].shape[1]
    assert n == max(2 + int(k.split("-")[1]) % 3 for k in b["keys"])
    assert b["region_features"].shape == (4, n, 8) and b["region_features"].dtype == torch.float32
    assert b["region_boxes"].shape == (4, n, 4)
    assert b["region_mask"].sum(1).tolist() == [2 + int(k.split("-")[1]) % 3 for k in b["keys"]]
    assert (b["region_features"][~b["region_mask"]] == 0).all()
    assert b["n_seen"] == 4 and b["n_corrupt"] == 0
    assert b["stream_state"] == {"epoch": 0, "rank": 0, "worker": 0, "batch": 0, "index": 0, "hops": []}


def test_caption_choice_random_is_seeded_and_first_is_first(world):
    def caps(**kw):
        dm = ShardDataModule(cfg_for(world, **kw))
        return {k: c for b in epoch_batches(dm)[0] for k, c in zip(b["keys"], b["captions"])}

    r1, r2, first = caps(seed=1), caps(seed=1), caps(caption="first")
    assert r1 == r2
    assert {c.split("caption ")[1] for c in r1.values()} == {"0", "1", "2"}  # draws differ between samples
    assert all(c.endswith("caption 0") for c in first.values())
    other_epoch = {k: c for b in epoch_batches(ShardDataModule(cfg_for(world, seed=1)), epoch=1)[0]
                   for k, c in zip(b["keys"], b["captions"])}
    assert other_epoch != r1  # a function of (seed, epoch, key)


def test_tokenizer_missing_is_a_clear_error(world, tmp_path):
    d = make_shards(tmp_path / "nt", [4], tokenizer=None)
    with pytest.raises(ValueError, match="names no tokenizer"):
        ShardDataModule(ShardsDataConfig(train=[SourceConfig(str(d))])).tokenizer


def test_stable_image_id():
    assert stable_image_id(42) == 42 and stable_image_id("42") == 42
    h = stable_image_id("vg/abc")
    assert h == stable_image_id("vg/abc") and h != stable_image_id("vg/abd") and 0 <= h < 2 ** 63


# ---------------------------------------------------------------------------------------------------------------------
# MLM masking


def _caption_samples(texts, seed0=0):
    return [{"key": f"k{i}", "image": torch.zeros(3, 4, 4), "image_id": i, "caption": t, "seed": seed0 + i}
            for i, t in enumerate(texts)]


def test_collator_masks_with_the_models_rule(world):
    tok = ShardDataModule(cfg_for(world)).tokenizer
    texts = caption_texts()[:64]
    special = torch.tensor(tok.all_special_ids)
    # BridgeTower's rule at probability 1: every non-special real token, never [CLS]/[SEP]/[PAD]
    b = Collator(tok, masking=MaskingConfig(protect="special", probability=1.0))(_caption_samples(texts))
    chosen = b["mlm_labels"] != -100
    assert torch.equal(chosen, ~torch.isin(b["input_ids"], special) & (b["attention_mask"] == 1))
    # TCL's rule: [SEP] is a target too, [PAD] and [CLS] never
    b = Collator(tok, masking=MaskingConfig(protect="pad_cls", probability=1.0))(_caption_samples(texts))
    ids, chosen = b["input_ids"], b["mlm_labels"] != -100
    assert chosen[ids == tok.sep_token_id].all()
    assert not chosen[(ids == tok.pad_token_id) | (ids == tok.cls_token_id)].any()
    # the datamodule hands the model's rule to its collators
    dm = ShardDataModule(cfg_for(world), masking=MaskingConfig(protect="pad_cls", probability=0.3))
    assert dm.collator().masking.protect == "pad_cls" and ShardDataModule(cfg_for(world)).collator().masking == \
        MaskingConfig()


def test_a_samples_mask_depends_on_its_seed_not_on_its_batch(world):
    tok = ShardDataModule(cfg_for(world)).tokenizer
    coll = Collator(tok, masking=MaskingConfig(probability=0.5))
    texts = caption_texts()[:40]
    full = coll(_caption_samples(texts))
    part = coll(_caption_samples(texts)[7:9])  # shorter batch: less padding
    n = part["input_ids"].shape[1]
    assert torch.equal(part["mlm_input_ids"], full["mlm_input_ids"][7:9, :n])
    assert torch.equal(part["mlm_labels"], full["mlm_labels"][7:9, :n])
    assert not torch.equal(coll(_caption_samples(texts, seed0=1))["mlm_labels"], full["mlm_labels"])


def test_whole_word_masking_masks_all_pieces_of_a_word(world, tmp_path):
    tok = train_wordpiece(["aa bb cc dd", "xyzzyplugh qwertyuiop"] * 3 + ["x y z q w e r t u i o p l g h"],
                          tmp_path / "tok", vocab_size=60)
    coll = Collator(tok, max_text_len=40, masking=MaskingConfig(probability=0.3, whole_word=True))
    captions = ["xyzzyplugh qwertyuiop aa xyzzyplugh"] * 400
    text = coll.tokenize(captions, word_ids=True)
    assert text["input_ids"].shape[1] > 8  # the long words really are split into pieces
    chosen = coll(_caption_samples(captions))["mlm_labels"] != -100
    wid = text["word_ids"]
    partial = 0
    for i in range(400):
        for w in set(wid[i].tolist()) - {-1}:
            c = chosen[i][wid[i] == w]
            partial += int(c.any() and not c.all())
    assert partial == 0
    words_chosen = sum(len({w for w in wid[i][chosen[i]].tolist()}) for i in range(400))
    assert abs(words_chosen / (400 * 4) - 0.3) < 0.04
    assert not chosen[wid == -1].any()


# ---------------------------------------------------------------------------------------------------------------------
# transforms


def _left_minus_right_blue(img):
    x = denormalize(img)
    half = x.shape[-1] // 2
    return (x[2, :, :half].mean() - x[2, :, half:].mean()).item()


@pytest.mark.parametrize("augment", ["none", "albef"])
def test_no_horizontal_flip_by_default(world, augment):
    batches, _ = epoch_batches(ShardDataModule(cfg_for(world, augment=augment, crop_min_scale=0.6)))
    diffs = [_left_minus_right_blue(im) for b in batches for im in b["image"]]
    assert len(diffs) == 32 and max(diffs) < 0  # the bluish half stays on the right
    assert all(" left of " in c for b in batches for c in b["captions"])


def test_hflip_swaps_left_and_right_in_the_caption(world):
    batches, _ = epoch_batches(ShardDataModule(cfg_for(world, hflip=True, two_views=True)))
    flipped = 0
    for b in batches:
        for im, im2, cap in zip(b["image"], b["image_aug"], b["captions"]):
            is_flipped = _left_minus_right_blue(im) > 0
            assert (_left_minus_right_blue(im2) > 0) == is_flipped  # both views share the flip
            assert (" right of " in cap) == is_flipped and (" left of " in cap) != is_flipped
            flipped += is_flipped
    assert 4 <= flipped <= 28
    assert swap_left_right("Left of the rightmost RIGHT cube, leftover") == "Right of the leftmost LEFT cube, leftover"


def test_two_views_differ_and_are_reproducible(world):
    cfg = cfg_for(world, augment="tcl", two_views=True)
    b1 = epoch_batches(ShardDataModule(cfg))[0][0]
    b2 = epoch_batches(ShardDataModule(cfg))[0][0]
    assert b1["keys"] == b2["keys"]
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["image_aug"], b2["image_aug"])
    for v1, v2 in zip(b1["image"], b1["image_aug"]):
        assert (v1 - v2).abs().mean() > 0.05


@pytest.mark.parametrize("norm", ["clip", "imagenet"])
def test_batched_uint8_normalisation_equals_per_image(norm):
    from PIL import Image

    from vlp.data.transforms import ImageTransform, normalize_uint8_batch

    t = ImageTransform(20, augment="tcl", normalize=norm)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 26, 3), dtype=np.uint8)) for i in range(3)]
    per_image, views = [], []
    for i, img in enumerate(imgs):
        torch.manual_seed(i)
        per_image.append(t(img))
        torch.manual_seed(i)
        views.append(t.uint8(img))
    assert views[0].dtype == torch.uint8 and views[0].shape == (20, 20, 3)
    assert torch.allclose(normalize_uint8_batch(torch.stack(views), norm), torch.stack(per_image), atol=1e-5)


def test_eval_transform_is_a_square_resize(world):
    cfg = cfg_for(world, image_size=24, augment="tcl", val=world["val"], eval_batch_size=4)
    dm = ShardDataModule(cfg)
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["keys"]] == [f"coco-{i}" for i in range(500, 509)]
    assert batches[0]["image"].shape == (4, 3, 24, 24) and batches[-1]["image"].shape == (1, 3, 24, 24)
    again = list(dm.val_dataloader())
    assert torch.equal(batches[0]["image"], again[0]["image"])  # no random augmentation at eval
    assert torch.equal(batches[0]["mlm_input_ids"], again[0]["mlm_input_ids"])  # seeded masking
    assert all(c.endswith("caption 0") for b in batches for c in b["captions"])


# ---------------------------------------------------------------------------------------------------------------------
# node / worker split, equal batches, mixtures


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 2)])
def test_split_covers_every_sample_once_with_equal_batches(world, world_size, workers):
    dm = ShardDataModule(cfg_for(world, num_workers=workers))
    per_rank = []
    for rank in range(world_size):
        batches, stream = epoch_batches(dm, (rank, world_size))
        assert len(batches) == len(stream)
        per_rank.append([k for b in batches for k in b["keys"]])
        assert [b["stream_state"]["index"] for b in batches] == list(range(len(batches)))
        assert [b["stream_state"]["worker"] for b in batches] == [i % max(1, workers) for i in range(len(batches))]
    assert len({len(k) for k in per_rank}) == 1  # same number of batches on every rank
    keys = [k for ks in per_rank for k in ks]
    assert sorted(keys) == sorted(f"shapes-{i}" for i in range(32))  # 32 = 1, 2 or 4 slots x 4 x k: nothing dropped
    e1 = [k for rank in range(world_size) for b in epoch_batches(dm, (rank, world_size), epoch=1)[0]
          for k in b["keys"]]
    assert sorted(e1) == sorted(keys) and e1 != keys  # a new order each epoch


def test_uneven_shards_are_equalised_across_ranks(world, tmp_path):
    d = make_shards(tmp_path / "uneven", [9, 2, 1, 5], tokenizer=str(Path(world["a"]) / "tokenizer"))
    cfg = ShardsDataConfig(train=[SourceConfig(str(d))], batch_size=2, image_size=32, num_workers=2)
    dm = ShardDataModule(cfg)
    lens = []
    keys = []
    for rank in range(2):
        batches, stream = epoch_batches(dm, (rank, 2))
        lens.append(len(batches))
        keys += [k for b in batches for k in b["keys"]]
    assert lens == [4, 4]  # 17 samples over 4 slots: 4 each, 2 batches per worker; 1 dropped
    assert len(keys) == len(set(keys)) == 16


def test_mixture_weights(world):
    dm = ShardDataModule(cfg_for(world, "a", ("b", 2.0)))
    batches, stream = epoch_batches(dm)
    keys = [k for b in batches for k in b["keys"]]
    counts = Counter(k.split("-")[0] for k in keys)
    assert len(batches) == len(stream) == (32 + 24) // 4
    assert counts == {"shapes": 32, "vg": 24}
    assert set(Counter(k for k in keys if k.startswith("vg")).values()) == {2}  # weight 2: two passes over b
    assert len({b["keys"][0].split("-")[0] for b in batches}) == 2 and any(
        len({k.split("-")[0] for k in b["keys"]}) == 2 for b in batches)  # interleaved, also within batches
    again, _ = epoch_batches(dm)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]


def test_resampled_mode_is_deterministic_and_sized(world):
    dm = ShardDataModule(cfg_for(world, resampled=True, num_workers=2))
    b1, stream = epoch_batches(dm)
    b2, _ = epoch_batches(dm)
    assert len(b1) == len(stream) == 8
    assert [b["keys"] for b in b1] == [b["keys"] for b in b2]
    keys = [k for b in b1 for k in b["keys"]]
    assert len(set(keys)) < len(keys) or set(keys) != {f"shapes-{i}" for i in range(32)}  # with replacement


# ---------------------------------------------------------------------------------------------------------------------
# corrupt data


@pytest.fixture(scope="module")
def corrupt_dir(world, tmp_path_factory):
    """4 shards: one with an undecodable jpg, one with a sample lacking json, one truncated mid-way, one clean."""
    from _resume_shards import sample

    d = tmp_path_factory.mktemp("corrupt")
    s0 = [sample("bad", i) for i in range(0, 8)]
    s0[3]["jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    s1 = [sample("bad", i) for i in range(8, 16)]
    del s1[5]["json"]
    s2 = [sample("bad", i) for i in range(16, 28)]
    s3 = [sample("bad", i) for i in range(28, 36)]
    for k, s in enumerate([s0, s1, s2, s3]):
        write_shard(d / shard_name("train", k), s)
    path2 = d / shard_name("train", 2)
    data = path2.read_bytes()
    ts = scan_tar(str(path2))
    cut = ts.samples[5][1]["jpg"][0] + 100  # inside sample 5's image: samples 0-4 survive
    path2.write_bytes(data[:cut])
    write_index(d, source="bad", split="train", skipped={}, tokenizer=str(Path(world["a"]) / "tokenizer"),
                shards=[{"name": shard_name("train", k), "samples": n} for k, n in enumerate([8, 8, 12, 8])])
    bad = {"bad-3", "bad-13"} | {f"bad-{i}" for i in range(21, 28)}
    return d, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(world, corrupt_dir, workers):
    d, bad = corrupt_dir
    assert scan_tar(str(d / shard_name("train", 2))).error is not None
    cfg = ShardsDataConfig(train=[SourceConfig(str(d))], batch_size=4, image_size=32, num_workers=workers,
                           max_corrupt_ratio=0.5, corrupt_min_samples=10)
    dm = ShardDataModule(cfg)
    dm.setup("fit")
    batches = []
    for b in dm.train_dataloader():
        dm.record(b)
        batches.append(b)
    assert len(batches) == len(dm.train_stream) == (9 if workers == 0 else 8)
    assert all(len(b["keys"]) == 4 for b in batches)  # replacements keep batches full
    keys = [k for b in batches for k in b["keys"]]
    assert not set(keys) & bad
    if workers == 0:  # 36 samples, nothing dropped: every good sample of the epoch's pass is there
        assert {f"bad-{i}" for i in range(36)} - bad <= set(keys)
    assert dm.corrupt_count() >= len(bad) - (36 - len(keys))  # (with 2 workers, 4 samples of the pass are dropped)
    assert dm.seen_count() == len(keys) + dm.corrupt_count()  # every read that did not make it was corrupt
    assert dm.state_dict()["corrupt"] == dm.corrupt_count()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_ratio_stops_the_run_naming_the_shard(world, corrupt_dir, workers):
    d, _ = corrupt_dir
    cfg = ShardsDataConfig(train=[SourceConfig(str(d))], batch_size=4, image_size=32, max_corrupt_ratio=0.05,
                           corrupt_min_samples=10, num_workers=workers)
    dm = ShardDataModule(cfg)
    dm.setup("fit")
    with pytest.raises(CorruptDataError, match=r"most corrupt samples: \S*train-000002\.tar") as err:
        for b in dm.train_dataloader():
            pass
    assert "max_corrupt_ratio=0.05" in str(err.value)


def test_index_mismatch_is_a_format_error(world, tmp_path):
    from vlp.data.shards import ShardFormatError

    d = make_shards(tmp_path / "mm", [6, 6], tokenizer=str(Path(world["a"]) / "tokenizer"))
    idx = (d / "index.json").read_text().replace('"samples": 6', '"samples": 5').replace('"num_samples": 12',
                                                                                         '"num_samples": 10')
    (d / "index.json").write_text(idx)
    dm = ShardDataModule(ShardsDataConfig(train=[SourceConfig(str(d))], batch_size=2, image_size=32))
    with pytest.raises(ShardFormatError, match="holds 6 samples but index.json says 5"):
        list(dm.train_dataloader())
    with pytest.raises(ShardFormatError, match="regions"):
        ShardDataModule(ShardsDataConfig(train=[SourceConfig(str(d))], regions=True)).build_train_stream()


# ---------------------------------------------------------------------------------------------------------------------
# retrieval evaluation data


def test_retrieval_data_reads_the_split_in_order_through_the_eval_pipeline(world):
    from vlp.data.visual import Visual

    dm = ShardDataModule(cfg_for(world, val=world["val"], test=world["val"], image_size=16, eval_batch_size=4))
    r = dm.retrieval_data("val")
    visuals, texts, txt2img, img2txt = r
    keys, image_ids = r.keys, r.image_ids
    assert r.visuals is visuals and r.texts is texts and r.txt2img is txt2img and r.img2txt is img2txt
    assert keys == [f"coco-{i}" for i in range(500, 509)] and image_ids == list(range(500, 509))
    assert len(visuals) == 9 and visuals.cached and visuals.corrupt == 0
    batches = list(visuals)
    assert [b["keys"] for b in batches] == [keys[0:4], keys[4:8], keys[8:]]
    assert all(set(b) == {"image", "image_ids", "keys"} for b in batches)  # no text, no MLM, no counters
    v = Visual.from_batch(batches[0])
    assert v.has_pixels and not v.has_regions and v.pixels.shape == (4, 3, 16, 16)
    # the very tensors of the evaluation loader (same processor, same collator)
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.cat([b["image"] for b in val]))
    assert len(texts) == 27 and texts[3].endswith("number 501 caption 0")
    assert txt2img == [i // 3 for i in range(27)] and img2txt == [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(9)]
    assert [b["keys"] for b in visuals] == [b["keys"] for b in batches]  # re-iterable
    with pytest.raises(ValueError, match="data.val is not set"):
        ShardDataModule(cfg_for(world)).retrieval_data("val")


def test_retrieval_visuals_lazy_path_rereads_the_same_batches(world, monkeypatch):
    import vlp.data.datamodule as dmod

    dm = ShardDataModule(cfg_for(world, val=world["val"], image_size=16, eval_batch_size=4))
    kept = list(dm.retrieval_data("val").visuals)
    monkeypatch.setattr(dmod, "RETRIEVAL_TENSOR_BUDGET", 10)
    lazy = dm.retrieval_data("val").visuals
    assert not lazy.cached and len(lazy) == 9
    chunks = list(lazy)
    assert [c["image"].shape[0] for c in chunks] == [4, 4, 1]
    assert all(torch.equal(a["image"], b["image"]) and a["keys"] == b["keys"] for a, b in zip(chunks, kept))


def test_retrieval_data_leaves_corrupt_samples_out_of_images_and_texts(world, corrupt_dir):
    d, bad = corrupt_dir
    dm = ShardDataModule(ShardsDataConfig(test=str(d), image_size=16, eval_batch_size=5, max_corrupt_ratio=0.5,
                                          corrupt_min_samples=10))
    with pytest.warns(UserWarning, match="corrupt sample"):
        r = dm.retrieval_data("test")
    good = [f"bad-{i}" for i in range(36) if f"bad-{i}" not in bad]
    assert r.keys == good and r.visuals.corrupt == len(bad)
    assert [k for b in r.visuals for k in b["keys"]] == good
    assert len(r.texts) == 3 * len(good) and r.txt2img[-1] == len(good) - 1
    assert all(t.split("number ")[1].split(" ")[0] == k.split("-")[1] for t, k in zip(r.texts[::3], good))


def test_encode_texts_preprocesses_and_pads_to_one_length(world):
    dm = ShardDataModule(cfg_for(world, caption_preprocess="albef", max_text_len=8, eval_max_text_len=12))
    tok = dm.tokenizer
    enc = dm.encode_texts(["A RED ball, LEFT of a blue-cube!", "a red ball", "a red ball " * 10])
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == torch.long
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, 12)  # the longest, cut at 12
    ref = tok(["a red ball left of a blue cube"], return_tensors="pt")["input_ids"][0]
    assert torch.equal(enc["input_ids"][0, : len(ref)], ref) and enc["attention_mask"][0].sum() == len(ref)
    assert dm.encode_texts(["a red ball"])["input_ids"].shape == (1, len(tok("a red ball")["input_ids"]))
    assert ShardDataModule(cfg_for(world, max_text_len=8)).encode_texts(["a red ball " * 10])["input_ids"].shape[1] == 8


def test_caption_preprocessing_reaches_training_and_retrieval(world):
    dm = ShardDataModule(cfg_for(world, caption_preprocess="albef", max_words=4, val=world["val"],
                                 caption="first"))
    b = epoch_batches(dm)[0][0]
    assert all(len(c.split(" ")) == 4 and c == c.lower() for c in b["captions"])
    tok = dm.tokenizer
    assert tok.decode(b["input_ids"][0], skip_special_tokens=True) == b["captions"][0]
    r = dm.retrieval_data("val")
    assert r.texts[0] == "a red square left"  # "a red square left of a ..." cut at 4 words
    with pytest.raises(ValueError, match="caption_preprocess"):
        ShardsDataConfig(caption_preprocess="bert")


# ---------------------------------------------------------------------------------------------------------------------
# what is decoded: images, regions


def _region_sample(i: int, *, image: bool, labels: bool = True) -> dict:
    import io

    from _resume_shards import jpeg

    n = 1 + i % 3
    rng = np.random.default_rng(i)
    arrays = {"features": rng.standard_normal((n, 6)).astype(np.float16),
              "boxes": np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (n, 1)),
              "cls_prob": np.full((n, 5), 0.2, np.float16)}
    if labels:
        arrays["labels"] = np.array([f"obj{i}_{k}" for k in range(n)], dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    s = {"__key__": f"reg-{i}", "regions.npz": buf.getvalue(),
         "json": {"image_id": i, "captions": [f"region caption {i} a", f"region caption {i} b"]}}
    if image:
        s["jpg"] = jpeg(i)
    return s


@pytest.fixture(scope="module")
def region_dirs(world, tmp_path_factory):
    """Two region shard dirs: one without image members (a region-only corpus), one with."""
    out = {}
    for name, image in (("noimg", False), ("img", True)):
        d = tmp_path_factory.mktemp(name)
        write_shard(d / shard_name("train", 0), [_region_sample(i, image=image) for i in range(8)])
        write_index(d, source="reg", split="train", skipped={}, tokenizer=str(Path(world["a"]) / "tokenizer"),
                    regions={"dim": 6}, shards=[{"name": shard_name("train", 0), "samples": 8}])
        out[name] = d
    return out


def test_region_only_pipeline_needs_and_decodes_no_image(region_dirs, monkeypatch):
    from vlp.data.visual import Visual

    decoded = []
    orig = SampleProcessor.decode

    def decode(self, raw):
        out = orig(self, raw)
        decoded.append(type(out.get("jpg")).__name__)
        return out

    monkeypatch.setattr(SampleProcessor, "decode", decode)
    for name in ("noimg", "img"):
        cfg = ShardsDataConfig(train=[SourceConfig(str(region_dirs[name]))], batch_size=4, images=False,
                               regions=True, test=str(region_dirs[name]), eval_batch_size=8)
        dm = ShardDataModule(cfg)
        batches, _ = epoch_batches(dm)
        assert len(batches) == 2 and all("image" not in b and "image_aug" not in b for b in batches)
        b = batches[0]
        n = max(1 + int(k.split("-")[1]) % 3 for k in b["keys"])
        assert b["region_features"].shape == (4, n, 6) and b["region_cls_prob"].shape == (4, n, 5)
        assert b["region_labels"] == [[f"obj{k.split('-')[1]}_{j}" for j in range(1 + int(k.split("-")[1]) % 3)]
                                      for k in b["keys"]]
        assert "mlm_input_ids" in b and len(b["captions"]) == 4
        v = Visual.from_batch(b)
        assert not v.has_pixels and v.has_regions and v.labels == b["region_labels"] and v.batch_size == 4
        r = dm.retrieval_data("test")
        visuals = list(r.visuals)
        assert len(r.visuals) == 8 and len(r.texts) == 16 and "image" not in visuals[0]
        assert Visual.from_batch(visuals[0]).mask.sum(1).tolist() == [1 + i % 3 for i in range(8)]
    assert set(decoded) == {"bytes", "NoneType"}  # the jpg member (where there is one) stays undecoded
    with pytest.raises(ValueError, match="nothing visual"):
        ShardsDataConfig(images=False, regions=False)


def test_images_and_regions_together(region_dirs):
    cfg = ShardsDataConfig(train=[SourceConfig(str(region_dirs["img"]))], batch_size=4, image_size=16, regions=True)
    b = epoch_batches(ShardDataModule(cfg))[0][0]
    assert b["image"].shape == (4, 3, 16, 16) and b["region_mask"].shape[0] == 4 and "region_labels" in b
    cfg = ShardsDataConfig(train=[SourceConfig(str(region_dirs["noimg"]))], batch_size=4, image_size=16,
                           regions=True, max_corrupt_ratio=None)
    with pytest.raises(Exception, match="no image member"):  # images=true on a region-only corpus
        epoch_batches(ShardDataModule(cfg))


def test_source_shares_become_weights_that_give_those_shares_of_the_epoch():
    """data.train[*].share (UNITER's COCO/VG/CC/SBU 20/30/30/20): weight_i = share_i x total / size_i, so the epoch
    keeps the sources' total size and each source fills its share of it; shares for some sources only is an error."""
    from vlp.data.datamodule import share_weights
    from vlp.data.stream import Source

    sizes = {"coco": 500, "vg": 5000, "cc": 3000, "sbu": 1500}
    sources = [Source(path=k, name=k, weight=1.0, shards=("a.tar",), sizes=(n,)) for k, n in sizes.items()]
    out = share_weights(sources, [20, 30, 30, 20])
    total = sum(sizes.values())
    samples = {s.name: s.weight * s.num_samples for s in out}
    for name, share in zip(sizes, (0.2, 0.3, 0.3, 0.2)):
        assert samples[name] == pytest.approx(share * total)
    assert share_weights(sources, [None] * 4) == sources
    with pytest.raises(ValueError, match="every source a share"):
        share_weights(sources, [20, None, 30, 20])
