"""Vision tower: a timm Vision Transformer returning every block's tokens.

``VisionTower(VisionConfig(...))`` wraps a ``timm.models.vision_transformer.VisionTransformer`` as ``self.vit``
(classifier head removed), so its parameters are ``vit.{cls_token, pos_embed, patch_embed.proj.*,
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*}``: exactly ALBEF/TCL's ViT names under the
prefix ``vit.`` (official ``visual_encoder.`` -> ``<tower>.vit.``).

Position embeddings follow the resolution: a model built with ``img_size`` S gets a (S/patch)² grid; loading a
state dict (``load_state_dict`` of any parent, ``checkpoint=``, or timm's ``pretrained=``) from another grid
resamples ``pos_embed`` bicubically on the grid (align_corners=False, no antialias: ALBEF's
``interpolate_pos_embed``), keeping the class-token row.

Later towers (CLIP-ViT for BridgeTower) fit the same class: timm's CLIP ViTs are ``VisionTransformer`` too
(``pre_norm=True``, QuickGELU; pass such options through ``timm_kwargs`` or by name), and ``hidden_states`` are the
raw block outputs, so a per-layer shared ``ln_post`` is ``tower.final_norm(h)`` for each.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["VisionConfig", "VisionOutput", "VisionTower", "resample_pos_embed", "load_vision_state_dict"]

log = logging.getLogger(__name__)

# The architecture of name="custom" when a field is left None: ViT-B/16 as ALBEF/TCL use it.
_CUSTOM_DEFAULTS = dict(patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0, qkv_bias=True, ln_eps=1e-6)
# VisionConfig field -> timm VisionTransformer argument.
_TIMM_ARG = dict(patch_size="patch_size", width="embed_dim", depth="depth", heads="num_heads", mlp_ratio="mlp_ratio",
                 qkv_bias="qkv_bias")
# What makes a timm ViT an OpenAI CLIP image tower (VisionConfig.clip).
CLIP_TIMM_KWARGS = dict(pre_norm=True, act_layer="quick_gelu")


@dataclass
class VisionConfig:
    """Configuration of :class:`VisionTower` (one field per constructor argument).

    Architecture fields left ``None`` come from the timm architecture ``name`` (for ``name="custom"``: ViT-B/16 with
    LayerNorm eps 1e-6, ALBEF's ViT). Set on a timm name, they override that architecture.
    """

    name: str = "custom"  # a timm ViT name (vit_base_patch16_224, deit_base_patch16_224, ...) or "custom"
    img_size: int = 224
    patch_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    qkv_bias: Optional[bool] = None
    ln_eps: Optional[float] = None
    pretrained: bool = False  # timm weights by name (needs them in the local cache: no network here)
    checkpoint: Optional[str] = None  # a state dict file (.pth/.pt/.bin/.safetensors) loaded after construction
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # further VisionTransformer arguments

    def __post_init__(self):
        if self.name == "custom" and self.pretrained:
            raise ValueError("vision: pretrained=True needs a timm architecture name; for name='custom' use "
                             "checkpoint=PATH")
        if self.img_size <= 0:
            raise ValueError(f"vision: img_size must be positive, got {self.img_size}")

    @classmethod
    def tiny(cls, **overrides) -> "VisionConfig":
        """64 px, patch 16 (4x4 grid + CLS = 17 tokens), width 64, depth 2, 4 heads: tcl_tiny's ViT."""
        base = dict(name="custom", img_size=64, patch_size=16, width=64, depth=2, heads=4, mlp_ratio=4.0,
                    qkv_bias=True, ln_eps=1e-6)
        return cls(**{**base, **overrides})

    @classmethod
    def base(cls, **overrides) -> "VisionConfig":
        """ALBEF/TCL's ViT-B/16 (DeiT-base weights when ``checkpoint`` points at them), 256 px pre-training."""
        return cls(**{**dict(name="custom", img_size=256, **_CUSTOM_DEFAULTS), **overrides})

    @classmethod
    def clip(cls, **overrides) -> "VisionConfig":
        """OpenAI CLIP's image tower (ViT-B/16 unless overridden), BridgeTower's vision encoder, on timm's ViT.

        timm's ``vit_base_patch16_clip_quickgelu_224`` architecture: pre-norm (``norm_pre`` = CLIP's ``ln_pre``, and
        no patch-embedding bias), QuickGELU, LayerNorm eps 1e-5, final norm ``norm`` = CLIP's ``ln_post``
        (BridgeTower applies it to every block's output: ``tower.final_norm``). ``timm_kwargs`` given here are merged
        over ``{pre_norm: True, act_layer: quick_gelu}``. An OpenAI CLIP ``visual.*`` state dict converts to these names
        with ``vlp.convert.bridgetower.clip_visual_to_timm``.
        """
        timm_kwargs = {**CLIP_TIMM_KWARGS, **overrides.pop("timm_kwargs", {})}
        base = dict(name="custom", img_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0,
                    qkv_bias=True, ln_eps=1e-5)
        return cls(**{**base, **overrides}, timm_kwargs=timm_kwargs)


@dataclass
class VisionOutput:
    """``last_hidden_state``: [B, 1+P, D] after the final norm (CLS at index 0); ``hidden_states``: one [B, 1+P, D]
    per block, the raw block outputs (no final norm), in order; ``hidden_states[-1]`` normed is ``last_hidden_state``."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def _build_config(config: VisionConfig | None, fields: dict) -> VisionConfig:
    config = config if config is not None else VisionConfig()
    return dataclasses.replace(config, **fields) if fields else config


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1,
                       old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic resampling of a [1, prefix + H*W, D] position embedding to ``new_grid``; prefix rows are kept.

    ALBEF/TCL's ``interpolate_pos_embed`` semantics (square old grid unless given, align_corners=False, no antialias).
    """
    from timm.layers import resample_abs_pos_embed

    n_old = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"pos_embed has {n_old} patch positions, not a square grid; pass old_grid")
        old_grid = (side, side)
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)


def load_vision_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ViT state dict from ``.safetensors`` or a torch file; unwrap ``model``/``state_dict``/``module``
    containers; strip ``module.``; keep only the ViT when the file holds a whole model (keys under
    ``visual_encoder.``, ``vision.vit.`` or ``vit.``); drop classifier keys (``head.*``, ``head_dist.*``)."""
    from vlp.utils.checkpoint import CheckpointError, read_weights

    path = Path(path)
    what = "a ViT state dict (model.vision.checkpoint: .safetensors, .pth or .pt)"
    sd: Any = read_weights(path, what=what)  # never runs code from the file
    while isinstance(sd, dict):
        inner = next((sd[k] for k in ("model", "state_dict", "module") if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(path, "no state dict of tensors found", what)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for prefix in ("visual_encoder.", "vision.vit.", "vit."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}


class VisionTower(nn.Module):
    """timm ViT that returns all tokens of every block. ``VisionTower(config)`` or ``VisionTower(**fields)`` or both
    (fields override the config).

    ``forward(pixel_values [B, 3, S, S]) -> VisionOutput``; ``width``, ``num_tokens``, ``grid_size`` describe it.
    """

    def __init__(self, config: VisionConfig | None = None, **fields):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        cfg = _build_config(config, fields)
        self.config = cfg
        kwargs: dict[str, Any] = dict(img_size=cfg.img_size, num_classes=0, drop_path_rate=cfg.drop_path)
        arch = {k: getattr(cfg, k) for k in _CUSTOM_DEFAULTS}
        if cfg.name == "custom":
            arch = {k: (_CUSTOM_DEFAULTS[k] if v is None else v) for k, v in arch.items()}
        for key, value in arch.items():
            if value is not None and key in _TIMM_ARG:
                kwargs[_TIMM_ARG[key]] = value
        if arch["ln_eps"] is not None:
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=arch["ln_eps"])
        kwargs.update(cfg.timm_kwargs)

        if cfg.name == "custom":
            vit = VisionTransformer(**kwargs)
        else:
            try:
                vit = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
            except RuntimeError as e:
                if "Unknown model" in str(e):
                    raise ValueError(f"vision.name: unknown timm architecture {cfg.name!r}") from None
                raise
            except OSError as e:  # offline and not cached
                raise OSError(f"vision: cannot load timm weights for {cfg.name!r} ({e}); with no network they must "
                              f"be in the local cache, or use checkpoint=PATH") from e
            if not isinstance(vit, VisionTransformer):
                raise ValueError(f"vision.name: {cfg.name!r} builds a {type(vit).__name__}; VisionTower needs a "
                                 f"timm VisionTransformer (vit_*, deit_*, *_clip_*)")
        self.vit = vit
        self.grad_checkpointing = cfg.grad_checkpointing
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.vit.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid_size
        return self.num_prefix_tokens + gh * gw

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's final LayerNorm (CLIP's ``ln_post``), e.g. for BridgeTower's normed per-layer states."""
        return self.vit.norm(tokens)

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        vit = self.vit
        x = vit.patch_embed(pixel_values)
        x = vit._pos_embed(x)  # prepend CLS, add pos_embed, pos dropout
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        hidden = []
        for blk in vit.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
            hidden.append(x)
        return VisionOutput(last_hidden_state=vit.norm(x), hidden_states=tuple(hidden))

    # ---------------------------------------------------------------------------------------------------------------
    def _resample_if_needed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        target = self.vit.pos_embed
        if target is None or pos_embed.shape == target.shape:
            return pos_embed
        if pos_embed.dim() != 3 or pos_embed.shape[-1] != target.shape[-1]:
            return pos_embed  # let load_state_dict report the mismatch
        prefix = 0 if getattr(self.vit, "no_embed_class", False) else self.num_prefix_tokens
        resized = resample_pos_embed(pos_embed, self.grid_size, num_prefix_tokens=prefix)
        log.info("vision: resampled pos_embed %s -> %s", tuple(pos_embed.shape), tuple(resized.shape))
        return resized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the children load (torch loads a module, then recurses): a pos_embed saved at another
        # resolution is resampled here, whichever parent's load_state_dict brought it.
        key = prefix + "vit.pos_embed"
        if key in state_dict and isinstance(state_dict[key], torch.Tensor):
            state_dict[key] = self._resample_if_needed(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_checkpoint(self, path: str | Path) -> list[str]:
        """Load ViT weights from a file (see :func:`load_vision_state_dict`), resampling ``pos_embed``.

        Every parameter of the tower must be in the file (a missing one raises); keys the tower does not have are
        ignored and returned (logged as a warning)."""
        sd = load_vision_state_dict(path)
        if "pos_embed" in sd:
            sd["pos_embed"] = self._resample_if_needed(sd["pos_embed"])
        missing, unexpected = self.vit.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"vision checkpoint {path} lacks {len(missing)} tower parameters: {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            log.warning("vision checkpoint %s: ignored %d keys the tower does not have: %s", path, len(unexpected),
                        unexpected[:8])
        return list(unexpected)
