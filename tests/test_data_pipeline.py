"""The streaming data pipeline: batch format, MLM masking, transforms, node/worker split, mixtures, corrupt data,
retrieval evaluation data. Tiny 32 px JPEG shards written in a temp dir; resume is in test_resume.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _resume_shards import caption_texts, make_shards
from vlp.data.collate import Collator, mask_tokens, stable_image_id
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
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
    assert b["stream_state"] == {"epoch": 0, "rank": 0, "worker": 0, "batch": 0, "index": 0}


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


def test_mlm_masking_statistics_and_never_special(world):
    dm = ShardDataModule(cfg_for(world, mlm_probability=0.15, max_text_len=32))
    tok = dm.tokenizer
    coll = dm.collator()
    rng = np.random.default_rng(0)
    texts = caption_texts()
    captions = [texts[i] for i in rng.integers(0, len(texts), 3000)]
    text = coll.tokenize(captions)
    ids, maskable = text["input_ids"], text["maskable"]
    seeds = list(range(len(captions)))
    mlm_ids, labels = mask_tokens(ids, maskable, mask_token_id=tok.mask_token_id, candidates=coll.candidates,
                                  probability=0.15, seeds=seeds)
    chosen = labels != -100
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert not (chosen & special).any() and not (chosen & (text["attention_mask"] == 0)).any()
    assert ((ids == tok.pad_token_id) | (ids == tok.cls_token_id) | (ids == tok.sep_token_id))[~maskable].all()
    rate = chosen.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    assert (labels[chosen] == ids[chosen]).all() and (mlm_ids[~chosen] == ids[~chosen]).all()
    n = chosen.sum().item()
    to_mask = (mlm_ids[chosen] == tok.mask_token_id).sum().item() / n
    unchanged = (mlm_ids[chosen] == ids[chosen]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02, (to_mask, unchanged)
    replaced = mlm_ids[chosen & (mlm_ids != tok.mask_token_id) & (mlm_ids != ids)]
    assert not torch.isin(replaced, torch.tensor(tok.all_special_ids)).any()
    assert abs(replaced.numel() / n - 0.1) < 0.02  # (a random token may equal the original: slightly under 10%)
    # per-row seeds: a row's mask depends on its seed only, not on the batch it is in
    again, lab2 = mask_tokens(ids[5:9], maskable[5:9], mask_token_id=tok.mask_token_id, candidates=coll.candidates,
                              probability=0.15, seeds=seeds[5:9])
    assert torch.equal(again, mlm_ids[5:9]) and torch.equal(lab2, labels[5:9])


def test_whole_word_masking_masks_all_pieces_of_a_word(world, tmp_path):
    tok = train_wordpiece(["aa bb cc dd", "xyzzyplugh qwertyuiop"] * 3 + ["x y z q w e r t u i o p l g h"],
                          tmp_path / "tok", vocab_size=60)
    coll = Collator(tok, max_text_len=40, mlm_probability=0.3, whole_word_masking=True)
    captions = ["xyzzyplugh qwertyuiop aa xyzzyplugh"] * 400
    text = coll.tokenize(captions)
    assert text["input_ids"].shape[1] > 8  # the long words really are split into pieces
    _, labels = mask_tokens(text["input_ids"], text["maskable"], mask_token_id=tok.mask_token_id,
                            candidates=coll.candidates, probability=0.3, word_ids=text["word_ids"],
                            seeds=list(range(400)))
    chosen = labels != -100
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


def test_retrieval_data_yields_all_captions_in_order(world):
    dm = ShardDataModule(cfg_for(world, val=world["val"], test=world["val"], image_size=16))
    images, texts, txt2img, img2txt = r = dm.retrieval_data("val")
    assert images.shape == (9, 3, 16, 16)
    assert r.keys == [f"coco-{i}" for i in range(500, 509)] and r.image_ids == list(range(500, 509))
    assert len(texts) == 27 and texts[3].endswith("number 501 caption 0")
    assert txt2img == [i // 3 for i in range(27)] and img2txt == [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(9)]
    again = dm.retrieval_data("test")
    assert torch.equal(again[0], images) and again[1] == texts
    with pytest.raises(ValueError, match="data.val is not set"):
        ShardDataModule(cfg_for(world)).retrieval_data("val")


def test_retrieval_images_lazy_path(world, monkeypatch):
    import vlp.data.datamodule as dmod

    monkeypatch.setattr(dmod, "RETRIEVAL_TENSOR_BUDGET", 10)
    dm = ShardDataModule(cfg_for(world, val=world["val"], image_size=16, eval_batch_size=4))
    images, texts, _, _ = dm.retrieval_data("val")
    chunks = list(images)
    assert len(images) == 9 and [c.shape[0] for c in chunks] == [4, 4, 1]
    monkeypatch.setattr(dmod, "RETRIEVAL_TENSOR_BUDGET", 1 << 30)
    assert torch.equal(torch.cat(chunks), dm.retrieval_data("val")[0])
