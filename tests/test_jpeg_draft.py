"""JPEG draft decoding (``data.jpeg_draft``, ``vlp.data.transforms``): a JPEG left undecoded by ``decode_image`` is
decoded by the transform at the largest DCT reduction that keeps ``image_size`` pixels per side of the region it
resamples. The crop box is drawn from the full size exactly as without drafts (same torch draws), the output is
close to the full decode's and has its shape, PNG and ``jpeg_draft=False`` are byte-identical to the full-decode
path, and a training batch keeps its keys, shapes and dtypes. COCO-sized (640 x 480) JPEGs written here."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader
from torchvision import transforms as T

from _resume_shards import caption_texts, make_shards
from vlp.data.collate import ImageViews, SampleProcessor, decode_image
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
from vlp.data.stream import CorruptSample
from vlp.data.tokenizer import train_wordpiece
from vlp.data.transforms import ImageTransform, build_transform, denormalize, draft_factor, is_lazy_jpeg

W, H = 640, 480
# Mean |drafted - full decode| per image in uint8 levels, on the pattern below, measured over 50 seeds: at most
# 2.4 (96 px: 1.3-2.4; 224 px: 0.1-1.8; RandomResizedCrop and both eval resizes). The bound leaves ~1.7x margin;
# a crop box mapped wrongly onto the drafted image (not divided by f, or off by a block) gives tens of levels.
MAX_MEAN_ABS_DIFF = 4.0


def pattern(w: int = W, h: int = H) -> np.ndarray:
    """Horizontal red ramp, vertical green ramp, a 40 px blue checkerboard: every region of it looks different."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), ((xx // 40 + yy // 40) % 2) * 200 + 20],
                    -1).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpg() -> bytes:
    return encode(pattern(), quality=90)


def full_decode(data: bytes) -> Image.Image:
    """What ``decode_image`` returned before drafts: the loaded RGB image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def lazy(data: bytes) -> Image.Image:
    img = decode_image("s.jpg", data)
    assert is_lazy_jpeg(img) and img.size == (W, H)
    return img


@pytest.fixture
def loads(monkeypatch):
    """The sizes at which JPEG pixels get decoded (one entry per real decode)."""
    seen = []
    orig = JpegImagePlugin.JpegImageFile.load

    def load(self):
        pending = bool(self.tile)
        out = orig(self)
        if pending:
            seen.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return seen


@pytest.fixture
def boxes(monkeypatch):
    """Every RandomResizedCrop.get_params call: (image size it was given, params it returned)."""
    seen = []
    orig = T.RandomResizedCrop.get_params

    def get_params(img, scale, ratio):
        out = orig(img, scale, ratio)
        seen.append((img.size, out))
        return out

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(get_params))
    return seen


def _views(t: ImageTransform, img_fn, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return t.uint8(img_fn())


# ---------------------------------------------------------------------------------------------------------------------
# (a) close to the full decode, same shape


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize("mode", ["square", "short_side_crop", "crop"])
def test_drafted_output_is_close_to_the_full_decode(jpg, loads, size, mode):
    if mode == "crop":  # RandomResizedCrop alone: RandomAugment's Equalize/AutoContrast would amplify any difference
        t = ImageTransform(size, augment="albef", crop_min_scale=0.6)  # large crops: some draft at 224 too
        t.post = None
    else:
        t = ImageTransform(size, resize=mode, train=False)
    diffs, reduced = [], 0
    for seed in range(12):
        ref = _views(t, lambda: full_decode(jpg), seed)
        loads.clear()
        out = _views(t, lambda: lazy(jpg), seed)
        assert out.shape == ref.shape == (size, size, 3) and out.dtype == ref.dtype == torch.uint8
        assert len(loads) == 1  # one decode, inside the transform
        reduced += loads[0] != (W, H)
        diffs.append((out.float() - ref.float()).abs().mean().item())
    assert reduced > 0  # the check is about drafted decodes (the eval resizes draft at both sizes)
    assert max(diffs) < MAX_MEAN_ABS_DIFF, diffs
    if mode != "crop":  # deterministic: a reduced decode does change the pixels a little, the same each time
        assert min(diffs) > 0 and len(set(diffs)) == 1


def test_a_wrongly_mapped_box_would_fail_the_bound(jpg):
    """The bound above can fail: the centre box resampled from the 1/4 draft is close to the full decode's, the same
    box divided by 8 instead of 4, or shifted by 4 drafted pixels (one DCT block at 1/2), is far off."""
    box = (160, 120, 480, 360)
    ref = torch.from_numpy(np.array(full_decode(jpg).resize((64, 64), Image.Resampling.BICUBIC, box=box))).float()
    img = Image.open(io.BytesIO(jpg))
    img.draft("RGB", (W // 4, H // 4))
    img = img.convert("RGB")
    assert img.size == (W // 4, H // 4)

    def err(b):
        out = np.array(img.resize((64, 64), Image.Resampling.BICUBIC, box=b))
        return (torch.from_numpy(out).float() - ref).abs().mean().item()

    assert err(tuple(v / 4 for v in box)) < MAX_MEAN_ABS_DIFF
    assert err(tuple(v / 8 for v in box)) > 5 * MAX_MEAN_ABS_DIFF
    assert err((44, 34, 124, 94)) > 5 * MAX_MEAN_ABS_DIFF


# ---------------------------------------------------------------------------------------------------------------------
# (b) the same crop box, drawn from the full size


@pytest.mark.parametrize("augment", ["albef", "tcl"])
def test_crop_params_and_random_draws_are_those_of_the_full_image(jpg, boxes, augment):
    t = ImageTransform(64, augment=augment)
    for seed in range(8):
        boxes.clear()
        torch.manual_seed(seed)
        t.uint8(full_decode(jpg))
        after_full = torch.rand(4)
        torch.manual_seed(seed)
        t.uint8(lazy(jpg))
        after_draft = torch.rand(4)
        (size_full, params_full), (size_draft, params_draft) = boxes
        assert size_full == size_draft == (W, H)  # drawn on the full size, not the drafted one
        assert params_full == params_draft
        assert torch.equal(after_full, after_draft)  # every later draw (colour, RandomAugment) is the same too


def test_the_crop_lands_on_the_same_content(boxes):
    """A constant-colour quadrant: a crop drawn inside it is that colour with or without drafts."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = (200, 30, 30)
    arr[:, W // 2:] = (30, 30, 200)
    data = encode(arr, quality=95)
    t = ImageTransform(32, augment="albef", crop_min_scale=0.05)
    t.post = None
    checked = 0
    for seed in range(100):
        boxes.clear()
        out = _views(t, lambda: lazy(data), seed).float()
        (_, (i, j, h, w)), = boxes
        if j + w < W // 2 - 16 or j > W // 2 + 16:  # inside one half (with a margin for the filters)
            colour = (200, 30, 30) if j + w < W // 2 else (30, 30, 200)
            assert (out - torch.tensor(colour)).abs().max() <= 6, (seed, (i, j, h, w))
            checked += 1
    assert checked >= 8


# ---------------------------------------------------------------------------------------------------------------------
# (c) the largest allowed reduction


@pytest.mark.parametrize("size, decoded", [(32, (80, 60)), (64, (160, 120)), (96, (160, 120)), (120, (160, 120)),
                                           (121, (320, 240)), (240, (320, 240)), (241, (W, H)), (480, (W, H))])
@pytest.mark.parametrize("resize", ["square", "short_side_crop"])
def test_eval_resize_drafts_to_the_largest_scale_that_keeps_size(jpg, loads, size, decoded, resize):
    # 640 x 480: the short side 480 / f must stay >= size (both rules resample a region 480 px high)
    out = ImageTransform(size, resize=resize, train=False).uint8(lazy(jpg))
    assert loads == [decoded] and out.shape == (size, size, 3)


def test_random_crop_drafts_to_the_largest_scale_its_box_allows(jpg, loads, boxes):
    t = ImageTransform(48, augment="albef", crop_min_scale=0.05)
    factors = Counter()
    for seed in range(40):
        loads.clear(), boxes.clear()
        _views(t, lambda: lazy(jpg), seed)
        (_, (i, j, h, w)), = boxes
        f = max(f for f in (1, 2, 4, 8) if w / f >= 48 and h / f >= 48)  # written out here, not draft_factor
        assert loads == [(-(-W // f), -(-H // f))], (seed, (h, w), loads)
        factors[f] += 1
    assert len(factors) >= 3, factors  # the crops spanned several scales
    assert draft_factor(96, 400, 48) == 2 and draft_factor(47, 400, 48) == 1 and draft_factor(480, 400, 48) == 8


def test_two_views_share_a_decode_unless_the_second_needs_a_finer_scale(jpg, loads, boxes):
    t = ImageTransform(64, augment="albef", crop_min_scale=0.05)
    t.post = None
    views = ImageViews(t, two_views=True)
    cases = Counter()
    for seed in range(20):
        loads.clear(), boxes.clear()
        got = views(lazy(jpg), seed)
        f1, f2 = (draft_factor(w, h, 64) for _, (i, j, h, w) in boxes)
        decodes = [(-(-W // f1), -(-H // f1))] + ([(-(-W // f2), -(-H // f2))] if f2 < f1 else [])
        assert loads == decodes, (f1, f2, loads)  # the second view reuses the first's decode when it is fine enough
        cases[f2 < f1] += 1
        want = views(full_decode(jpg), seed)
        for a, b in zip(got[:2], want[:2]):  # either way close to the full decode's views
            assert (a.float() - b.float()).abs().mean() < MAX_MEAN_ABS_DIFF
    assert cases[True] and cases[False], cases
    big = ImageViews(ImageTransform(384, augment="albef"), two_views=True)
    loads.clear()
    big(lazy(jpg), 0)
    assert loads == [(W, H)]  # no reduction possible: the one full decode, shared


# ---------------------------------------------------------------------------------------------------------------------
# (d) PNG and jpeg_draft=False: exactly the full-decode path


@pytest.mark.parametrize("augment", ["none", "albef", "tcl"])
def test_jpeg_draft_false_and_png_give_the_full_decode_bytes(jpg, loads, augment):
    png = encode(pattern(), "PNG")
    for seed in range(4):
        off = ImageTransform(64, augment=augment, jpeg_draft=False)
        on = ImageTransform(64, augment=augment)
        ref = [_views(off, lambda: full_decode(jpg), seed), _views(off, lambda: full_decode(png), seed)]
        loads.clear()
        assert torch.equal(_views(off, lambda: lazy(jpg), seed), ref[0])
        assert loads == [(W, H)]
        img = decode_image("s.png", png)
        assert not is_lazy_jpeg(img) and img.mode == "RGB"
        assert torch.equal(_views(on, lambda: decode_image("s.png", png), seed), ref[1])
        assert torch.equal(_views(off, lambda: decode_image("s.png", png), seed), ref[1])
        if augment != "none":  # two views of one lazy image, draft off: one full decode, the pre-decoded bytes
            views = ImageViews(off, hflip=True, two_views=True)
            loads.clear()
            got = views(lazy(jpg), seed)
            assert loads == [(W, H)]
            want = views(full_decode(jpg), seed)
            assert got[2] == want[2]
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # where no reduction is possible (384 > 480 / 2) the draft path is byte-identical as well
    t = ImageTransform(384, augment="albef")
    assert torch.equal(_views(t, lambda: lazy(jpg), 5), _views(t, lambda: full_decode(jpg), 5))


def test_reference_pipeline_and_grayscale_jpeg():
    """The ``jpeg_draft=False`` output is torchvision's own Resize on the full decode; ``decode_image`` decodes a
    grayscale JPEG to RGB at once, and the transform drafts a lazy one and converts it."""
    data = encode(pattern(), quality=90)
    ref = T.Resize((96, 96), interpolation=T.InterpolationMode.BICUBIC)(full_decode(data))
    off = ImageTransform(96, train=False, jpeg_draft=False).uint8(lazy(data))
    assert torch.equal(off, torch.from_numpy(np.array(ref)))
    gray = encode(pattern()[..., 1], quality=90)
    eager = decode_image("g.jpg", gray)  # decoded to RGB at once: any transform may receive it
    assert eager.mode == "RGB" and not is_lazy_jpeg(eager)
    img = Image.open(io.BytesIO(gray))  # a lazy grayscale JPEG from elsewhere: drafted, then converted
    assert img.mode == "L" and is_lazy_jpeg(img)
    out = ImageTransform(96, train=False).uint8(img)
    full = ImageTransform(96, train=False).uint8(full_decode(gray))
    assert out.shape == full.shape == (96, 96, 3)
    assert torch.equal(out[..., 0], out[..., 2]) and (out.float() - full.float()).abs().mean() < MAX_MEAN_ABS_DIFF


def test_config_switch_reaches_the_transform():
    assert ShardsDataConfig().jpeg_draft is True
    assert build_transform(ShardsDataConfig(), train=True).jpeg_draft is True
    assert build_transform(ShardsDataConfig(jpeg_draft=False), train=False).jpeg_draft is False


def test_a_jpeg_that_fails_to_decode_is_a_bad_image(jpg):
    """Pixels are decoded in the transform now: a truncated JPEG (valid header) is still a corrupt ``bad_image``."""
    proc = SampleProcessor(ImageTransform(32, augment="albef"))
    raw = {"__key__": "t-0", "jpg": jpg[: len(jpg) // 2], "json": b'{"captions": ["a ramp"], "image_id": 0}'}
    with pytest.raises(CorruptSample, match="image member 'jpg' does not decode") as err:
        proc(raw, {})
    assert err.value.reason == "bad_image"


# ---------------------------------------------------------------------------------------------------------------------
# (e) through the data module


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """8 samples of 160 px JPEGs (shrunk COCO: at image_size 32 the eval resize drafts to 1/4)."""
    root = tmp_path_factory.mktemp("draft")
    train_wordpiece(caption_texts() + [f"ball number {i} caption {j}" for i in range(20) for j in range(3)],
                    root / "tok", vocab_size=160)
    return make_shards(root / "shards", [4, 4], tokenizer="../tok", size=160)


def _batches(path, **kw):
    cfg = ShardsDataConfig(train=[SourceConfig(str(path))], batch_size=4, image_size=32, num_workers=0, **kw)
    dm = ShardDataModule(cfg)
    stream = dm.build_train_stream()
    stream.set_epoch(0)
    return list(DataLoader(stream, batch_size=None, num_workers=0))


@pytest.mark.parametrize("augment", ["none", "albef"])
def test_training_batches_keep_keys_shapes_and_dtypes(coco_like, loads, augment):
    kw = dict(augment=augment, hflip=augment != "none", two_views=augment != "none")
    loads.clear()
    on = _batches(coco_like, **kw)
    drafted = list(loads)
    loads.clear()
    off = _batches(coco_like, jpeg_draft=False, **kw)
    assert loads and set(loads) == {(160, 160)}  # full decodes only
    assert any(s != (160, 160) for s in drafted)
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert v.shape == b[k].shape and v.dtype == b[k].dtype, k
                if k not in ("image", "image_aug"):
                    assert torch.equal(v, b[k]), k  # captions, MLM masks, ids: the sample is the same
            elif k != "stream_state":
                assert v == b[k], k
        assert a["image"].shape == (4, 3, 32, 32) and a["image"].dtype == torch.float32
        if augment == "none":
            diff = (denormalize(a["image"]) - denormalize(b["image"])).abs().mean() * 255
            assert 0 < diff < MAX_MEAN_ABS_DIFF
        else:
            assert a["image_aug"].shape == (4, 3, 32, 32)
