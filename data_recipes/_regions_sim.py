"""The simulated detector of ``data_recipes.regions --simulate``: region features for images whose objects are known
(the shapes world's boxes, or any COCO-style instances), made to behave like a real detector's output.

Regions. Every object box of the sample (``objects.boxes`` of its json, or of ``--objects`` for shards without
them, e.g. VQA), plus 0-3 context boxes drawn per image: a *background* patch (a box off the objects: IoU < 0.1
with each, less than a quarter of any object inside), a *duplicate* (an object's box shifted and rescaled to IoU
0.4-0.75 with it, like a detector's second, worse-localised hit) or the *whole image* (at most once). An image
without objects always gets the whole image. Regions are ordered by objectness (1 - p(background)), as a detector
orders its detections by score.

Features, ``DIM`` = 128 per region, from the pixels under the box (the image resized to ``image_size`` square,
ImageNet-normalised):

=================  =======  =============================================================================
columns            width    what
=================  =======  =============================================================================
0:108   rgb_grid   3x6x6    the box RoI-aligned (torchvision ``roi_align``, aligned, 2x2 samples per bin)
                            to a 6x6 grid of normalised RGB (channel-major): colour and silhouette (shape)
108:128 conv       20       a fixed random conv bank (20 5x5 filters, stride 2, ReLU; seeded, never
                            trained: 10 zero-mean "edge" filters, 10 colour filters, unit L2 norm),
                            RoI-aligned 4x4 and mean-pooled: texture, edge density (size at a fixed scale)
=================  =======  =============================================================================

Size is in the box itself (which region models embed) and, at the fixed pixel scale of the conv bank, in the edge
density. No backbone is trained or loaded: the random conv is the "random-init backbone" of DESIGN §9, kept tiny so
that a region model learns from these features on a CPU in minutes and the whole world is processed in about a
minute.

Soft labels (``cls_prob`` [N, C], C = background + object classes): what a detector that is mostly right would
output, a softmax of logits that depend on the region's content. For region r and object class c, the evidence
``ev[c]`` is the best IoU of r with an object of class c times that object's *quality* (its size, ``sqrt(w h)`` /
0.3 of the image clipped to [0.5, 1], times its contrast, the colour distance between its centre and the image
border / 60 clipped to [0.5, 1]); then

    z[c] = A ev[c] + A LAMBDA sum_t S[c, t] ev[t] + SIGMA eps[c]          (object classes)
    z[0] = A (1 - max IoU of r with any object) + B0 + SIGMA eps[0]        (background)
    cls_prob = softmax(z / T)

with a fixed random class confusion S (symmetric, zero diagonal, seeded by the class list) and Gaussian noise eps
drawn per image from a seed and the image bytes. On the shapes world (128 px) exact object boxes peak on their class
(mean top probability 0.85 for large objects, 0.55 for small ones, whose argmax is another class 6 % of the time),
duplicates split their mass between the object and the background, background patches are ~0.97 background; a
linear probe on the features reads colour, shape and size of the test objects at 100 / 100 / 99.6 %. ``labels`` are the
ground-truth names (MVPTR's ``use_gtlabels``): the object's for object and duplicate boxes, ``__background__``
for context boxes off the objects.

Everything is a pure function of (seed, image bytes, boxes, labels, class list): the same image in the COCO and
VQA shards gets the same regions.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

VERSION = 1  # bump when the same input and options give other regions
BACKGROUND = "__background__"
GRID, CONV, KERNEL, STRIDE = 6, 20, 5, 2
DIM = 3 * GRID * GRID + CONV
LAYOUT = [["rgb_grid", 0, 3 * GRID * GRID], ["conv", 3 * GRID * GRID, DIM]]
MAX_EXTRA = 3
A, LAMBDA, B0, SIGMA, TEMPERATURE = 5.0, 0.5, 1.0, 0.6, 1.0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
METHOD = (f"rgb_grid: box RoI-aligned to {GRID}x{GRID} normalised RGB (channel-major); conv: fixed random "
          f"{CONV}-filter {KERNEL}x{KERNEL} stride-{STRIDE} conv bank + ReLU (seeded, untrained), RoI-aligned 4x4, "
          "mean-pooled; image resized to image_size square, ImageNet mean/std")
CLS_PROB = (f"simulated detector: softmax((A*ev + A*lambda*S@ev + sigma*eps) / T), background A*(1-IoU)+B0; "
            f"A={A}, lambda={LAMBDA}, B0={B0}, sigma={SIGMA}, T={TEMPERATURE}; ev = IoU x object quality (size, "
            "contrast); S a seeded random class confusion")
CONTEXT = (f"objects + 0-{MAX_EXTRA} context boxes per image (background patch, duplicate at IoU 0.4-0.75, whole "
           "image); ordered by objectness")


def spec(seed: int, image_size: int) -> dict[str, Any]:
    """What ``index.json`` records about these features (besides dim, classes, box format, fields)."""
    return {"backbone": f"randconv{CONV}+rgbgrid{GRID}", "pretrained": False, "weights": f"random(seed={seed})",
            "image_size": image_size, "feature_layout": LAYOUT, "method": METHOD, "cls_prob": CLS_PROB,
            "context_regions": CONTEXT, "labels": "ground_truth", "seed": seed}


def conv_bank(seed: int):
    """[CONV, 3, KERNEL, KERNEL] float32: half zero-mean (edges, texture), half plain (colour), unit L2 norm each."""
    import torch

    g = torch.Generator().manual_seed(int(seed) * 1000 + 17)
    w = torch.randn(CONV, 3, KERNEL, KERNEL, generator=g)
    w[: CONV // 2] -= w[: CONV // 2].mean(dim=(1, 2, 3), keepdim=True)
    return w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def confusion(classes: list[str], seed: int) -> np.ndarray:
    """[K, K] over the object classes (background excluded): symmetric, zero diagonal, values U(0,1)^2."""
    h = hashlib.sha1(("\n".join(classes) + f"\n{seed}").encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    k = len(classes) - 1
    s = rng.uniform(0, 1, (k, k)) ** 2
    s = np.triu(s, 1)
    return (s + s.T).astype(np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] IoU of xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _inside_fraction(box: np.ndarray, objs: np.ndarray) -> np.ndarray:
    """The fraction of each object's area inside ``box``."""
    x1, y1 = np.maximum(box[0], objs[:, 0]), np.maximum(box[1], objs[:, 1])
    x2, y2 = np.minimum(box[2], objs[:, 2]), np.minimum(box[3], objs[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / np.maximum((objs[:, 2] - objs[:, 0]) * (objs[:, 3] - objs[:, 1]), 1e-12)


def context_boxes(rng: np.random.Generator, objs: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """0-3 extra boxes ``(xyxy in [0, 1], source object or -1)`` (see the module docstring); at least the whole image
    when there are no objects."""
    n = int(rng.integers(0, MAX_EXTRA + 1))
    out: list[tuple[np.ndarray, int]] = []
    whole = False
    if len(objs) == 0:
        out.append((np.array([0, 0, 1, 1], np.float64), -1))
        whole = True
    for _ in range(n):
        kind = rng.choice(3, p=[0.5, 0.35, 0.15])
        if kind == 1 and len(objs):
            j = int(rng.integers(len(objs)))
            o = objs[j]
            w, h = o[2] - o[0], o[3] - o[1]
            for _ in range(20):
                cx = (o[0] + o[2]) / 2 + rng.uniform(-0.3, 0.3) * w
                cy = (o[1] + o[3]) / 2 + rng.uniform(-0.3, 0.3) * h
                sw, sh = w * rng.uniform(0.7, 1.45) / 2, h * rng.uniform(0.7, 1.45) / 2
                b = np.clip(np.array([cx - sw, cy - sh, cx + sw, cy + sh]), 0, 1)
                if 0.4 <= iou(b[None], o[None])[0, 0] <= 0.75:
                    out.append((b, j))
                    break
        elif kind == 2 and not whole:
            out.append((np.array([0, 0, 1, 1], np.float64), -1))
            whole = True
        else:
            for _ in range(20):
                side = rng.uniform(0.12, 0.35)
                ar = rng.uniform(0.7, 1.4)
                bw, bh = min(side * ar ** 0.5, 1.0), min(side / ar ** 0.5, 1.0)
                x0, y0 = rng.uniform(0, 1 - bw), rng.uniform(0, 1 - bh)
                b = np.array([x0, y0, x0 + bw, y0 + bh])
                if len(objs) == 0 or (iou(b[None], objs).max() < 0.1 and _inside_fraction(b, objs).max() < 0.25):
                    out.append((b, -1))
                    break
    return out


def soft_labels(rng: np.random.Generator, boxes: np.ndarray, objs: np.ndarray, obj_cls: np.ndarray,
                quality: np.ndarray, conf: np.ndarray, num_classes: int) -> np.ndarray:
    """[R, C] float64 class distributions of ``boxes`` (see the module docstring); ``obj_cls`` in 1..C-1."""
    r = len(boxes)
    ov = iou(boxes, objs)  # [R, n]
    ev = np.zeros((r, num_classes - 1))
    for j in range(len(objs)):
        c = int(obj_cls[j]) - 1
        ev[:, c] = np.maximum(ev[:, c], ov[:, j] * quality[j])
    z = np.empty((r, num_classes))
    z[:, 1:] = A * ev + A * LAMBDA * ev @ conf.T
    z[:, 0] = A * (1 - (ov.max(1) if len(objs) else np.zeros(r))) + B0
    z += SIGMA * rng.standard_normal(z.shape)
    z /= TEMPERATURE
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


class Simulator:
    """``data_recipes.regions`` source ``simulate`` (same interface as its ``Extractor``)."""

    def __init__(self, opts: dict):
        import torch

        self.classes = list(opts["classes"])
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.seed, self.image_size = int(opts["seed"]), int(opts["image_size"])
        self.batch_size = int(opts["batch_size"])
        self.weight = conv_bank(self.seed)
        self.conf = confusion(self.classes, self.seed)
        self.mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = DIM
        self.expect = {"dim": DIM, "num_classes": len(self.classes), "conf": False, "ref": "the simulated detector"}

    def regions(self, items: list, job: dict) -> list:
        import torch
        import torch.nn.functional as F
        from torchvision.ops import roi_align

        from data_recipes import _common as C
        from data_recipes.regions import read_images

        s = self.image_size
        out, ready = read_images(items, job, s)
        pixels, rois, meta = [], [], []
        for i, key, data, arr, ob, names in ready:
            unknown = [x for x in names if x not in self.index or x == BACKGROUND]
            if unknown:
                raise C.RecipeError(f"{job['in']}: sample {key}: object label {unknown[0]!r} is not in the class "
                                    f"list ({len(self.classes)} classes)")
            h8 = hashlib.sha1(data).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(h8[:8], "little")])
            extra = context_boxes(rng, ob)
            allb = np.concatenate([ob, np.array([e for e, _ in extra]).reshape(-1, 4)]).astype(np.float64)
            labels = list(names) + [names[j] if j >= 0 else BACKGROUND for _, j in extra]
            pixels.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            rois.append(torch.from_numpy(allb.astype(np.float32) * s))
            meta.append((i, key, arr, ob, names, allb, labels, rng))
        if not pixels:
            return out
        x = (torch.stack(pixels).float().div_(255.0) - self.mean) / self.std
        with torch.inference_mode():
            grid = roi_align(x, rois, output_size=GRID, spatial_scale=1.0, sampling_ratio=2, aligned=True)
            fmap = F.relu(F.conv2d(x, self.weight, stride=STRIDE, padding=KERNEL // 2))
            conv = roi_align(fmap, rois, output_size=4, spatial_scale=fmap.shape[-1] / s, sampling_ratio=2,
                             aligned=True).mean(dim=(2, 3))
            feats = torch.cat([grid.flatten(1), conv], 1).numpy()
        start = 0
        for i, key, arr, ob, names, allb, labels, rng in meta:
            n = len(allb)
            f = feats[start:start + n]
            start += n
            quality = _quality(arr, ob)
            cls = soft_labels(rng, allb, ob, np.array([self.index[x] for x in names], int), quality, self.conf,
                              len(self.classes))
            order = np.argsort(-(1 - cls[:, 0]), kind="stable")
            out[i] = {"features": f[order].astype(np.float16), "boxes": allb[order].astype(np.float32),
                      "cls_prob": cls[order].astype(np.float16), "labels": np.array([labels[k] for k in order],
                                                                                    dtype=str)}
        return out


def _quality(arr: np.ndarray, ob: np.ndarray) -> np.ndarray:
    """Per object: size factor x contrast factor, each in [0.5, 1]."""
    if len(ob) == 0:
        return np.zeros(0)
    s = arr.shape[0]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).astype(np.float64)
    bg = np.median(border, axis=0)
    q = np.empty(len(ob))
    for j, (x1, y1, x2, y2) in enumerate(ob):
        size = np.clip(np.sqrt(max(x2 - x1, 0) * max(y2 - y1, 0)) / 0.3, 0.5, 1.0)
        cx, cy, hw, hh = (x1 + x2) / 2 * s, (y1 + y2) / 2 * s, max((x2 - x1) * s * 0.1, 0.5), max((y2 - y1) * s * 0.1, 0.5)
        patch = arr[int(max(cy - hh, 0)):int(min(cy + hh, s - 1)) + 1, int(max(cx - hw, 0)):int(min(cx + hw, s - 1)) + 1]
        colour = patch.reshape(-1, 3).mean(0) if patch.size else bg
        contrast = np.clip(np.linalg.norm(colour - bg) / 60.0, 0.5, 1.0)
        q[j] = size * contrast
    return q
