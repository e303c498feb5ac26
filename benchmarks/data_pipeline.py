"""Benchmark: the shard pipeline against an ALBEF-style JPEG-folder Dataset, and the cost of resuming.

Both pipelines read the same images (``--data DIR`` of JPEGs, or ~1000 synthetic 256 px JPEGs written to a temp dir)
and apply the same transform (decode, RandomResizedCrop(scale 0.2-1, bicubic), ToTensor, CLIP normalisation) in one
process (``num_workers=0``, one torch thread), so samples/s is per core:

- shards: ``vlp.data.stream.ShardStream`` over WebDataset tar shards of those images, batches of 32 with
  tokenization and MLM masking (the full training batch); normalisation runs once per batch on the stacked uint8
  crops (the suite's design);
- reference: a map-style Dataset doing ``PIL.Image.open(path).convert("RGB")`` + the transform, through a shuffling
  ``DataLoader(batch_size=32)``, and the tokenizer called on each batch's captions (as ALBEF's training loop does).

Resume: seconds from ``load_state_dict`` to the first batch at 10 %, 50 % and 90 % of an epoch, against starting
at 0 and against fast-forwarding by reading the skipped batches (what a generic stateful loader does).

    python benchmarks/data_pipeline.py [--data DIR] [--n 1000] [--sizes 96 256] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
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
from vlp.data.shards import shard_name, write_index, write_shard  # noqa: E402
from vlp.data.stream import ShardStream, Source  # noqa: E402
from vlp.data.tokenizer import train_wordpiece  # noqa: E402
from vlp.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["square", "circle", "triangle", "star", "cross"]


def synthetic_jpegs(out: Path, n: int, size: int = 256) -> list[tuple[Path, list[str]]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        arr = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(img)
        c, s = rng.integers(len(COLOURS)), rng.integers(len(SHAPES))
        x, y, r = rng.integers(40, size - 40), rng.integers(40, size - 40), rng.integers(15, 40)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = out / f"{i:06d}.jpg"
        img.save(path, quality=90)
        items.append((path, [f"a {COLOURS[c]} {SHAPES[s]} in picture {i}", f"picture {i} shows a {SHAPES[s]}"]))
    return items


def folder_items(data: Path) -> list[tuple[Path, list[str]]]:
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    return [(p, [f"an image called {p.stem}"]) for p in paths]


def write_shards(items, out: Path, per_shard: int = 250) -> Path:
    shards = []
    for k in range(0, len(items), per_shard):
        chunk = items[k:k + per_shard]
        samples = [{"__key__": f"bench-{k + j}", "jpg": p.read_bytes(),
                    "json": {"image_id": k + j, "source": "bench", "split": "train", "captions": caps}}
                   for j, (p, caps) in enumerate(chunk)]
        name = shard_name("train", k // per_shard)
        write_shard(out / name, samples)
        shards.append({"name": name, "samples": len(samples)})
    write_index(out, source="bench", split="train", shards=shards, skipped={}, tokenizer="tokenizer")
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
        return torch.from_numpy(np.asarray(self.crop(img)).copy())


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
        p = int(round(frac * n))
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
    ap.add_argument("--data", type=Path, help="a folder of JPEGs (default: synthetic 256 px images)")
    ap.add_argument("--n", type=int, default=1000, help="synthetic images to generate")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 256])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed passes per pipeline (best is kept)")
    ap.add_argument("--out", type=Path, default=RESULTS / "data_pipeline.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            items = folder_items(args.data)
        else:
            (tmp / "jpg").mkdir()
            items = synthetic_jpegs(tmp / "jpg", args.n)
        shard_dir = tmp / "shards"
        shard_dir.mkdir()
        tok = train_wordpiece([c for _, caps in items for c in caps], shard_dir / "tokenizer", vocab_size=400)
        write_shards(items, shard_dir)
        result = {"machine": machine("cpu"),
                  "images": len(items), "source": str(args.data) if args.data else f"synthetic {args.n} x 256 px",
                  "batch_size": args.batch_size, "throughput": {}, "resume": {}}
        for size in args.sizes:
            transform = CropNormalize(size)
            stream = make_stream(shard_dir, tok, transform, args.batch_size)
            time_shards(stream), time_folder(items[:64], tok, transform, args.batch_size)  # warm-up
            shards, folder = [], []
            for _ in range(args.repeats):
                shards.append(time_shards(stream))
                folder.append(time_folder(items, tok, transform, args.batch_size))
            row = {"shards_samples_per_s": round(max(shards), 1), "folder_samples_per_s": round(max(folder), 1),
                   "shards_all_runs": [round(x, 1) for x in shards], "folder_all_runs": [round(x, 1) for x in folder],
                   "ratio_shards_over_folder": round(max(shards) / max(folder), 3),
                   "ratio_of_medians": round(statistics.median(shards) / statistics.median(folder), 3)}
            result["throughput"][f"{size}px"] = row
            print(f"{size:4d} px: shards {row['shards_samples_per_s']:7.1f} samples/s/core, ALBEF-style folder "
                  f"{row['folder_samples_per_s']:7.1f} samples/s/core -> ratio {row['ratio_shards_over_folder']:.2f}x")
        size = min(args.sizes)
        stream = make_stream(shard_dir, tok, CropNormalize(size), args.batch_size)
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
