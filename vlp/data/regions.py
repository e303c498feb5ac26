"""Detector regions of a sample (``regions.npz``, DESIGN §3) and their padding into a batch.

``load_regions`` checks one decoded npz and returns per-sample tensors; ``pad_regions`` zero-pads a list of them to
the batch's most regions. Batch keys (see the key table of ``vlp.data.collate``): ``region_features`` [B, N, D],
``region_boxes`` [B, N, 4], ``region_mask`` [B, N], ``region_cls_prob`` [B, N, C] and ``region_labels``
(list[list[str]], unpadded) when every sample of the batch has them.

``read_npz`` (the decoder of ``regions.npz`` members) is ``np.load`` without its per-sample overheads: region-only
models (UNITER, MVPTR) read no pixels, so at 36 x 2048 features parsing the zip directory and the ``.npy`` headers,
and one float32 copy per sample, were most of their data path. Features stay fp16 until ``pad_regions`` writes
the float32 batch.
"""

from __future__ import annotations

import ast
import io
import struct
import zlib
from typing import Sequence

import numpy as np
import torch

from vlp.data.stream import CorruptSample

__all__ = ["load_regions", "npz_handler", "pad_regions", "read_npz"]


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip local file header (30 bytes)
_NPY_HEADERS: dict[bytes, tuple] = {}  # .npy header text -> (dtype, shape, fortran): a few distinct ones per run


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """``np.load`` of an ``.npz`` written by ``np.savez`` (members stored, not deflated), without its per-member
    costs: the zip directory is walked once through the local headers, each ``.npy`` header (the same text for
    every sample of a run) is parsed once per process, and the arrays are views of one writable copy of the bytes.
    Every member's CRC-32 is still checked, so a damaged member is an error as with ``np.load``. A compressed
    member, a zip64 file or anything unexpected goes to ``np.load``."""
    out, pos, buf = {}, 0, None
    while data[pos:pos + 4] == b"PK\x03\x04":
        (_, _, _, flags, method, _, _, crc, size, _, name_len, extra_len) = _LOCAL_HEADER.unpack_from(data, pos)
        start = pos + 30 + name_len + extra_len
        if size == 0xFFFFFFFF:  # zip64 (np.savez writes every member so): the sizes are in the extra field
            size = _zip64_size(data, pos + 30 + name_len, extra_len)
        if method != 0 or flags & 0x08 or size is None:
            return _np_load(data)
        name = data[pos + 30:pos + 30 + name_len].decode()
        if zlib.crc32(data[start:start + size]) != crc:
            raise ValueError(f"npz member {name}: CRC-32 mismatch (damaged data)")
        if buf is None:
            buf = bytearray(data)  # one writable copy for every array (torch.from_numpy wants writable memory)
        out[name.removesuffix(".npy")] = _npy_view(buf, data, start, size, name)
        pos = start + size
    if not out:
        return _np_load(data)
    return out


def _zip64_size(data: bytes, pos: int, length: int):
    """The stored size in a local header's zip64 extra field (id 1: uncompressed, then compressed size), or None."""
    end = pos + length
    while pos + 4 <= end:
        tag, n = struct.unpack_from("<2H", data, pos)
        if tag == 1 and n >= 16:
            return struct.unpack_from("<Q", data, pos + 4)[0]
        pos += 4 + n
    return None


def _np_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _npy_view(buf: bytearray, data: bytes, start: int, size: int, name: str) -> np.ndarray:
    if data[start:start + 6] != b"\x93NUMPY":
        raise ValueError(f"npz member {name}: not a .npy array")
    major = data[start + 6]
    head_len, width = (struct.unpack_from("<H", data, start + 8)[0], 10) if major == 1 else \
        (struct.unpack_from("<I", data, start + 8)[0], 12)
    text = data[start + width:start + width + head_len]
    parsed = _NPY_HEADERS.get(text)
    if parsed is None:
        header = ast.literal_eval(text.decode("latin1"))
        dtype = np.dtype(header["descr"])
        if dtype.hasobject:
            raise ValueError(f"npz member {name}: object arrays are not read (no pickles)")
        parsed = _NPY_HEADERS[text] = (dtype, tuple(header["shape"]), bool(header["fortran_order"]))
    dtype, shape, fortran = parsed
    offset = start + width + head_len
    count = int(np.prod(shape)) if shape else 1
    if offset + count * dtype.itemsize > start + size:
        raise ValueError(f"npz member {name}: {count} x {dtype} do not fit in {size} bytes")
    a = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def npz_handler(key: str, data: bytes):
    """webdataset decoder handler for ``*.npz`` members (:func:`read_npz`)."""
    if not key.lower().endswith("npz"):
        return None
    return read_npz(data)


def _as_float(a) -> np.ndarray:
    """A stored float array as it is (fp16 stays fp16: ``pad_regions`` converts once, while it copies into the
    float32 batch, which saves a full float32 pass per sample), anything else as float32."""
    a = np.asarray(a)
    return a if a.dtype in (np.float16, np.float32) else a.astype(np.float32)


def load_regions(npz: dict, key: str = "?") -> dict:
    """Decoded ``regions.npz`` -> ``region_features`` [N, D] (fp16 or float32 as stored), ``region_boxes`` float32
    [N, 4], optional ``region_cls_prob`` [N, C] (as stored) and ``region_labels`` (list of N object names). A malformed file is a
    ``CorruptSample`` naming the sample key and the member."""
    if not isinstance(npz, dict) or "features" not in npz or "boxes" not in npz:
        raise CorruptSample(f"sample {key}: regions.npz needs 'features' and 'boxes'")
    feats = _as_float(npz["features"])
    boxes = np.asarray(npz["boxes"], dtype=np.float32)
    if feats.ndim != 2 or boxes.shape != (feats.shape[0], 4):
        raise CorruptSample(f"sample {key}: regions.npz features {feats.shape} / boxes {boxes.shape} do not match "
                            "(expected [N, D] and [N, 4])")
    n = feats.shape[0]
    out = {"region_features": torch.from_numpy(feats), "region_boxes": torch.from_numpy(boxes)}
    if "cls_prob" in npz:
        cls = _as_float(npz["cls_prob"])
        if cls.ndim != 2 or cls.shape[0] != n:
            raise CorruptSample(f"sample {key}: regions.npz cls_prob {cls.shape} does not match {n} regions "
                                "(expected [N, C])")
        out["region_cls_prob"] = torch.from_numpy(cls)
    if "labels" in npz:
        labels = np.asarray(npz["labels"])
        if labels.shape != (n,):
            raise CorruptSample(f"sample {key}: regions.npz labels {labels.shape} does not match {n} regions "
                                "(expected [N] object names)")
        out["region_labels"] = [str(x) for x in labels.tolist()]
    return out


def pad_regions(samples: Sequence[dict]) -> dict:
    """Zero-pad per-sample region tensors to the batch maximum; ``region_mask`` marks the real ones.
    ``region_cls_prob`` / ``region_labels`` are kept only when every sample carries them."""
    n = max(s["region_features"].shape[0] for s in samples)
    d = samples[0]["region_features"].shape[1]
    b = len(samples)
    feats, boxes = torch.zeros(b, n, d), torch.zeros(b, n, 4)
    mask = torch.zeros(b, n, dtype=torch.bool)
    with_cls = all("region_cls_prob" in s for s in samples)
    cls = torch.zeros(b, n, samples[0]["region_cls_prob"].shape[1]) if with_cls else None
    for i, s in enumerate(samples):
        k = s["region_features"].shape[0]
        if s["region_features"].shape[1] != d:
            raise ValueError(f"sample {s.get('key')}: region feature dim {s['region_features'].shape[1]} != {d} of "
                             f"sample {samples[0].get('key')}; every source of a run needs the same extractor")
        feats[i, :k], boxes[i, :k], mask[i, :k] = s["region_features"], s["region_boxes"], True
        if cls is not None:
            if s["region_cls_prob"].shape[1] != cls.shape[2]:
                raise ValueError(f"sample {s.get('key')}: {s['region_cls_prob'].shape[1]} detector classes != "
                                 f"{cls.shape[2]} of sample {samples[0].get('key')}")
            cls[i, :k] = s["region_cls_prob"]
    out = {"region_features": feats, "region_boxes": boxes, "region_mask": mask}
    if cls is not None:
        out["region_cls_prob"] = cls
    if all("region_labels" in s for s in samples):
        out["region_labels"] = [list(s["region_labels"]) for s in samples]
    return out
