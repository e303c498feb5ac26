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

The flip is NOT part of the composed transform: the caller decides it (``hflip`` is off by default because captions
speak of left and right) so that both views of a sample share it and the caption can be fixed with
``swap_left_right``. All randomness comes from torch's default CPU generator, which the data pipeline seeds per
sample; a transform therefore gives the same output for the same seed in any process.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
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
    """

    def __init__(self, size: int, *, augment: str = "none", normalize: str = "clip", train: bool = True,
                 crop_min_scale: float = 0.2, resize: str = "square"):
        if augment not in AUGMENTS:
            raise ValueError(f"data.augment={augment!r}: expected one of {AUGMENTS}")
        if resize not in RESIZES:
            raise ValueError(f"data.resize={resize!r}: expected one of {RESIZES}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize={normalize!r}: expected one of {tuple(NORMALIZATIONS)}")
        if not 0.0 < crop_min_scale <= 1.0:
            raise ValueError(f"data.crop_min_scale={crop_min_scale}: expected a value in (0, 1]")
        self.size, self.augment, self.train, self.resize = size, augment if train else "none", train, resize
        bicubic = T.InterpolationMode.BICUBIC
        if self.augment == "none":
            self.pre = resize_transform(size, resize)
            self.post = None
        else:
            pre = [T.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), interpolation=bicubic)]
            if self.augment == "tcl":
                pre += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                        T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5)]
            self.pre = T.Compose(pre)
            self.post = RandomAugment(2, 7)
        mean, std = NORMALIZATIONS[normalize]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def pil(self, img: Image.Image, flip: bool = False) -> Image.Image:
        """The augmented (or resized) PIL image, before conversion to a tensor."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = self.pre(img)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.post is not None:
            img = self.post(img)
        return img

    def uint8(self, img: Image.Image, flip: bool = False) -> torch.Tensor:
        """The augmented image as uint8 [S, S, 3] (HWC); ``normalize_uint8_batch`` turns a stack of them into the
        normalised float batch in two vectorised passes, which is cheaper than converting sample by sample."""
        return torch.from_numpy(np.asarray(self.pil(img, flip)).copy())

    def __call__(self, img: Image.Image, flip: bool = False) -> torch.Tensor:
        x = TF.pil_to_tensor(self.pil(img, flip)).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, augment={self.augment!r}, train={self.train}, "
                f"resize={self.resize!r})")


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
                          crop_min_scale=getattr(cfg, "crop_min_scale", 0.2), resize=getattr(cfg, "resize", "square"))


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
           "swap_left_right", "normalize_uint8_batch", "denormalize", "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN",
           "IMAGENET_STD", "AUGMENTS", "RESIZES"]
