"""Region features -> ``regions.npz`` added to existing shards (DESIGN §3), for UNITER and MVPTR.

Reads split directories written by another recipe (``--shards IN``: ``index.json`` + ``<split>-%06d.tar``) and
either writes ``--out OUT``, a new split directory (the same shard names, every original member of every sample byte
for byte, plus ``<key>.regions.npz``; the input is never modified), or with ``--in-place`` adds ``regions.npz`` to
the ``--shards`` directories themselves (several at once: one class list and region spec for all). Either way the
directory's ``index.json`` gets the region-feature spec in its ``regions`` field, which readers check (the data
module refuses ``data.regions=true`` without it, and train sources whose specs differ).

Four sources (exactly one):

``--npz-dir DIR``  UNITER's per-image detector dumps (BUTD Faster R-CNN): one ``.npz`` per image, named ``<id>.npz``
    or with a prefix (``coco_train2014_000000391895.npz``), matched to a sample by the integer id (the trailing
    digits of the file stem vs the json ``image_id``). Keys: ``features`` [N, D], ``norm_bb`` [N, 6 or 7] (x1, y1, x2,
    y2 normalised first), optional ``conf`` [N], ``soft_labels`` [N, C] (C = 1601: background + 1600 VG objects).
``--tsv FILE``     a BUTD/VinVL-style TSV, one line per image: ``image_id, image_w, image_h, num_boxes, boxes, features
    [, cls_prob]`` (boxes: base64 float32 [N, 4] xyxy pixels; features: base64 float32 [N, D]; cls_prob: base64
    float32 [N, C]). A first line naming the columns is used as the header; ``--tsv-fields a,b,...`` names the columns
    of a headerless file in another order (``img_id``/``img_w``/``img_h`` accepted; unknown columns ignored).
    Lines that cannot be parsed are counted as ``malformed_line``.
``--extract``      features computed here from real images: a timm backbone (``--backbone resnet50``) over the image
    resized to ``--image-size``, its last feature map RoI-aligned (``torchvision.ops.roi_align``, ``--roi-size`` x
    ``--roi-size``, then mean-pooled) over the whole image (region 0, the "global" region) and every
    ``objects.boxes`` of the json (or of ``--objects``). Weights: ``--weights FILE`` (a state dict of that timm
    model, .pth or .safetensors), or with ``--pretrained`` timm's weights if they are in the local cache (no
    download); otherwise a random backbone seeded with ``torch.manual_seed(0)``, recorded as ``"pretrained": false``.
    ``cls_prob`` is the one-hot of each object's label in the class list (``--classes``, else ``__background__`` +
    the sorted labels of the splits; the global region is background).
``--simulate``     the embedded default's simulated detector (``data_recipes/_regions_sim.py``): the known object
    boxes plus 0-3 context boxes per image (background patches, duplicates, the whole image), 128-d features from the
    pixels under each box (a 6x6 RGB RoI grid + a fixed random conv bank, RoI-aligned; nothing trained or loaded),
    a soft, mostly right, content-dependent ``cls_prob`` over ``__background__`` + the object classes, and the
    ground-truth names as ``labels``; deterministic by ``--seed`` and the image bytes.

``--objects a.json b.json``: COCO instances files giving the boxes of samples whose json has no ``objects`` (VQA
shards: the instances of the same COCO images); a sample found in neither is ``missing_objects``.

``regions.npz`` per sample: ``features`` [N, D] fp16, ``boxes`` [N, 4] float32 xyxy normalised to [0, 1], ``cls_prob``
[N, C] fp16 (when the source has class probabilities), ``conf`` [N] fp16 (npz sources that carry it), ``labels`` [N]
(unicode) object names (npz/tsv: of the argmax class, background excluded) when a class list is known. Regions keep
source order (UNITER truncates to the first num_bb by ``conf``). ``--classes FILE``: one name per line (the 1600 VG
objects, with or without ``__background__`` first: a list one shorter than C gets it prepended), or an
``index.json`` whose ``regions.classes`` to reuse (so that every split and source gets the same class indices; the
data module refuses train sources with different region specs).

``index.json`` ``regions`` (the same dict for every directory of one run): ``dim``, ``box_format`` ("xyxy_norm"),
``num_classes``, ``classes`` (index = ``cls_prob`` column), ``fields`` (the npz keys), ``source`` (npz | tsv |
extract | simulate), ``backbone`` and how the features were made (``pretrained``, ``weights``, ``image_size``, ...;
``--simulate`` adds ``feature_layout``, ``method``, ``cls_prob``, ``context_regions``, ``labels``, ``seed``).
Per-directory counts go to ``meta.regions_build``.

With ``--out``, a sample whose image has no features in the source is dropped, counted as ``missing_regions``
(UNITER/MVPTR cannot use it; an image-only sample would silently change what "a sample" means); corrupt source files
are dropped as ``corrupt_regions``, images with zero regions as ``empty_regions``. With ``--in-place`` any of these is
an error (the directory is the one pixel models read: it must keep every sample). A source file without the expected
keys, or with a feature/class dimension other than the first image's, is an error naming the file.

Shards are written atomically, each followed by its sidecar: ``<shard>.json`` with ``--out`` (as every recipe
does), ``<shard>.regions.json`` in place (the writing recipe's ``<shard>.json`` stays, so its re-run finds the shard
finished and keeps the spec). ``--force`` rewrites every shard. A re-run skips every shard already holding what this run would write (``--out``:
the input shard's bytes, the options and the source: the npz folder's file names, sizes and mtimes; the TSV's size
and mtime; the weights file's hash; in place: the options and the shard's own hash). While shards are being
rewritten ``OUT/index.json`` is absent (``--in-place``: present, with ``regions`` null), so a reader never takes a
half-done directory for a finished one.

Real detector output, the same command (``make data-coco`` etc. first)::

    python -m data_recipes.regions --shards SHARDS/coco/train --out R/coco/train --npz-dir img_db/coco_train2014 \\
        --classes objects_vocab.txt                      # UNITER's npz dumps (+ the 1600 VG names)
    python -m data_recipes.regions --shards SHARDS/coco/train --out R/coco/train \\
        --tsv trainval_36/trainval_resnet101_faster_rcnn_genome_36.tsv   # BUTD generate_tsv.py output

(VinVL's own pair of files, ``features.tsv`` rows ``image_id, num_boxes, base64 [N, 2054]`` + ``predictions.tsv``
with the boxes and classes as json, is not read directly: join them into the one-line-per-image layout above, with
a header line naming the columns.)

Features from real images with a pretrained backbone given by path (boxes from the json's objects, e.g. COCO
instances; VQA shards take them from ``--objects``)::

    python -m data_recipes.regions --shards SHARDS/coco/train --out R/coco/train --extract --backbone resnet50 \\
        --weights /models/resnet50.safetensors --image-size 448 --workers 4
    python -m data_recipes.regions --shards SHARDS/vqa/train --out R/vqa/train --extract --backbone resnet50 \\
        --weights /models/resnet50.safetensors --objects COCO/annotations/instances_train2014.json \\
        --classes R/coco/train/index.json

The embedded default (``make shapes-regions``)::

    python -m data_recipes.regions --simulate --in-place --workers 2 --shards data/shards/shapes/coco/train ... \\
        --objects data/raw/shapes/coco/annotations/instances_{train,val}2017.json
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_recipes import _common as C
from vlp.data.shards import ShardFormatError, read_index, write_index, write_shard
from vlp.utils.io import atomic_write_text

VERSION = 1  # bump when the output of the same input and options changes (invalidates finished shards)
BOX_FORMAT = "xyxy_norm"
BACKGROUND = "__background__"
_BACKGROUNDS = {"__background__", "background", "__bg__", "bg"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DETECTOR = "butd-frcnn-r101-vg"  # the ``backbone`` recorded for precomputed features unless --backbone says otherwise
TSV_COLUMNS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
_TSV_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h", "soft_labels": "cls_prob",
                "num_bbox": "num_boxes", "bbox": "boxes"}
_NPZ_EXPECTED = ("a UNITER/BUTD region-feature npz with keys features [N, D], norm_bb [N, 6 or 7] "
                 "(and optionally conf [N], soft_labels [N, C])")


# -- ids --------------------------------------------------------------------------------------------------------------
_TRAILING_INT = re.compile(r"(\d+)$")


def id_key(x: Any) -> int | str:
    """What images are matched by: the integer id (``391895``, ``"391895"``, ``coco_train2014_000000391895[.npz]``
    all give 391895), else the stripped string."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    s = str(x).strip().rsplit("/", 1)[-1]
    for ext in (".npz", ".jpg", ".jpeg", ".png", ".webp"):
        if s.lower().endswith(ext):
            s = s[: -len(ext)]
    m = _TRAILING_INT.search(s)
    return int(m.group(1)) if m else s


def sample_id(key: str, js: dict | None) -> int | str:
    if isinstance(js, dict) and js.get("image_id") is not None:
        return id_key(js["image_id"])
    return id_key(key.split("-", 1)[-1])


# -- reading input shards, writing npz ---------------------------------------------------------------------------------
def iter_tar_samples(path: str | Path, fields: set[str] | None = None):
    """``(key, {field: bytes})`` of a webdataset tar in order (consecutive members with the same key; webdataset's
    rule: the key ends at the first '.' of the file name). ``fields`` restricts what is read."""
    key, cur = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, fname = m.name.rpartition("/")
                if "." not in fname:
                    continue
                k, field = fname.split(".", 1)
                k = f"{d}/{k}" if d else k
                if k != key:
                    if key is not None:
                        yield key, cur
                    key, cur = k, {}
                if fields is None or field in fields:
                    cur[field] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError) as e:
        raise C.RecipeError(f"{path}: not a readable tar shard ({e})") from None
    if key is not None:
        yield key, cur


def _json(members: dict) -> dict | None:
    try:
        js = json.loads(members["json"])
        return js if isinstance(js, dict) else None
    except (KeyError, ValueError):
        return None


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.load`` reads) with fixed member order and timestamps, so equal arrays -> equal bytes
    (``np.savez`` stamps the current time into the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- classes --------------------------------------------------------------------------------------------------------
def read_classes(path: str | Path) -> list[str]:
    """A class list: a text file (one name per line; VG's objects_vocab.txt style ``name,alias`` keeps the first
    name) or an ``index.json`` whose ``regions.classes`` to reuse."""
    path = C.require(Path(path), "a class list (one name per line, or an index.json with regions.classes)")
    if path.suffix == ".json":
        data = C.load_json(path, "an index.json with regions.classes")
        classes = (data.get("regions") or {}).get("classes") if isinstance(data, dict) else None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise C.RecipeError(f"{path}: expected an index.json whose 'regions.classes' is a list of names")
        return classes
    names = [line.strip().split(",")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise C.RecipeError(f"{path}: expected one class name per line, found none")
    return names


def _fit_classes(classes: list[str] | None, n: int | None, what: str, path: Any) -> list[str] | None:
    """The class list for probabilities of width ``n``: as given, or with the background prepended if one short."""
    if classes is None:
        return None
    if n is None:
        raise C.RecipeError(f"--classes {path} given, but {what} has no class probabilities to take labels from")
    if len(classes) == n:
        return classes
    if len(classes) == n - 1 and classes[0].lower() not in _BACKGROUNDS:
        return [BACKGROUND, *classes]
    raise C.RecipeError(f"--classes {path} holds {len(classes)} names, but {what} has {n} classes (expected {n} "
                        f"names, or {n - 1} without the background)")


def _argmax_labels(cls_prob: np.ndarray, classes: list[str]) -> np.ndarray:
    start = 1 if classes[0].lower() in _BACKGROUNDS and len(classes) > 1 else 0
    idx = np.argmax(cls_prob[:, start:].astype(np.float32), axis=1) + start
    return np.array([classes[i] for i in idx], dtype=str)


# -- source: UNITER npz -----------------------------------------------------------------------------------------------
def npz_listing(npz_dir: str | Path) -> dict[int | str, str]:
    """id -> file name of every ``.npz`` in ``npz_dir``; two files with the same id are an error."""
    d = C.require(Path(npz_dir), "a folder of per-image .npz region features (--npz-dir)")
    if not d.is_dir():
        raise C.RecipeError(f"--npz-dir {d}: not a folder")
    out: dict[int | str, str] = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".npz"):
            continue
        k = id_key(name)
        if k in out:
            raise C.RecipeError(f"{d}: {out[k]} and {name} both give image id {k}; keep one")
        out[k] = name
    return out


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one UNITER npz; Skip('corrupt_regions') if unreadable, RecipeError if keys or shapes are wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an npz archive")
            keys = set(z.files)
            for k in ("features", "norm_bb"):
                if k not in keys:
                    raise C.RecipeError(f"{path}: missing key {k!r}; expected {_NPZ_EXPECTED}; found keys "
                                        f"{sorted(keys)}")
            arrays = {k: z[k] for k in ("features", "norm_bb", "conf", "soft_labels") if k in keys}
    except C.RecipeError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise C.Skip("corrupt_regions", f"{path}: {e}") from None
    f, bb = arrays["features"], arrays["norm_bb"]
    if f.ndim != 2:
        raise C.RecipeError(f"{path}: 'features' has shape {f.shape}; expected [N, D]")
    n = f.shape[0]
    if bb.ndim != 2 or bb.shape[0] != n or bb.shape[1] < 4:
        raise C.RecipeError(f"{path}: 'norm_bb' has shape {bb.shape}; expected [{n}, 6 or 7] (N as in features)")
    if "conf" in arrays and arrays["conf"].reshape(-1).shape[0] != n:
        raise C.RecipeError(f"{path}: 'conf' has shape {arrays['conf'].shape}; expected [{n}]")
    if "soft_labels" in arrays and (arrays["soft_labels"].ndim != 2 or arrays["soft_labels"].shape[0] != n):
        raise C.RecipeError(f"{path}: 'soft_labels' has shape {arrays['soft_labels'].shape}; expected [{n}, C]")
    return arrays


class NpzSource:
    def __init__(self, opts: dict):
        self.dir, self.expect, self.classes = Path(opts["npz_dir"]), opts["expect"], opts["classes"]
        self.files = npz_listing(self.dir)
        self.batch_size = 1

    def regions(self, items: list, job: dict) -> list:
        out = []
        for key, members, js in items:
            name = self.files.get(sample_id(key, js))
            if name is None:
                out.append(C.Skip("missing_regions", key))
                continue
            path = self.dir / name
            try:
                a = load_npz(path)
            except C.Skip as s:
                out.append(s)
                continue
            cls = a.get("soft_labels") if self.expect["num_classes"] else None
            for k, want in (("conf", self.expect["conf"]), ("soft_labels", self.expect["num_classes"])):
                if want and k not in a:
                    raise C.RecipeError(f"{path}: missing key {k!r}; expected the keys of {self.expect['ref']} "
                                        f"({', '.join(self.expect['npz_keys'])})")
            out.append(_finish(a["features"], a["norm_bb"][:, :4], cls, str(path), self.expect, self.classes,
                               conf=a.get("conf") if self.expect["conf"] else None))
        return out


def _finish(feats: np.ndarray, boxes: np.ndarray, cls: np.ndarray | None, where: str, expect: dict,
            classes: list[str] | None, conf: np.ndarray | None = None) -> dict | C.Skip:
    """Checked arrays -> the regions.npz dict (fp16 features/cls_prob, float32 boxes clipped to [0, 1])."""
    n, d = feats.shape
    if n == 0:
        return C.Skip("empty_regions", where)
    if d != expect["dim"]:
        raise C.RecipeError(f"{where}: features have dimension {d}, but {expect['ref']} has {expect['dim']}; "
                            "all images of a split must come from the same extractor")
    if cls is not None and cls.shape[1] != expect["num_classes"]:
        raise C.RecipeError(f"{where}: class probabilities have {cls.shape[1]} classes, but {expect['ref']} has "
                            f"{expect['num_classes']}")
    f16 = feats.astype(np.float16)
    if not np.isfinite(f16).all():
        return C.Skip("nonfinite_features", where)
    b = np.clip(np.nan_to_num(boxes.astype(np.float32)), 0.0, 1.0)
    out = {"features": f16, "boxes": np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                                                np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], 1)}
    if cls is not None:
        out["cls_prob"] = cls.astype(np.float16)
        if classes is not None:
            out["labels"] = _argmax_labels(cls, classes)
    if conf is not None:
        out["conf"] = conf.reshape(-1).astype(np.float16)
    return out


# -- source: BUTD TSV -------------------------------------------------------------------------------------------------
def _raise_csv_limit() -> None:
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def tsv_layout(path: Path, fields: str | list[str] | None = None) -> tuple[dict[str, int], int, bool]:
    """``(column -> index, number of columns, has header)`` of a TSV: from ``fields``, a header line, or BUTD order
    (6 columns, or 7 with ``cls_prob``)."""
    _raise_csv_limit()
    with open(path, "rb") as f:
        first = f.readline().rstrip(b"\r\n").decode("utf-8", errors="replace")
    head = first.split("\t")
    header = _TSV_ALIASES.get(head[0].strip(), head[0].strip()) == "image_id"
    if fields is not None:
        names = [s.strip() for s in fields.split(",")] if isinstance(fields, str) else list(fields)
    elif header:
        names = [h.strip() for h in head]
    else:
        names = list(TSV_COLUMNS) + (["cls_prob"] if len(head) == len(TSV_COLUMNS) + 1 else [])
    cols = {}
    for i, n in enumerate(names):
        cols.setdefault(_TSV_ALIASES.get(n, n), i)
    missing = [c for c in TSV_COLUMNS if c not in cols]
    if missing:
        raise C.RecipeError(f"{path}: no column {missing[0]!r} among {names}; expected the BUTD columns "
                            f"{', '.join(TSV_COLUMNS)} [, cls_prob] (a header line or --tsv-fields names them)")
    return cols, len(names), header


def parse_tsv_line(line: bytes, cols: dict[str, int], ncols: int) -> tuple[int | str, dict]:
    """One TSV line -> ``(id, {"features", "boxes" (normalised), "cls_prob"?})``; ValueError if malformed."""
    try:
        row = next(csv.reader([line.decode("utf-8").rstrip("\r\n")], delimiter="\t"))
    except (UnicodeDecodeError, csv.Error, StopIteration) as e:
        raise ValueError(f"unreadable line ({e})") from None
    if len(row) != ncols:
        raise ValueError(f"{len(row)} columns, expected {ncols}")
    iid = id_key(row[cols["image_id"]])
    if iid == "":
        raise ValueError("empty image_id")
    w, h, n = float(row[cols["image_w"]]), float(row[cols["image_h"]]), int(row[cols["num_boxes"]])
    if not (w > 0 and h > 0 and n >= 0):
        raise ValueError(f"image_w {w}, image_h {h}, num_boxes {n}")

    def arr(col: str, width: int | None) -> np.ndarray:
        try:
            a = np.frombuffer(base64.b64decode(row[cols[col]], validate=True), dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{col}: bad base64 ({e})") from None
        if width is None:
            if n == 0 or a.size % n:
                raise ValueError(f"{col}: {a.size} floats for {n} boxes")
            width = a.size // n
        if a.size != n * width:
            raise ValueError(f"{col}: {a.size} floats, expected {n} x {width}")
        return a.reshape(n, width)

    boxes = arr("boxes", 4) / np.array([w, h, w, h], np.float32)
    out = {"boxes": boxes, "features": arr("features", None) if n else np.zeros((0, 0), np.float32)}
    if "cls_prob" in cols and n:
        out["cls_prob"] = arr("cls_prob", None)
    return iid, out


def scan_tsv(path: Path, cols: dict, ncols: int, header: bool, wanted: set | None) -> tuple[dict, Counter]:
    """id -> byte offset of its line (for the ``wanted`` ids), and counts: ``malformed_line`` (wrong column count
    or no id), ``duplicate_line`` (an id seen before; the first line is used), ``lines``."""
    offsets: dict = {}
    stats: Counter = Counter()
    id_col = cols["image_id"]
    with open(path, "rb") as f:
        off = 0
        for i, line in enumerate(f):
            start, off = off, off + len(line)
            s = line.rstrip(b"\r\n")
            if (i == 0 and header) or not s.strip():
                continue
            stats["lines"] += 1
            parts = s.split(b"\t", id_col + 1)
            if s.count(b"\t") + 1 != ncols or len(parts) <= id_col:
                stats["malformed_line"] += 1
                continue
            k = id_key(parts[id_col].decode("utf-8", errors="replace"))
            if k == "":
                stats["malformed_line"] += 1
                continue
            if wanted is not None and k not in wanted:
                continue
            if k in offsets:
                stats["duplicate_line"] += 1
            else:
                offsets[k] = start
    return offsets, stats


def _peek_tsv(path: Path, cols: dict, ncols: int, header: bool, limit: int = 1000) -> dict:
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if (i == 0 and header) or not line.strip():
                continue
            if i > limit:
                break
            try:
                iid, a = parse_tsv_line(line, cols, ncols)
            except ValueError:
                continue
            if a["features"].shape[0]:
                cls = a.get("cls_prob")
                return {"dim": int(a["features"].shape[1]), "num_classes": None if cls is None else int(cls.shape[1]),
                        "conf": False, "ref": f"{path} line {i + 1} (image {iid})"}
    raise C.RecipeError(f"{path}: none of the first {limit} lines is a valid BUTD line with boxes "
                        f"({', '.join(TSV_COLUMNS)} [, cls_prob], base64 float32 arrays)")


class TsvSource:
    def __init__(self, opts: dict):
        _raise_csv_limit()
        self.path, self.expect, self.classes = Path(opts["tsv"]), opts["expect"], opts["classes"]
        self.cols, self.ncols = opts["tsv_cols"], opts["tsv_ncols"]
        self.batch_size = 1

    def regions(self, items: list, job: dict) -> list:
        out = []
        offsets = job["offsets"]
        with open(self.path, "rb") as f:
            for key, members, js in items:
                off = offsets.get(sample_id(key, js))
                if off is None:
                    out.append(C.Skip("missing_regions", key))
                    continue
                f.seek(off)
                try:
                    _, a = parse_tsv_line(f.readline(), self.cols, self.ncols)
                except ValueError as e:
                    job["stats"]["malformed_line"] += 1
                    out.append(C.Skip("missing_regions", f"{key}: {self.path} @{off}: {e}"))
                    continue
                if self.expect["num_classes"] and "cls_prob" not in a and a["features"].shape[0]:
                    raise C.RecipeError(f"{self.path} @byte {off}: no cls_prob, but {self.expect['ref']} has one")
                cls = a.get("cls_prob") if self.expect["num_classes"] else None
                out.append(_finish(a["features"], a["boxes"], cls, f"{self.path} (image {sample_id(key, js)})",
                                   self.expect, self.classes))
        return out


# -- images and objects of a sample (--extract, --simulate) -----------------------------------------------------------
def image_member(members: dict, key: str, job: dict) -> str | None:
    """The one image field of a sample, None if it has none; several images are an error (one box set each)."""
    fields = [f for f in members if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    if len(fields) > 1:
        raise C.RecipeError(f"{job['in']}: sample {key} holds several images ({', '.join(fields)}); --extract and "
                            "--simulate handle one image per sample")
    return fields[0] if fields else None


def load_objects(paths: list) -> dict[int | str, dict]:
    """image id -> ``{"boxes": xyxy pixels, "labels": names}`` from COCO instances files (``--objects``)."""
    from data_recipes.coco import _load_objects

    files = [C.require(Path(p), "a COCO instances file (--objects)") for p in paths]
    return {id_key(k): v for k, v in _load_objects(files).items()}


def objects_of(key: str, js: dict | None, job: dict) -> tuple[np.ndarray, list[str]] | C.Skip:
    """``(boxes [n, 4] xyxy pixels, labels)`` of a sample: its json's ``objects``, else (``--objects``) the
    instances of its image id (missing there: ``Skip("missing_objects")``), else none."""
    objs = js.get("objects") if isinstance(js, dict) else None
    if not isinstance(objs, dict):
        lookup = job.get("objects")
        if lookup is None:
            objs = {}
        else:
            objs = lookup.get(sample_id(key, js))
            if objs is None:
                return C.Skip("missing_objects", key)
    try:
        b = np.asarray(objs.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        return C.Skip("bad_boxes", key)
    labels = [str(x) for x in objs.get("labels") or []]
    if len(labels) != len(b) or not np.isfinite(b).all():
        return C.Skip("bad_boxes", key)
    return b, labels


# -- source: timm backbone + RoI-align ---------------------------------------------------------------------------------
def resolve_weights(backbone: str, pretrained: bool, weights: str | None) -> tuple[str | None, str]:
    """``(local weights file or None, description)``: ``weights`` if given, else with ``pretrained`` timm's weights
    from the local Hugging Face or torch hub cache (never downloaded); None -> a seeded random backbone."""
    if weights:
        p = C.require(Path(weights), f"the {backbone} weights file (--weights)")
        return str(p.resolve()), f"file:{p.name}"
    if not pretrained:
        return None, "random(seed=0)"
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - an unknown name fails clearly in create_model
        cfg = None
    if cfg is not None:
        if getattr(cfg, "hf_hub_id", None):
            try:
                from huggingface_hub import try_to_load_from_cache

                for fname in ([cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else
                              ["model.safetensors", "pytorch_model.bin"]):
                    hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                    if isinstance(hit, str) and os.path.isfile(hit):
                        return hit, f"hf-hub:{cfg.hf_hub_id}"
            except ImportError:
                pass
        if getattr(cfg, "url", None):
            import torch

            hit = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
            if hit.is_file():
                return str(hit), f"url:{os.path.basename(cfg.url)}"
    warnings.warn(f"regions: no local pretrained weights for {backbone!r} (offline: only the Hugging Face / torch hub "
                  f"cache is looked at); using a random backbone seeded with 0, recorded as pretrained=false",
                  stacklevel=3)
    return None, "random(seed=0)"


def read_images(items: list, job: dict, size: int) -> tuple[list, list]:
    """Decode the images of ``items`` (``(key, members, json)``) for region features: ``(out, ready)`` where ``out``
    holds a ``Skip`` for every sample that cannot be used (no image, no objects, undecodable) and ``None`` elsewhere,
    and ``ready`` one ``(index, key, image bytes, uint8 [size, size, 3], boxes [n, 4] xyxy in [0, 1], names)`` per
    usable sample; boxes are normalised by the json's width/height (else the decoded size), clipped and ordered."""
    from PIL import Image

    out: list = [None] * len(items)
    ready = []
    for i, (key, members, js) in enumerate(items):
        field = image_member(members, key, job)
        if field is None:
            out[i] = C.Skip("missing_image", key)
            continue
        objs = objects_of(key, js, job)
        if isinstance(objs, C.Skip):
            out[i] = objs
            continue
        data = members[field]
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                decoded = im.size
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - PIL raises many types on bad bytes
            out[i] = C.Skip("corrupt_image", f"{key}: {type(e).__name__}: {e}")
            continue
        w = js.get("width") if isinstance(js, dict) else None
        h = js.get("height") if isinstance(js, dict) else None
        ok = isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0
        w, h = (w, h) if ok else decoded
        b, names = objs
        nb = np.clip(b / np.array([w, h, w, h], np.float64), 0.0, 1.0)
        nb = np.stack([nb[:, [0, 2]].min(1), nb[:, [1, 3]].min(1), nb[:, [0, 2]].max(1), nb[:, [1, 3]].max(1)], 1)
        ready.append((i, key, data, arr, nb, list(names)))
    return out, ready


class Extractor:
    """A timm backbone (eval, fp32) whose last feature map is RoI-aligned over normalised boxes."""

    def __init__(self, opts: dict):
        import timm
        import torch

        self.image_size, self.roi_size = int(opts["image_size"]), int(opts["roi_size"])
        self.batch_size, self.classes = int(opts["batch_size"]), opts["classes"]
        self.device = torch.device(opts["device"])
        file = opts["weights_file"]
        kwargs: dict[str, Any] = {"num_classes": 0}
        if file:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": file})
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(0)
            try:
                model = timm.create_model(opts["backbone"], **kwargs)
            except RuntimeError as e:
                if "Unknown model" in str(e):
                    raise C.RecipeError(f"--backbone {opts['backbone']!r}: not a timm model ({e})") from None
                raise
        self.model = model.eval().to(self.device)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = int(model.num_features)
        self.expect = {"dim": self.dim, "num_classes": len(self.classes) if self.classes else None, "conf": False,
                       "ref": f"the {opts['backbone']} backbone"}
        self.index = {c: i for i, c in enumerate(self.classes or [])}

    def feature_map(self, x):
        f = self.model.forward_features(x)
        if isinstance(f, (list, tuple)):
            f = f[-1]
        if f.ndim == 3:  # tokens [B, L, C] (ViT-like): drop prefix tokens, back onto the square grid
            f = f[:, getattr(self.model, "num_prefix_tokens", 0):]
            g = int(round(f.shape[1] ** 0.5))
            if g * g != f.shape[1]:
                raise C.RecipeError(f"backbone output has {f.shape[1]} patch tokens, not a square grid")
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)
        elif f.ndim == 4 and f.shape[1] != self.dim and f.shape[-1] == self.dim:
            f = f.permute(0, 3, 1, 2)  # NHWC (e.g. Swin)
        return f

    def regions(self, items: list, job: dict) -> list:
        import torch
        from torchvision.ops import roi_align

        s = self.image_size
        out, ready = read_images(items, job, s)
        pixels, boxes, meta = [], [], []
        for i, key, _, arr, nb, labels in ready:
            # the whole image first (the context region), then the objects
            boxes.append(np.concatenate([np.array([[0, 0, 1, 1]], np.float32), nb.astype(np.float32)]))
            pixels.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            meta.append((i, key, [BACKGROUND] + labels))
        if not pixels:
            return out
        x = (torch.stack(pixels).float().div_(255.0) - self.mean) / self.std
        with torch.inference_mode():
            fmap = self.feature_map(x.to(self.device))
            rois = [torch.from_numpy(nb * s).to(self.device, torch.float32) for nb in boxes]
            pooled = roi_align(fmap.float(), rois, output_size=self.roi_size, spatial_scale=fmap.shape[-1] / s,
                               sampling_ratio=2, aligned=True).mean(dim=(2, 3)).cpu().numpy()
        start = 0
        for (i, key, names), nb in zip(meta, boxes):
            feats = pooled[start:start + len(nb)]
            start += len(nb)
            cls = None
            if self.classes:
                cls = np.zeros((len(nb), len(self.classes)), np.float32)
                for r, name in enumerate(names):
                    cls[r, self.index.get(name, 0)] = 1.0
            res = _finish(feats, nb, cls, f"{job['in']}: {key}", self.expect, None)
            if isinstance(res, dict) and self.classes:
                res["labels"] = np.array([n if n in self.index else BACKGROUND for n in names], dtype=str)
            out[i] = res
        return out


# -- one shard (in a worker or in-process) -----------------------------------------------------------------------------
_SOURCES: dict[str, Any] = {}


def _source(opts: dict):
    k = json.dumps(opts, sort_keys=True, default=str)
    if k not in _SOURCES:
        _SOURCES.clear()
        if opts["mode"] == "simulate":
            from data_recipes._regions_sim import Simulator as make
        else:
            make = {"npz": NpzSource, "tsv": TsvSource, "extract": Extractor}[opts["mode"]]
        _SOURCES[k] = make(opts)
    return _SOURCES[k]


def regions_sidecar(shard_path: str | Path) -> Path:
    """The sidecar of a shard that got its regions in place: ``<shard>.regions.json``. The shard's ``<shard>.json``
    stays the one of the recipe that wrote it, so that a re-run of that recipe still finds the shard finished (and,
    rewriting nothing, keeps the ``regions`` spec of the index)."""
    p = Path(shard_path)
    return p.with_name(p.name + ".regions.json")


def _in_place_done(path: Path, records: int, fp: str) -> dict | None:
    """The regions sidecar of a shard that holds exactly what this run would write into it, else None (always None
    under ``--force``)."""
    if C.forced():
        return None
    side = regions_sidecar(path)
    if not (path.exists() and side.exists()):
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("fingerprint") != fp or info.get("records") != records:
        return None
    return info if info.get("tar_sha1") == _file_sha1(path) else None


def do_shard(job: dict, tick: Callable[[], None] | None = None) -> dict:
    """Write one shard with ``regions.npz`` added (a copy, or the shard itself with ``in_place``); write its sidecar;
    return the sidecar dict."""
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])
    src = _source(job["opts"])
    skipped: Counter = Counter()
    job = dict(job, stats=Counter())
    stats = job["stats"]
    in_place = bool(job.get("in_place"))

    def finish(batch):
        for (key, members, js), res in zip(batch, src.regions(batch, job)):
            if tick is not None:
                tick()
            if isinstance(res, C.Skip):
                if in_place:
                    raise C.RecipeError(f"{job['in']}: sample {key} gets no regions ({res}); --in-place never drops a "
                                        "sample (pixel models read the same directory): write the regions to a new "
                                        "directory with --out, which drops and counts such samples")
                skipped[res.reason] += 1
                continue
            sample = {"__key__": key, **members}
            if "regions.npz" in members:
                stats["replaced_regions"] += 1
            sample["regions.npz"] = npz_bytes(res)
            stats["regions"] += int(res["features"].shape[0])
            yield sample

    def samples():
        batch = []
        for key, members in iter_tar_samples(job["in"]):
            if "/" in key:
                raise C.RecipeError(f"{job['in']}: sample key {key!r} has a folder part ('/'), which shard keys "
                                    "must not have")
            batch.append((key, members, _json(members)))
            if len(batch) >= src.batch_size:
                yield from finish(batch)
                batch = []
        if batch:
            yield from finish(batch)

    n = write_shard(job["out"], samples())  # in place: read to the end from the old file, then renamed over it
    if stats.get("malformed_line"):
        skipped["malformed_line"] += stats.pop("malformed_line")
    info = {"samples": n, "skipped": dict(sorted(skipped.items())), "records": job["records"],
            "fingerprint": job["fp"], "stats": dict(sorted(stats.items()))}
    if in_place:
        info["tar_sha1"] = _file_sha1(Path(job["out"]))
        atomic_write_text(regions_sidecar(job["out"]), json.dumps(info, sort_keys=True))
    else:
        atomic_write_text(C.sidecar_path(Path(job["out"])), json.dumps(info, sort_keys=True))
    return info


# -- build ----------------------------------------------------------------------------------------------------------
_SHARD_FILE = re.compile(r"^.+-\d{6}\.tar(\.json)?$")
_REGIONS_SIDECAR = re.compile(r"^(?P<shard>.+-\d{6}\.tar)\.regions\.json$")
MODES = ("npz", "tsv", "extract", "simulate")


def _mode(mode: str | None, npz_dir, tsv) -> str:
    given = [m for m, v in (("npz", npz_dir), ("tsv", tsv)) if v is not None]
    if mode is None:
        if len(given) != 1:
            raise C.RecipeError("choose one region source: --npz-dir DIR, --tsv FILE, --extract or --simulate")
        return given[0]
    if mode not in MODES:
        raise C.RecipeError(f"mode {mode!r}: expected one of {', '.join(map(repr, MODES))}")
    if (mode in ("extract", "simulate") and given) or (mode in ("npz", "tsv") and given != [mode]):
        raise C.RecipeError(f"mode {mode!r} with {', '.join(given) or 'no source'}: give exactly one of --npz-dir, "
                            "--tsv, --extract, --simulate")
    return mode


def _split_jsons(paths: list[Path]):
    for p in paths:
        for key, members in iter_tar_samples(p, {"json"}):
            yield p, key, _json(members)


def _scan_objects(paths: list[Path], lookup: dict | None) -> tuple[set[str], dict[str, dict]]:
    """The object labels of the samples of ``paths`` (their json's, else ``lookup``'s), and per shard the ``lookup``
    entries of its samples without objects in their json."""
    labels: set[str] = set()
    need: dict[str, dict] = {str(p): {} for p in paths}
    for p, key, js in _split_jsons(paths):
        objs = js.get("objects") if isinstance(js, dict) else None
        if not isinstance(objs, dict) and lookup is not None:
            iid = sample_id(key, js)
            objs = lookup.get(iid)
            if objs is not None:
                need[str(p)][iid] = objs
        if isinstance(objs, dict):
            labels.update(str(x) for x in objs.get("labels") or [])
    return labels, need


def _class_list(given: list[str] | None, labels: set[str], where: str, classes_arg) -> list[str] | None:
    if given is not None:
        cls_list = given if given[0].lower() in _BACKGROUNDS else [BACKGROUND, *given]
        unknown = sorted(labels - set(cls_list))
        if unknown:
            raise C.RecipeError(f"--classes {classes_arg}: {len(unknown)} object label(s) of {where} are not in it, "
                                f"e.g. {', '.join(map(repr, unknown[:5]))}")
        return cls_list
    return [BACKGROUND, *sorted(labels - {BACKGROUND})] if labels else None


def build(shards, out=None, mode: str | None = None, workers: int = 1, progress: bool = True, *,
          in_place: bool = False, **kwargs) -> dict:
    """Write ``out`` = the shards of ``shards`` with ``regions.npz`` (or, ``in_place``, rewrite ``shards`` itself);
    returns the new ``index.json`` dict. ``mode``: "npz" (``npz_dir``), "tsv" (``tsv``), "extract" (``backbone``
    etc.) or "simulate"; inferred from ``npz_dir``/``tsv`` when None. See the module docstring and ``build_many``."""
    return build_many([shards], None if out is None else [out], mode, workers, progress, in_place=in_place,
                      **kwargs)[0]


def build_many(shards: list, outs: list | None = None, mode: str | None = None, workers: int = 1,
               progress: bool = True, *, in_place: bool = False, npz_dir=None, tsv=None, tsv_fields=None,
               classes=None, objects=None, backbone: str | None = None, pretrained: bool = False, weights=None,
               image_size: int | None = None, roi_size: int = 7, batch_size: int | None = None, device: str = "cpu",
               seed: int = 0) -> list[dict]:
    """``build`` over several split directories at once: one class list (the union of their object labels, unless
    ``classes`` is given), so that every directory records the same region spec, and one worker pool and progress
    bar for all their shards. Returns their new indices, in order."""
    from tqdm import tqdm

    mode = _mode(mode, npz_dir, tsv)
    in_dirs = [Path(d) for d in shards]
    if not in_dirs:
        raise C.RecipeError("no --shards directory given")
    if len({d.resolve() for d in in_dirs}) != len(in_dirs):
        raise C.RecipeError("the same --shards directory is given twice")
    if in_place:
        if outs is not None:
            raise C.RecipeError("--in-place rewrites the --shards directories themselves; give no --out")
        out_dirs = list(in_dirs)
    else:
        if outs is None or len(outs) != len(in_dirs):
            raise C.RecipeError(f"give one --out per --shards directory ({len(in_dirs)}), or --in-place")
        out_dirs = [Path(o) for o in outs]
        for i, o in zip(in_dirs, out_dirs):
            if o.resolve() == i.resolve():
                raise C.RecipeError(f"--out {o} is the input directory; region features go to a new directory "
                                    "(the input shards are never modified), or use --in-place")
    in_indices = []
    for d in in_dirs:
        try:
            in_indices.append(read_index(d))
        except ShardFormatError as e:
            raise C.RecipeError(f"--shards {d}: {e}") from None
    if image_size is None:
        image_size = 128 if mode == "simulate" else 224
    if batch_size is None:
        batch_size = 64 if mode == "simulate" else 16
    if image_size < 8 or roi_size < 1 or batch_size < 1:
        raise C.RecipeError(f"image size {image_size} (>= 8), roi size {roi_size} and batch size {batch_size} "
                            "(>= 1) out of range")
    if objects and mode not in ("extract", "simulate"):
        raise C.RecipeError("--objects gives the boxes to compute features for: only with --extract or --simulate")
    given_classes = read_classes(classes) if classes is not None else None
    in_paths = [[d / s["name"] for s in idx["shards"]] for d, idx in zip(in_dirs, in_indices)]
    all_paths = [p for ps in in_paths for p in ps]
    where = in_dirs[0] if len(in_dirs) == 1 else f"{len(in_dirs)} directories"

    opts: dict[str, Any] = {"mode": mode, "version": VERSION}
    ident: dict[str, Any] = {}  # what identifies the source's content (for the fingerprint, not passed on)
    spec: dict[str, Any] = {"box_format": BOX_FORMAT, "source": mode}
    need: dict[str, dict] = {}
    if mode == "npz":
        files = npz_listing(npz_dir)
        if not files:
            raise C.RecipeError(f"--npz-dir {npz_dir}: no .npz files")
        first = Path(npz_dir) / sorted(files.values())[0]
        a = load_npz(first)
        keys = sorted(a)
        expect = {"dim": int(a["features"].shape[1]), "conf": "conf" in a, "npz_keys": keys,
                  "num_classes": int(a["soft_labels"].shape[1]) if "soft_labels" in a else None, "ref": str(first)}
        ident["npz"] = hashlib.sha1(json.dumps(
            [(n, st.st_size, st.st_mtime_ns) for n in sorted(files.values())
             for st in [os.stat(Path(npz_dir) / n)]]).encode()).hexdigest()
        opts.update(npz_dir=str(Path(npz_dir).resolve()), expect=expect)
        spec["backbone"] = backbone or DETECTOR
    elif mode == "tsv":
        tsv_path = C.require(Path(tsv), "a BUTD region-feature TSV (--tsv)")
        cols, ncols, header = tsv_layout(tsv_path, tsv_fields)
        expect = _peek_tsv(tsv_path, cols, ncols, header)
        st = tsv_path.stat()
        ident["tsv"] = [st.st_size, st.st_mtime_ns]
        opts.update(tsv=str(tsv_path.resolve()), tsv_cols=cols, tsv_ncols=ncols, tsv_header=header, expect=expect)
        spec["backbone"] = backbone or DETECTOR
    else:
        lookup = None
        if objects:
            obj_files = [objects] if isinstance(objects, (str, Path)) else list(objects)
            lookup = load_objects(obj_files)
            ident["objects"] = [_file_sha1(Path(f)) for f in obj_files]
        labels, need = _scan_objects(all_paths, lookup)
        if lookup is None:
            need = {}
        cls_list = _class_list(given_classes, labels, where, classes)
        if mode == "extract":
            backbone = backbone or "resnet50"
            file, wdesc = resolve_weights(backbone, pretrained, weights)
            opts.update(backbone=backbone, weights_file=file, image_size=image_size, roi_size=roi_size,
                        batch_size=batch_size, device=str(device), classes=cls_list)
            if file:
                ident["weights"] = _file_sha1(Path(file))
            ext = _source(opts)  # built here for its dimension; reused by in-process shards
            expect = ext.expect
            spec.update(backbone=backbone, pretrained=file is not None, weights=wdesc, image_size=image_size,
                        roi_size=roi_size, global_region=True)
        else:
            from data_recipes import _regions_sim as sim

            cls_list = cls_list or [BACKGROUND]
            opts.update(classes=cls_list, seed=int(seed), image_size=image_size, batch_size=batch_size,
                        sim_version=sim.VERSION)
            expect = {"dim": sim.DIM, "num_classes": len(cls_list), "conf": False, "ref": "the simulated detector"}
            spec.update(sim.spec(int(seed), image_size))
    if mode in ("npz", "tsv"):
        opts["classes"] = _fit_classes(given_classes, expect["num_classes"], expect["ref"], classes)
        cls_list = opts["classes"]
    spec.update(dim=expect["dim"], num_classes=expect["num_classes"], classes=cls_list)
    fields = ["boxes", "features"] + (["cls_prob"] if expect["num_classes"] else []) + (
        ["conf"] if expect["conf"] else []) + (["labels"] if cls_list and expect["num_classes"] else [])
    spec["fields"] = sorted(fields)

    # which shards are done
    base_fp = json.dumps({"opts": opts, "ident": ident}, sort_keys=True, default=str)
    plans, jobs = [], []
    total = initial = 0
    for in_dir, out_dir, in_index, paths in zip(in_dirs, out_dirs, in_indices, in_paths):
        out_dir.mkdir(parents=True, exist_ok=True)
        names = {s["name"] for s in in_index["shards"]}
        for p in out_dir.iterdir():  # sidecars and shards of an earlier run over another input: not in the index
            m = _REGIONS_SIDECAR.match(p.name)
            if (m and m["shard"] not in names) or (
                    not in_place and _SHARD_FILE.match(p.name) and p.name.removesuffix(".json") not in names):
                p.unlink()
        plan = {"in": in_dir, "out": out_dir, "index": in_index, "names": [], "jobs": 0}
        for s, in_path in zip(in_index["shards"], paths):
            out_path = out_dir / s["name"]
            total += s["samples"]
            if in_place:
                fp = hashlib.sha1(base_fp.encode()).hexdigest()
                info = _in_place_done(out_path, s["samples"], fp)
            else:
                fp = hashlib.sha1(f"{base_fp}\n{_file_sha1(in_path)}".encode()).hexdigest()
                info = C.shard_done(out_path, [None] * s["samples"], fp)
            plan["names"].append(str(out_path))
            if info is not None:
                plan.setdefault("done", {})[str(out_path)] = info
                initial += s["samples"]
            else:
                job = {"in": str(in_path), "out": str(out_path), "fp": fp, "records": s["samples"], "opts": opts,
                       "name": s["name"], "in_place": in_place}
                if str(in_path) in need:
                    job["objects"] = need[str(in_path)]
                jobs.append(job)
                plan["jobs"] += 1
        try:
            plan["old"] = json.loads((out_dir / "index.json").read_text())
        except (OSError, ValueError):
            plan["old"] = {}
        if plan["jobs"]:  # until this run ends, no index claims regions that some shards do not hold yet
            if in_place:  # pixel models keep reading the directory meanwhile: the index stays, its spec goes
                if in_index.get("regions") is not None:
                    write_index(out_dir, source=in_index["source"], split=in_index["split"],
                                shards=in_index["shards"], skipped=in_index.get("skipped") or {},
                                tokenizer=in_index.get("tokenizer"), regions=None, meta=in_index.get("meta"))
            else:  # a reader must not take a half-rewritten directory for a finished one
                (out_dir / "index.json").unlink(missing_ok=True)
        plans.append(plan)

    scan: Counter = Counter()
    if mode == "tsv" and jobs:
        wanted: dict[str, set] = {}
        for p, key, js in _split_jsons([Path(j["in"]) for j in jobs]):
            wanted.setdefault(str(p), set()).add(sample_id(key, js))
        offsets, scan = scan_tsv(Path(opts["tsv"]), opts["tsv_cols"], opts["tsv_ncols"], opts["tsv_header"],
                                 set().union(*wanted.values()))
        for j in jobs:
            j["offsets"] = {k: offsets[k] for k in wanted.get(j["in"], ()) if k in offsets}

    results: dict[str, dict] = {}
    for plan in plans:
        results.update(plan.get("done") or {})
    desc = f"regions/{in_indices[0]['split']}" if len(in_dirs) == 1 else f"regions ({len(in_dirs)} splits)"
    bar = tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                results[j["out"]] = do_shard(j, tick=lambda: bar.update(1))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            n = min(workers, len(jobs))
            threads = max(1, (os.cpu_count() or 1) // n) if mode in ("extract", "simulate") else 1
            ctx = multiprocessing.get_context("spawn")  # not fork: torch threads may hold locks
            pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx)
            try:
                futures = {pool.submit(do_shard, dict(j, threads=threads)): j for j in jobs}
                for fut in as_completed(futures):
                    j = futures[fut]
                    results[j["out"]] = fut.result()
                    bar.update(j["records"])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [_write_index(plan, results, spec, scan, mode, in_place) for plan in plans]


def _write_index(plan: dict, results: dict, spec: dict, scan: Counter, mode: str, in_place: bool) -> dict:
    in_dir, out_dir, in_index, old = plan["in"], plan["out"], plan["index"], plan["old"]
    skipped: Counter = Counter(in_index.get("skipped") or {})
    stats: Counter = Counter()
    out_shards = []
    for s, path in zip(in_index["shards"], plan["names"]):
        info = results[path]
        skipped.update(info["skipped"])
        stats.update(info.get("stats") or {})
        if info["samples"]:
            out_shards.append({"name": s["name"], "samples": info["samples"]})
    if mode == "tsv" and not plan["jobs"]:  # nothing done here: the scan counts of the run that did it
        scan = Counter(((old.get("meta") or {}).get("regions_build") or {}).get("tsv_scan") or {})
    if scan.get("malformed_line"):
        skipped["malformed_line"] += scan["malformed_line"]
    meta = dict(in_index.get("meta") or {})
    meta.pop("regions_build", None)
    tok = in_index.get("tokenizer")
    if not in_place:  # paths relative to the input directory, seen from the output one
        rel = lambda x: os.path.relpath((in_dir / x).resolve(), out_dir.resolve())  # noqa: E731
        if isinstance(tok, str) and tok and not os.path.isabs(tok):
            tok = rel(tok)
        if isinstance(meta.get("answers_file"), str) and not os.path.isabs(meta["answers_file"]):
            meta["answers_file"] = rel(meta["answers_file"])
    n_out = sum(s["samples"] for s in out_shards)
    build_meta = {"input": str(in_dir.resolve()), "input_samples": in_index["num_samples"],
                  "regions": stats.get("regions", 0), "replaced_regions": stats.get("replaced_regions", 0),
                  "mean_regions": round(stats.get("regions", 0) / n_out, 3) if n_out else 0.0}
    if in_place:
        build_meta["in_place"] = True
    if mode == "tsv":
        build_meta["tsv_scan"] = dict(sorted(scan.items()))
    index = write_index(out_dir, source=in_index["source"], split=in_index["split"], shards=out_shards,
                        skipped={k: v for k, v in skipped.items() if v}, tokenizer=tok, regions=spec,
                        meta=dict(meta, regions_build=build_meta))
    skips = ", ".join(f"{k}={v}" for k, v in index["skipped"].items()) or "none"
    print(f"regions/{in_index['split']} ({mode}{', in place' if in_place else ''}): {index['num_samples']} samples "
          f"in {len(out_shards)} shards ({plan['jobs']} written, {len(in_index['shards']) - plan['jobs']} already "
          f"done), D={spec['dim']}, {build_meta['mean_regions']} regions/image -> {out_dir}; skipped: {skips}")
    return index


# -- command line ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_recipes.regions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, type=Path, nargs="+", metavar="IN",
                   help="input split directory (index.json + shards), written by another recipe; several with "
                        "--in-place (one class list and region spec for all)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, default=None, metavar="OUT",
                      help="output split directory: the same shards with regions.npz, and index.json (the input is "
                           "not modified; samples without regions are dropped and counted)")
    dest.add_argument("--in-place", action="store_true",
                      help="add regions.npz to the --shards directories themselves (each shard atomically replaced, "
                           "index.json kept valid throughout; a sample without regions is an error)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz-dir", type=Path, default=None, metavar="DIR", help="UNITER per-image .npz features")
    src.add_argument("--tsv", type=Path, default=None, metavar="FILE", help="BUTD/VinVL-style feature TSV")
    src.add_argument("--extract", action="store_true", help="compute features: timm backbone + RoI-align")
    src.add_argument("--simulate", action="store_true",
                     help="the simulated detector over the known objects (the embedded shapes world)")
    p.add_argument("--tsv-fields", default=None, metavar="A,B,...", help="column names of a headerless --tsv")
    p.add_argument("--classes", type=Path, default=None, metavar="FILE",
                   help="class names, one per line (VG 1600 objects [+ __background__ first]), or an index.json "
                        "whose regions.classes to reuse")
    p.add_argument("--objects", type=Path, nargs="+", default=None, metavar="JSON",
                   help="--extract/--simulate: COCO instances files giving the boxes of samples whose json has no "
                        "objects (VQA shards: the instances of the same images)")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="--extract: timm model name (resnet50); otherwise the name recorded for the features "
                        f"({DETECTOR})")
    p.add_argument("--pretrained", action="store_true", help="--extract: timm weights from the local cache")
    p.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="--extract: backbone weights file (.pth / .safetensors state dict of the timm model)")
    p.add_argument("--image-size", type=C.positive_int, default=None, metavar="S",
                   help="--extract/--simulate: resize to SxS (224 / 128)")
    p.add_argument("--roi-size", type=C.positive_int, default=7, metavar="R",
                   help="--extract: RoI-align output RxR, then mean-pooled (7)")
    p.add_argument("--batch-size", type=C.positive_int, default=None, metavar="B",
                   help="--extract/--simulate: images per batch (16 / 64)")
    p.add_argument("--device", default="cpu", help="--extract: torch device (cpu)")
    p.add_argument("--seed", type=int, default=0, help="--simulate: seed of the conv bank, context boxes, noise (0)")
    p.add_argument("--workers", type=C.positive_int, default=1, metavar="K", help="processes, one shard each (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    C.add_force_arg(p)
    args = p.parse_args(argv)
    if args.out is not None and len(args.shards) != 1:
        p.error("--out takes one --shards directory (several only with --in-place)")
    mode = "extract" if args.extract else "simulate" if args.simulate else None
    return C.call_reporting(
        p, build_many, args.shards, None if args.in_place else [args.out], mode=mode, workers=args.workers,
        progress=not args.no_progress, in_place=args.in_place, npz_dir=args.npz_dir, tsv=args.tsv,
        tsv_fields=args.tsv_fields, classes=args.classes, objects=args.objects, backbone=args.backbone,
        pretrained=args.pretrained, weights=args.weights, image_size=args.image_size, roi_size=args.roi_size,
        batch_size=args.batch_size, device=args.device, seed=args.seed, force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
