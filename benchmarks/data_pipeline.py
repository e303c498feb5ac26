"""Benchmark: the shard pipeline against an ALBEF-style JPEG-folder Dataset, region-only loading, and the cost of
resuming.

Both image pipelines read the same images (``--data DIR`` of JPEGs, or ~1000 synthetic COCO-sized JPEGs,
``--image-size W H``, default 640 x 480, written to a temp dir) and apply the same transform (decode,
RandomResizedCrop(scale 0.2-1, bicubic), ToTensor, CLIP normalisation) in one process (``num_workers=0``, one torch
thread), so samples/s is per core:

- shards: ``vlp.data.stream.ShardStream`` over WebDataset tar shards of those images, batches of 32 with
  tokenization and MLM masking (the full training batch); the crop is ``vlp.data.transforms.ImageTransform``'s, with
  the JPEG draft decode of the config default (``data.jpeg_draft``: the JPEG decoded at the DCT scale the crop
  needs); normalisation runs once per batch on the stacked uint8 crops (the suite's design). ``shards_full_decode``
  is the same pipeline with ``jpeg_draft=false`` (what the draft decode gains);
- reference: a map-style Dataset doing ``PIL.Image.open(path).convert("RGB")`` + the transform, through a shuffling
  ``DataLoader(batch_size=32)``, and the tokenizer called on each batch's captions (as ALBEF's training loop does).

Region-only (UNITER / MVPTR: ``data.regions=true``, ``data.images=false``): the same stream over shards whose
samples carry a ``regions.npz`` (``--regions`` x ``--region-dim`` fp16 features, boxes, ``--region-classes`` fp16
class probabilities) beside the JPEG, which is not decoded; batches with padded regions, tokenization and MLM
masking. Goal: >= 2000 samples/s per core.

Resume: seconds from ``load_state_dict`` to the first batch at 10 %, 50 % and 90 % of an epoch, against starting
at 0 and against fast-forwarding by reading the skipped batches (what a generic stateful loader does).

    python benchmarks/data_pipeline.py [--data DIR] [--n 1000] [--image-size 640 480] [--sizes 224 384]
                                       [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import RESULTS, machine, write_json
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from vlp.data.collate import Collator, SampleProcessor  # noqa: E402
from vlp.data.config import ShardsDataConfig  # noqa: E402
from vlp.data.shards import shard_name, write_index, write_shard  # noqa: E402
from vlp.data.stream import ShardStream, Source  # noqa: E402
from vlp.data.tokenizer import train_wordpiece  # noqa: E402
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform  # noqa: E402

REGION_GOAL = 2000.0  # region-only samples/s per core

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["square", "circle", "triangle", "star", "cross"]


def synthetic_jpegs(out: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[tuple[Path, list[str]]]:
    """``n`` W x H JPEGs (quality 90): smooth colour fields, a disc, and pixel noise so that the entropy-coded data,
    whose decoding no DCT reduction saves, is closer to a photo's (a COCO JPEG is ~160 KB) than flat colours are."""
    rng = np.random.default_rng(0)
    w, h = size
    items = []
    for i in range(n):
        arr = (rng.random((max(1, h // 8), max(1, w // 8), 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(img)
        c, s = rng.integers(len(COLOURS)), rng.integers(len(SHAPES))
        m = min(w, h)
        r = rng.integers(max(1, m // 16), max(2, m // 6))
        x, y = rng.integers(r, max(r + 1, w - r)), rng.integers(r, max(r + 1, h - r))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        path = out / f"{i:06d}.jpg"
        img.save(path, quality=90)
        items.append((path, [f"a {COLOURS[c]} {SHAPES[s]} in picture {i}", f"picture {i} shows a {SHAPES[s]}"]))
    return items


def folder_items(data: Path) -> list[tuple[Path, list[str]]]:
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    return [(p, [f"an image called {p.stem}"]) for p in paths]


def regions_npz(i: int, n: int, dim: int, classes: int) -> bytes:
    """A ``regions.npz`` as ``data_recipes/regions.py`` writes it (stored, not compressed): fp16 features [n, dim],
    float32 xyxy boxes in [0, 1], fp16 class probabilities [n, classes] when ``classes``."""
    rng = np.random.default_rng(i)
    xy = rng.random((n, 2)).astype(np.float32) * 0.5
    arrays = {"features": rng.standard_normal((n, dim)).astype(np.float16),
              "boxes": np.concatenate([xy, xy + 0.1 + rng.random((n, 2)).astype(np.float32) * 0.4], 1)}
    if classes:
        p = rng.random((n, classes)).astype(np.float32)
        arrays["cls_prob"] = (p / p.sum(1, keepdims=True)).astype(np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_shards(items, out: Path, per_shard: int = 250, regions: tuple[int, int, int] | None = None) -> Path:
    """Tar shards of ``items`` (+ index.json); ``regions=(n, dim, classes)`` adds a ``regions.npz`` per sample."""
    shards = []
    for k in range(0, len(items), per_shard):
        chunk = items[k:k + per_shard]
        samples = [{"__key__": f"bench-{k + j}", "jpg": p.read_bytes(),
                    "json": {"image_id": k + j, "source": "bench", "split": "train", "captions": caps}}
                   for j, (p, caps) in enumerate(chunk)]
        if regions:
            for j, sample in enumerate(samples):
                sample["regions.npz"] = regions_npz(k + j, *regions)
        name = shard_name("train", k // per_shard)
        write_shard(out / name, samples)
        shards.append({"name": name, "samples": len(samples)})
    write_index(out, source="bench", split="train", shards=shards, skipped={}, tokenizer="tokenizer",
                regions={"dim": regions[1]} if regions else None)
    return out


class CropNormalize:
    """RandomResizedCrop(scale 0.2-1, bicubic) -> ToTensor -> CLIP normalise (the shared transform).

    ``__call__`` is ALBEF's per-image ToTensor + Normalize (the reference uses it); ``uint8`` stops after the crop,
    and the shard pipeline's Collator normalises the stacked batch in one pass (same values, see
    ``vlp.data.transforms.normalize_uint8_batch``), as ``vlp.data.transforms.ImageTransform`` does.
    """

    def __init__(self, size: int):
        self.crop = T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        self.t = T.Compose([self.crop, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, img, flip=False):
        return self.t(img)

    def uint8(self, img, flip=False):
        return torch.from_numpy(np.array(self.crop(img)))


class ShardCrop(ImageTransform):
    """The shard pipeline's side of the shared transform: ``ImageTransform``'s RandomResizedCrop(scale 0.2-1,
    bicubic) to uint8, without the RandomAugment of ``augment=albef`` (the reference has none), decoding a JPEG at
    the scale its crop needs when ``jpeg_draft`` (the ``data.jpeg_draft`` default unless told)."""

    def __init__(self, size: int, jpeg_draft: bool = ShardsDataConfig.jpeg_draft):
        super().__init__(size, augment="albef", crop_min_scale=0.2, jpeg_draft=jpeg_draft)
        self.post = None


class FolderDataset(Dataset):
    """ALBEF's ``pretrain_dataset``: a list of (image path, caption), PIL open + convert + transform."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caps = self.items[i]
        img = Image.open(path).convert("RGB")
        return self.transform(img), caps[int(torch.randint(len(caps), ()))]


def make_stream(shard_dir: Path, tok, transform, batch_size: int) -> ShardStream:
    return ShardStream([Source.from_dir(str(shard_dir))], batch_size=batch_size,
                       process=SampleProcessor(transform, caption="random"),
                       collate=Collator(tok, max_text_len=30, normalize="clip"), seed=0)


def make_region_stream(shard_dir: Path, tok, batch_size: int) -> ShardStream:
    """UNITER/MVPTR's loading: ``regions.npz`` read, the image member left undecoded (``data.images=false``)."""
    return ShardStream([Source.from_dir(str(shard_dir))], batch_size=batch_size,
                       process=SampleProcessor(None, caption="random", regions=True, images=False),
                       collate=Collator(tok, max_text_len=30, normalize="clip", regions=True), seed=0)


def time_shards(stream: ShardStream) -> float:
    stream.load_state_dict({"epoch": 1, "batches": 0})
    n, t0 = 0, time.perf_counter()
    for b in stream:
        n += len(b["keys"])
    return n / (time.perf_counter() - t0)


def time_folder(items, tok, transform, batch_size: int) -> float:
    loader = DataLoader(FolderDataset(items, transform), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=0)
    n, t0 = 0, time.perf_counter()
    for images, caps in loader:
        tok(list(caps), padding="longest", truncation=True, max_length=30, return_tensors="pt")
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def resume_times(stream: ShardStream, fractions=(0.1, 0.5, 0.9), naive: bool = True) -> dict:
    n = len(stream)
    out = {}
    for name, frac in [("start", 0.0)] + [(f"{int(f * 100)}%", f) for f in fractions]:
        p = min(int(round(frac * n)), n - 1)  # a first batch must remain (tiny --n)
        stream.load_state_dict({"epoch": 0, "batches": p})
        t0 = time.perf_counter()
        next(iter(stream))
        row = {"position_batches": p, "first_batch_s": round(time.perf_counter() - t0, 4)}
        if naive and p:
            stream.load_state_dict({"epoch": 0, "batches": 0})
            t0 = time.perf_counter()
            it = iter(stream)
            for _ in range(p + 1):  # read and throw away the skipped batches, then the first new one
                next(it)
            row["fast_forward_s"] = round(time.perf_counter() - t0, 4)
        out[name] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a folder of JPEGs (default: synthetic --image-size JPEGs)")
    ap.add_argument("--n", type=int, default=1000, help="synthetic images to generate")
    ap.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"),
                    help="size of the synthetic JPEGs (default: COCO's 640 x 480)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed passes per pipeline (best is kept)")
    ap.add_argument("--regions", type=int, default=36, help="regions per sample of the region-only measurement")
    ap.add_argument("--region-dim", type=int, default=2048, help="region feature size (BUTD: 2048)")
    ap.add_argument("--region-classes", type=int, default=1601,
                    help="cls_prob columns (UNITER's MRC-kl: 1601; 0: no cls_prob)")
    ap.add_argument("--out", type=Path, default=RESULTS / "data_pipeline.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            items = folder_items(args.data)
        else:
            (tmp / "jpg").mkdir()
            items = synthetic_jpegs(tmp / "jpg", args.n, tuple(args.image_size))
        shard_dir = tmp / "shards"
        shard_dir.mkdir()
        tok = train_wordpiece([c for _, caps in items for c in caps], shard_dir / "tokenizer", vocab_size=400)
        write_shards(items, shard_dir)
        sizes = Counter(Image.open(p).size for p, _ in items)
        w, h = args.image_size
        result = {"machine": machine("cpu"),
                  "images": len(items), "source": str(args.data) if args.data else f"synthetic {args.n} x {w}x{h} px",
                  "image_sizes": {f"{a}x{b}": k for (a, b), k in sizes.most_common(5)},
                  "mean_jpeg_kb": round(statistics.mean(p.stat().st_size for p, _ in items) / 1024, 1),
                  "jpeg_draft": ShardsDataConfig.jpeg_draft, "batch_size": args.batch_size, "throughput": {},
                  "regions_only": {}, "resume": {}}
        for size in args.sizes:
            transform = CropNormalize(size)
            stream = make_stream(shard_dir, tok, ShardCrop(size), args.batch_size)
            full = make_stream(shard_dir, tok, ShardCrop(size, jpeg_draft=False), args.batch_size)
            time_shards(stream), time_folder(items[:64], tok, transform, args.batch_size)  # warm-up
            shards, no_draft, folder = [], [], []
            for _ in range(args.repeats):
                shards.append(time_shards(stream))
                no_draft.append(time_shards(full))
                folder.append(time_folder(items, tok, transform, args.batch_size))
            row = {"shards_samples_per_s": round(max(shards), 1), "folder_samples_per_s": round(max(folder), 1),
                   "shards_full_decode_samples_per_s": round(max(no_draft), 1),
                   "shards_all_runs": [round(x, 1) for x in shards], "folder_all_runs": [round(x, 1) for x in folder],
                   "shards_full_decode_all_runs": [round(x, 1) for x in no_draft],
                   "ratio_shards_over_folder": round(max(shards) / max(folder), 3),
                   "ratio_of_medians": round(statistics.median(shards) / statistics.median(folder), 3),
                   "ratio_draft_over_full_decode": round(max(shards) / max(no_draft), 3)}
            result["throughput"][f"{size}px"] = row
            print(f"{size:4d} px: shards {row['shards_samples_per_s']:7.1f} samples/s/core "
                  f"(full decode {row['shards_full_decode_samples_per_s']:7.1f}), ALBEF-style folder "
                  f"{row['folder_samples_per_s']:7.1f} samples/s/core -> ratio {row['ratio_shards_over_folder']:.2f}x")
        region_dir = tmp / "region_shards"
        region_dir.mkdir()
        write_shards(items, region_dir, regions=(args.regions, args.region_dim, args.region_classes))
        regions = make_region_stream(region_dir, tok, args.batch_size)
        time_shards(regions)  # warm-up
        runs = [time_shards(regions) for _ in range(args.repeats)]
        result["regions_only"] = {
            "regions": args.regions, "region_dim": args.region_dim, "region_classes": args.region_classes,
            "samples_per_s": round(max(runs), 1), "all_runs": [round(x, 1) for x in runs],
            "goal_samples_per_s": REGION_GOAL, "goal_met": max(runs) >= REGION_GOAL}
        print(f"region-only ({args.regions} x {args.region_dim} features, {args.region_classes} classes, no image "
              f"decode): {max(runs):7.1f} samples/s/core (goal {REGION_GOAL:.0f})")
        size = min(args.sizes)
        stream = make_stream(shard_dir, tok, ShardCrop(size), args.batch_size)
        result["resume"] = {"image_size": size, "batches_per_epoch": len(stream), **resume_times(stream)}
        for name, row in result["resume"].items():
            if isinstance(row, dict):
                ff = f", fast-forward {row['fast_forward_s']:.3f} s" if "fast_forward_s" in row else ""
                print(f"resume at {name:>5} (batch {row['position_batches']:3d}): first batch after "
                      f"{row['first_batch_s']:.3f} s{ff}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
