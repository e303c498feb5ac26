"""Image transforms for training and evaluation, and the caption fix-up that goes with a horizontal flip.

Training (``augment``), after ALBEF/TCL (papers/tcl_bridgetower.md A.2), in this order:

- ``none``:  the evaluation resize (``resize``, below).
- ``albef``: RandomResizedCrop(scale=(crop_min_scale, 1), bicubic) -> [flip] -> RandomAugment(N=2, M=7) with ALBEF's
  op set {Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate}.
- ``tcl``:   RandomResizedCrop -> ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 -> RandomGrayscale p=0.2 ->
  GaussianBlur(sigma in [0.1, 2]) p=0.5 -> [flip] -> RandomAugment(2, 7).

then ToTensor and CLIP or ImageNet normalisation. Evaluation (and ``none``): the ``resize`` rule, ToTensor,
normalise:

- ``square`` (ALBEF/TCL ``Resize((S, S), bicubic)``): the whole image, squeezed to S x S;
- ``short_side_crop`` (BridgeTower's ``clip_transform``, microsoft/BridgeTower ``src/transforms/transform.py``:
  ``Resize(S, bicubic)`` then ``CenterCrop(S)``): the short side scaled to S, aspect kept, the centre S x S kept.

JPEG draft decoding (``jpeg_draft``, on by default). An image that arrives opened but not yet decoded (what
``vlp.data.collate.decode_image`` returns for JPEG members) is decoded inside the transform, at a DCT scale of 1/2,
1/4 or 1/8 when the region the geometric step resamples keeps at least ``S`` pixels along each side at that scale:
the crop box is drawn as before, from the FULL image size (same torch draws, same box in full-resolution
coordinates), the largest factor f in {1, 2, 4, 8} with ``box_w / f >= S`` and ``box_h / f >= S`` is chosen, and the
box / f is resampled from the drafted image (libjpeg's scaled IDCT: drafted pixel k covers full pixels [k f,
(k + 1) f)). The seeds, the sample and the crop are thus unchanged; only the resampling differs slightly (the DCT
reduction is a box filter before the bicubic one). At f = 1 (crop too small, image too small, PNG/WebP, an image
already decoded) the output is byte-identical to ``jpeg_draft=False``.

The flip is NOT part of the composed transform: the caller decides it (``hflip`` is off by default because captions
speak of left and right) so that both views of a sample share it and the caption can be fixed with
``swap_left_right``. All randomness comes from torch's default CPU generator, which the data pipeline seeds per
sample; a transform therefore gives the same output for the same seed in any process.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, JpegImagePlugin
from torchvision import transforms as T
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
AUGMENTS = ("none", "albef", "tcl")
RESIZES = ("square", "short_side_crop")

# ---------------------------------------------------------------------------------------------------------------------
# ALBEF's RandomAugment (ALBEF:dataset/randaugment.py): N ops drawn with replacement from the list, each applied with
# probability 0.5 at magnitude M of MAX_LEVEL=10. Magnitudes as in ALBEF: enhance factor M/10*1.8+0.1 (no sign),
# shear M/10*0.3 (random sign), translate M/10*10 px at 256 px (scaled here to the image size), rotate M/10*30 deg
# (random sign); geometric ops fill with grey 128. ALBEF uses numpy's global RNG and OpenCV; this uses torch's RNG
# and PIL, which keeps it reproducible under the pipeline's per-sample seeding.
ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
             "TranslateY", "Rotate")
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _sign() -> float:
    return -1.0 if torch.rand(()) < 0.5 else 1.0


class RandomAugment:
    """ALBEF/TCL ``RandomAugment(N, M)`` on PIL RGB images."""

    def __init__(self, n: int = 2, m: int = 7, ops: tuple[str, ...] = ALBEF_OPS):
        unknown = set(ops) - set(ALBEF_OPS)
        if unknown:
            raise ValueError(f"RandomAugment: unknown ops {sorted(unknown)}; known: {ALBEF_OPS}")
        self.n, self.m, self.ops = n, m, tuple(ops)

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.ops), (self.n,)).tolist()
        for i in picks:
            if torch.rand(()) > 0.5:  # ALBEF: ``if np.random.random() > prob: continue``
                continue
            img = self._apply(self.ops[i], img)
        return img

    def _apply(self, op: str, img: Image.Image) -> Image.Image:
        level = self.m / _MAX_LEVEL
        w, h = img.size
        if op == "Identity":
            return img
        if op == "AutoContrast":
            return ImageOps.autocontrast(img)
        if op == "Equalize":
            return ImageOps.equalize(img)
        if op == "Brightness":
            return ImageEnhance.Brightness(img).enhance(level * 1.8 + 0.1)
        if op == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(level * 1.8 + 0.1)
        if op == "ShearX":
            s = _sign() * level * 0.3
            return img.transform(img.size, Image.Transform.AFFINE, (1, s, -s * h / 2, 0, 1, 0),
                                 resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        if op == "ShearY":
            s = _sign() * level * 0.3
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, -s * w / 2),
                                 resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        if op == "TranslateX":
            t = _sign() * level * 10.0 * w / 256.0
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, t, 0, 1, 0), fillcolor=_FILL)
        if op == "TranslateY":
            t = _sign() * level * 10.0 * h / 256.0
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, t), fillcolor=_FILL)
        if op == "Rotate":
            return img.rotate(_sign() * level * 30.0, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        raise AssertionError(op)


class RandomGaussianBlur:
    """MoCo/TCL ``GaussianBlur([.1, 2.])``: PIL Gaussian blur with sigma ~ U(0.1, 2.0) (no kernel-size cap)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        s = self.sigma[0] + float(torch.rand(())) * (self.sigma[1] - self.sigma[0])
        return img.filter(ImageFilter.GaussianBlur(radius=s))


class ImageTransform:
    """PIL RGB image (+ flip decision) -> normalised float tensor [3, S, S].

    ``flip`` is applied where the papers put RandomHorizontalFlip (after the colour ops, before RandomAugment).
    ``jpeg_draft``: decode a not-yet-decoded JPEG at the smallest DCT scale that keeps S pixels per side of the
    resampled region (module docstring); False: decode it in full, byte-identical to a pre-decoded image.
    """

    def __init__(self, size: int, *, augment: str = "none", normalize: str = "clip", train: bool = True,
                 crop_min_scale: float = 0.2, resize: str = "square", jpeg_draft: bool = True):
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment={augment!r}: expected one of {AUGMENTS}")
        if resize not in RESIZES:
            raise ValueError(f"data.resize={resize!r}: expected one of {RESIZES}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize={normalize!r}: expected one of {tuple(NORMALIZATIONS)}")
        if not 0.0 < crop_min_scale <= 1.0:
            raise ValueError(f"data.crop_min_scale={crop_min_scale}: expected a value in (0, 1]")
        self.size, self.augment, self.train, self.resize = size, augment if train else "none", train, resize
        self.jpeg_draft = jpeg_draft
        bicubic = T.InterpolationMode.BICUBIC
        # ``crop`` (the geometric step) and ``colour`` are kept apart so that the draft path can replace the first
        # alone; ``pre`` is the two composed, the full-resolution path.
        self.crop: Optional[T.RandomResizedCrop] = None
        self.colour: Optional[T.Compose] = None
        if self.augment == "none":
            self.pre = resize_transform(size, resize)
            self.post = None
        else:
            self.crop = T.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), interpolation=bicubic)
            pre = [self.crop]
            if self.augment == "tcl":
                self.colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                                         T.RandomGrayscale(p=0.2), T.RandomApply([RandomGaussianBlur((0.1, 2.0))],
                                                                                  p=0.5)])
                pre += list(self.colour.transforms)
            self.pre = T.Compose(pre)
            self.post = RandomAugment(2, 7)
        mean, std = NORMALIZATIONS[normalize]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def pil(self, img: Image.Image, flip: bool = False) -> Image.Image:
        """The augmented (or resized) PIL image, before conversion to a tensor."""
        lazy = is_lazy_jpeg(img)
        if lazy and self.jpeg_draft:
            img = self._drafted(img)
            if self.colour is not None:
                img = self.colour(img)
        else:
            if lazy:  # decoded here, once for both views, in full: exactly what a pre-decoded image gives
                img = jpeg_at_scale(img, 1)[0]
            if img.mode != "RGB":
                img = img.convert("RGB")
            img = self.pre(img)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.post is not None:
            img = self.post(img)
        return img

    def _drafted(self, img: Image.Image) -> Image.Image:
        """The geometric step (RandomResizedCrop or the deterministic resize) of a not-yet-decoded JPEG, decoded at
        the largest DCT reduction its region allows. The box is drawn / computed on the full size first, so torch's
        generator advances exactly as on the full image."""
        width, height = img.size  # known from the JPEG header, before any decode
        if self.crop is not None:
            i, j, h, w = T.RandomResizedCrop.get_params(img, self.crop.scale, self.crop.ratio)
            box = (j, i, j + w, i + h)
        else:
            box = resize_box(width, height, self.size, self.resize)
        src, f = jpeg_at_scale(img, draft_factor(box[2] - box[0], box[3] - box[1], self.size))
        if f == 1:  # the full decode: the very resampling of the full-resolution path
            if self.crop is not None:
                return TF.resized_crop(src, i, j, h, w, self.crop.size, self.crop.interpolation,
                                       antialias=self.crop.antialias)
            return self.pre(src)
        return src.resize((self.size, self.size), Image.Resampling.BICUBIC, box=tuple(v / f for v in box))

    def uint8(self, img: Image.Image, flip: bool = False) -> torch.Tensor:
        """The augmented image as uint8 [S, S, 3] (HWC); ``normalize_uint8_batch`` turns a stack of them into the
        normalised float batch in two vectorised passes, which is cheaper than converting sample by sample."""
        return torch.from_numpy(np.array(self.pil(img, flip)))  # one writable array (no asarray + copy)

    def __call__(self, img: Image.Image, flip: bool = False) -> torch.Tensor:
        x = TF.pil_to_tensor(self.pil(img, flip)).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, augment={self.augment!r}, train={self.train}, "
                f"resize={self.resize!r}, jpeg_draft={self.jpeg_draft})")


# ---------------------------------------------------------------------------------------------------------------------
# JPEG draft decoding (module docstring)

DRAFT_FACTORS = (8, 4, 2)  # libjpeg's scaled IDCT: 1/8, 1/4, 1/2 (and 1, no reduction)
_DRAFTS = "_vlp_drafts"  # attribute of a lazy JPEG: {factor: its decode at that DCT scale}, shared by its views


def is_lazy_jpeg(img) -> bool:
    """``img`` is a JPEG whose decode is still to be chosen here: opened but not decoded and not drafted by anyone
    else, or one this module already decoded (its decodes are kept on it, see :func:`jpeg_at_scale`)."""
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        return False
    return _DRAFTS in vars(img) or _undecoded(img)


def _undecoded(img) -> bool:
    return len(img.tile) == 1 and not img.decoderconfig and getattr(img, "fp", None) is not None


def draft_factor(box_w: float, box_h: float, size: int) -> int:
    """The largest reduction f in {1, 2, 4, 8} that keeps ``size`` pixels along each side of a ``box_w x box_h``
    region: reducing further would lose detail the final resize to ``size`` keeps."""
    return next((f for f in DRAFT_FACTORS if box_w / f >= size and box_h / f >= size), 1)


def jpeg_at_scale(img: Image.Image, factor: int) -> tuple[Image.Image, int]:
    """A lazy JPEG (:func:`is_lazy_jpeg`) decoded to RGB at DCT scale 1/``factor`` or finer: ``(image, actual
    factor)``.

    Decodes are kept on ``img``, and one made earlier (by the sample's other view) at a factor <= ``factor`` is
    reused, so two views cost one decode unless the second needs a finer scale than the first. Factor 1 decodes
    ``img`` itself in place (it is then the ordinary full decode, and its RGB conversion is made once); a reduced
    decode is made on a second handle of the same bytes, so that ``img`` stays undecoded for a later, finer request.
    """
    drafts = vars(img).setdefault(_DRAFTS, {})
    usable = [f for f in drafts if f <= factor]
    if usable:
        f = max(usable)
        return drafts[f], f
    if factor > 1 and _undecoded(img):
        width, height = img.size
        handle = Image.open(img.fp)  # the same file object: Image.open seeks to 0, a decode seeks to its offset
        drafted = handle.draft("RGB", (width // factor, height // factor))
        scale = round(width / drafted[1][2]) if drafted is not None else 1
        if scale > 1:  # Image.draft picks the largest scale that keeps the requested size: ``factor`` here
            handle.load()
            drafts[scale] = handle if handle.mode == "RGB" else handle.convert("RGB")
            return drafts[scale], scale
    img.load()
    drafts[1] = img if img.mode == "RGB" else img.convert("RGB")
    return drafts[1], 1


def resize_box(width: int, height: int, size: int, resize: str = "square") -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1, full-resolution pixels) that ``resize_transform(size, resize)`` turns into the
    ``size x size`` output: the whole image (``square``), or the centre square that torchvision's ``Resize(size)``
    + ``CenterCrop(size)`` keep, mapped back through the resize (``short_side_crop``)."""
    if resize == "square":
        return 0.0, 0.0, float(width), float(height)
    if resize == "short_side_crop":
        short, long = min(width, height), max(width, height)
        new_short, new_long = size, int(size * long / short)  # torchvision's Resize(size) output
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + size) * sx, (top + size) * sy
    raise ValueError(f"data.resize={resize!r}: expected one of {RESIZES}")


def resize_transform(size: int, resize: str = "square"):
    """The deterministic resize of evaluation and ``augment=none`` (module docstring), bicubic."""
    bicubic = T.InterpolationMode.BICUBIC
    if resize == "square":
        return T.Resize((size, size), interpolation=bicubic)
    if resize == "short_side_crop":
        return T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    raise ValueError(f"data.resize={resize!r}: expected one of {RESIZES}")


def build_transform(cfg, train: bool) -> ImageTransform:
    """The transform a ``ShardsDataConfig`` asks for (``train=False``: the evaluation resize)."""
    return ImageTransform(cfg.image_size, augment=cfg.augment, normalize=cfg.normalize, train=train,
                          crop_min_scale=getattr(cfg, "crop_min_scale", 0.2), resize=getattr(cfg, "resize", "square"),
                          jpeg_draft=getattr(cfg, "jpeg_draft", True))


_LR = re.compile(r"\b(left|right)(?=(?:most|ward|wards|hand|side|s)?\b)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (also leftmost, rightward, left-hand ...), keeping each word's capitalisation."""

    def repl(m: re.Match) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LR.sub(repl, text)


def normalize_uint8_batch(images: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] (equal to ToTensor + Normalize per image)."""
    mean, std = NORMALIZATIONS[normalize]
    out = torch.empty(images.shape[0], 3, images.shape[1], images.shape[2], dtype=torch.float32)
    out.copy_(images.permute(0, 3, 1, 2))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    return out.mul_(scale).add_(shift)


def denormalize(x: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """Inverse of the normalisation (for plots and tests)."""
    mean, std = NORMALIZATIONS[normalize]
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


__all__ = ["ImageTransform", "RandomAugment", "RandomGaussianBlur", "build_transform", "resize_transform",
           "is_lazy_jpeg", "draft_factor", "jpeg_at_scale", "resize_box", "DRAFT_FACTORS",
           "swap_left_right", "normalize_uint8_batch", "denormalize", "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN",
           "IMAGENET_STD", "AUGMENTS", "RESIZES"]
