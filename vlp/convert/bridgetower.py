"""BridgeTower checkpoints -> vlp ``BridgeTower``: transformers' ``save_pretrained`` directories, the official
repository's Lightning checkpoints, and OpenAI CLIP image towers.

Every file is read without executing code (``vlp.convert.common``: safetensors, or ``torch.load(weights_only=True)``).

Key map: transformers (``bridgetower.`` prefix stripped) | official (``state_dict`` of the Lightning .ckpt) -> vlp.
``{i}`` a CLIP block, ``{l}`` a cross layer, ``{m}`` a bridge (``link_tower.{m}`` feeds cross layer m+1), ``{t}`` text
or image::

    vision_model.visual.embeddings.class_embedding [D]     | vit_model.visual.class_embedding
        -> vision.vit.cls_token [1, 1, D]
    vision_model.visual.embeddings.patch_embedding.weight  | vit_model.visual.conv1.weight
        -> vision.vit.patch_embed.proj.weight
    vision_model.visual.embeddings.position_embedding.weight [N+1, D] | vit_model.visual.positional_embedding
        -> vision.vit.pos_embed [1, N+1, D]
    (vision_model | vit_model).visual.ln_pre.*              -> vision.vit.norm_pre.*
    ....visual.transformer.resblocks.{i}.attn.in_proj_*     -> vision.vit.blocks.{i}.attn.qkv.*  (q, k, v order kept)
    ....resblocks.{i}.attn.out_proj.*                       -> vision.vit.blocks.{i}.attn.proj.*
    ....resblocks.{i}.ln_1.* | ln_2.*                       -> vision.vit.blocks.{i}.norm1.* | norm2.*
    ....resblocks.{i}.mlp.c_fc.* | mlp.c_proj.*             -> vision.vit.blocks.{i}.mlp.fc1.* | fc2.*
    ....visual.ln_post.*                                    -> vision.vit.norm.*  (applied to every layer)
    text_model.{embeddings,encoder}.*  | text_transformer.{embeddings,encoder}.*  -> text.{embeddings,encoder}.*
    cross_modal_{t}_layers.{l}.*                            -> cross_modal.{t}_layers.{l}.*
    cross_modal_{t}_layernorm.*                             -> cross_modal.{t}_input_norm.*
    cross_modal_{t}_link_tower.{m}.LayerNorm.*              -> cross_modal.{t}_bridges.{m}.LayerNorm.*
    cross_modal_{t}_link_tower.{m}.scaled_factor | .beta (0-d)  -> cross_modal.{t}_bridges.{m}.scale | .beta [1]
    cross_modal_{t}_transform.*, cross_modal_{t}_pooler.*   -> same names
    token_type_embeddings.weight [2, H] ([3, H] after NLVR2: the first 2 rows are kept)  -> same name
    mlm_score.{transform.*, decoder.weight, bias}           -> mlm_head.*  (a tied save: decoder = word embeddings)
    itm_score.fc.*                                          -> itm_head.*
    official only: itc_{t}_head.fc.*                        -> itc_{t}_head.*
    official only: temperature (0-d)                        -> itc_temp.value [1]
    official only: vqa_classifier.{0,1,3}.*                 -> vqa_head.{0,1,3}.*

({t} = text | image.) Dropped: the uni-modal text pooler (``text_model.pooler`` / ``text_transformer.pooler``: unused),
``position_ids`` / ``token_type_ids`` buffers, CLIP's leftovers outside ``visual`` (``vit_model.positional_embedding``,
``vit_model.ln_final``, ...) and ``visual.proj``. Not converted, with a warning: NLVR2/SNLI heads and ``rank_output``,
and transformers' ``ForContrastiveLearning`` heads (a different ITC objective: ``itc_cross_modal_head``,
``logit_scale``). CLIP's fused attention ``in_proj`` [3D, D] is timm's ``qkv`` as it is (q, k, v in that order).

LayerNorm eps per module, as each source builds them: transformers takes every cross-layer eps from ``text_config``
and the bridges', first-layer LNs' and MLM transform's from the top-level ``layer_norm_eps`` (1e-5 by default); the
official code uses 1e-12 in the cross layers and the MLM transform, 1e-5 elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from vlp.blocks.text import TextConfig
from vlp.blocks.vision import VisionConfig
from vlp.convert.common import (CheckpointError, check_fit, layer_indices, load_file, read_hf_weights,
                                rename_by_prefix, report_skipped, tensor_dict, unknown_keys_error)

log = logging.getLogger(__name__)

__all__ = ["clip_visual_to_timm", "convert_hf", "build_config_from_hf", "load_hf", "convert_official",
           "build_config_from_official", "load_official", "build_module"]

_CLIP_BLOCK = [("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
               ("attn.out_proj.", "attn.proj."), ("ln_1.", "norm1."), ("ln_2.", "norm2."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
_CROSS = [  # shared by transformers and the official code; the first match wins
    ("cross_modal_text_layers.", "cross_modal.text_layers."),
    ("cross_modal_image_layers.", "cross_modal.image_layers."),
    ("cross_modal_text_layernorm.", "cross_modal.text_input_norm."),
    ("cross_modal_image_layernorm.", "cross_modal.image_input_norm."),
    ("cross_modal_text_link_tower.", "cross_modal.text_bridges."),
    ("cross_modal_image_link_tower.", "cross_modal.image_bridges."),
    ("cross_modal_text_transform.", "cross_modal_text_transform."),
    ("cross_modal_image_transform.", "cross_modal_image_transform."),
    ("cross_modal_text_pooler.", "cross_modal_text_pooler."),
    ("cross_modal_image_pooler.", "cross_modal_image_pooler."),
    ("token_type_embeddings.", "token_type_embeddings."),
    ("mlm_score.", "mlm_head."),
    ("itm_score.fc.", "itm_head."),
    ("vqa_classifier.", "vqa_head."),
]
_UNSUPPORTED_HEADS = ("nlvr2_classifier.", "snli_classifier.", "rank_output.", "itc_cross_modal_head.", "logit_scale")


# ------------------------------------------------------------------------------------------------- CLIP ViT ---
def clip_visual_to_timm(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A CLIP image tower's state dict -> timm ``VisionTransformer`` names (``VisionConfig.clip``'s tower, no
    ``vit.`` prefix: loadable with ``vision.checkpoint=PATH`` once saved).

    Accepts OpenAI CLIP's ``visual.*`` layout (``conv1``, ``class_embedding``, ``positional_embedding``) and
    transformers BridgeTower's (``embeddings.patch_embedding``, ``embeddings.class_embedding``,
    ``embeddings.position_embedding.weight``); keys must start with ``prefix`` (e.g. ``"visual."``), others are
    ignored. ``proj`` (CLIP's output projection) and ``ln_separate`` are dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k in ("class_embedding", "embeddings.class_embedding"):
            out["cls_token"] = value.reshape(1, 1, -1)
        elif k in ("positional_embedding", "embeddings.position_embedding.weight"):
            out["pos_embed"] = value.reshape(1, *value.shape[-2:])
        elif k in ("conv1.weight", "embeddings.patch_embedding.weight"):
            out["patch_embed.proj.weight"] = value
        elif k.startswith("ln_pre."):
            out["norm_pre." + k[len("ln_pre."):]] = value
        elif k.startswith("ln_post."):
            out["norm." + k[len("ln_post."):]] = value
        elif k.startswith("transformer.resblocks."):
            i, rest = k[len("transformer.resblocks."):].split(".", 1)
            for old, new in _CLIP_BLOCK:
                if rest.startswith(old):
                    out[f"blocks.{i}.{new}{rest[len(old):]}"] = value
                    break
            else:
                unknown.append(key)
        elif k == "proj" or k == "embeddings.position_ids" or k.startswith("ln_separate."):
            continue
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"CLIP image tower: unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def _clip_vision_config(sd: dict[str, torch.Tensor], heads: int | None = None, ln_eps: float = 1e-5) -> VisionConfig:
    """The ``VisionConfig.clip`` that a timm-named CLIP state dict (from :func:`clip_visual_to_timm`) fits."""
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"CLIP position embedding has {n} patch positions: not a square grid")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return VisionConfig.clip(img_size=grid * patch, patch_size=patch, width=width, depth=depth,
                             heads=heads or max(1, width // 64),
                             mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width, ln_eps=ln_eps)


# ----------------------------------------------------------------------------------------- the common mapping ---
def _map_fusion_and_heads(key: str, value: torch.Tensor, out: dict, skipped: list) -> bool:
    """Cross-modal, token-type and head keys (same names in transformers and the official code)."""
    ours = rename_by_prefix(key, _CROSS)
    if ours is not None:
        if ours.endswith(".scaled_factor"):
            ours, value = ours[: -len("scaled_factor")] + "scale", value.reshape(1)
        elif "_bridges." in ours and ours.endswith(".beta"):
            value = value.reshape(1)
        elif ours == "token_type_embeddings.weight" and value.shape[0] > 2:
            log.warning("token_type_embeddings has %d rows (NLVR2); keeping the first 2", value.shape[0])
            value = value[:2]
        out[ours] = value
        return True
    if key == "temperature":
        out["itc_temp.value"] = value.reshape(1).float()
        return True
    if key.startswith(_UNSUPPORTED_HEADS):
        skipped.append(key)
        return True
    return False


def _text_key(rest: str, out: dict, value: torch.Tensor) -> None:
    if rest.startswith("pooler.") or rest.endswith(("position_ids", "embeddings.token_type_ids")):
        return
    out["text." + rest] = value


# ------------------------------------------------------------------------------------------------ transformers ---
def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BridgeTower state dict (Model, ForMaskedLM, ForImageAndTextRetrieval) to vlp keys."""
    out: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    skipped, unknown = [], []
    for key, value in sd.items():
        k = key[len("bridgetower."):] if key.startswith("bridgetower.") else key
        if k.startswith("vision_model.visual."):
            vision[k[len("vision_model.visual."):]] = value
        elif k.startswith("text_model."):
            _text_key(k[len("text_model."):], out, value)
        elif k.startswith(("itc_text_head.", "itc_image_head.")):  # ForContrastiveLearning: another objective
            skipped.append(k)
        elif not _map_fusion_and_heads(k, value, out, skipped):
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown, "transformers BridgeTower state dict")
    if any(k.startswith("ln_separate.") for k in vision):
        raise NotImplementedError("vision_config.share_layernorm=False (one ln_separate per layer) is not supported")
    out.update({"vision.vit." + k: v for k, v in clip_visual_to_timm(vision).items()})
    report_skipped(skipped, "transformers BridgeTower checkpoint")
    return out


def _hf_config_dict(hf_config) -> dict:
    if isinstance(hf_config, (str, Path)):
        return json.loads(Path(hf_config).read_text())
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(hf_config)


def build_config_from_hf(hf_config):
    """A ``BridgeTowerConfig`` for a transformers ``BridgeTowerConfig`` (object, dict or config.json path)."""
    from vlp.models.bridgetower import BridgeTowerConfig

    d = _hf_config_dict(hf_config)
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    get_v = lambda k, default: v.get(k, default)  # noqa: E731
    get_t = lambda k, default: t.get(k, default)  # noqa: E731
    problems = []
    if not get_v("share_layernorm", True):
        problems.append("vision_config.share_layernorm=False (per-layer ln_separate)")
    if get_v("remove_last_layer", False):
        problems.append("vision_config.remove_last_layer=True")
    if get_v("stop_gradient", False):
        problems.append("vision_config.stop_gradient=True")
    if not d.get("share_cross_modal_transformer_layers", True):
        problems.append("share_cross_modal_transformer_layers=False (one transform per layer)")
    if d.get("share_link_tower_layers", False):
        problems.append("share_link_tower_layers=True")
    if d.get("hidden_act", "gelu") != "gelu" or get_t("hidden_act", "gelu") != "gelu":
        problems.append("hidden_act other than gelu")
    hidden = d.get("hidden_size", 768)
    if get_t("hidden_size", 768) != hidden:
        problems.append(f"text_config.hidden_size {get_t('hidden_size', 768)} != hidden_size {hidden} (transformers "
                        f"builds the cross layers from text_config)")
    if problems:
        raise NotImplementedError("unsupported transformers BridgeTower options: " + "; ".join(problems))
    if get_t("attention_probs_dropout_prob", 0.1) != get_t("hidden_dropout_prob", 0.1):
        log.warning("text_config: attention dropout %s != hidden dropout %s; vlp uses one dropout (the hidden one)",
                    get_t("attention_probs_dropout_prob", 0.1), get_t("hidden_dropout_prob", 0.1))
    width = get_v("hidden_size", 768)
    vision = VisionConfig.clip(img_size=get_v("image_size", 288), patch_size=get_v("patch_size", 16), width=width,
                               depth=get_v("num_hidden_layers", 12), heads=max(1, width // 64),
                               ln_eps=get_v("layer_norm_eps", 1e-5))
    vocab = get_t("vocab_size", 50265)
    text = TextConfig(arch="roberta", vocab_size=vocab, hidden=get_t("hidden_size", 768),
                      layers=get_t("num_hidden_layers", 12), heads=get_t("num_attention_heads", 12),
                      intermediate=get_t("intermediate_size", 3072),
                      max_position=get_t("max_position_embeddings", 514),
                      type_vocab_size=get_t("type_vocab_size", 1), ln_eps=get_t("layer_norm_eps", 1e-5),
                      pad_token_id=get_t("pad_token_id", 1), dropout=get_t("hidden_dropout_prob", 0.1),
                      fusion_layers=0, mlm_head=False)
    eps = d.get("layer_norm_eps", 1e-5)
    return BridgeTowerConfig(
        vision=vision, text=text, num_cross_layers=d.get("num_hidden_layers", 6), hidden=hidden,
        cross_heads=get_t("num_attention_heads", 12), cross_intermediate=get_t("intermediate_size", 3072),
        cross_dropout=get_t("hidden_dropout_prob", 0.1), cross_ln_eps=get_t("layer_norm_eps", 1e-5),
        bridge=d.get("link_tower_type", "add"), bridge_ln_eps=eps, mlm_ln_eps=eps,
        loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 0.0})


def convert_hf(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """The vlp state dict of a transformers ``save_pretrained`` directory (BridgeTowerModel, ForMaskedLM or
    ForImageAndTextRetrieval). Heads the class does not have are left out (the module keeps its fresh ones)."""
    sd = convert_hf_state_dict(read_hf_weights(src_dir))
    if "mlm_head.transform.dense.weight" in sd and "mlm_head.decoder.weight" not in sd:
        sd["mlm_head.decoder.weight"] = sd["text.embeddings.word_embeddings.weight"]  # tied in that save
    return sd


def load_hf(src_dir: str | Path):
    """``(BridgeTowerConfig, vlp state dict)`` of a transformers ``save_pretrained`` directory."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(src, "no config.json", "a transformers save_pretrained directory")
    return build_config_from_hf(src / "config.json"), convert_hf(src)


# ------------------------------------------------------------------------------------------------- official ---
OFFICIAL = "an official BridgeTower Lightning checkpoint ({'state_dict': ...})"


def _official_state_dict(ckpt: Any, path) -> dict[str, torch.Tensor]:
    return tensor_dict(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None, path, OFFICIAL)


def convert_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official ``BTTransformer`` state dict to vlp keys (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    skipped, unknown = [], []
    for key, value in sd.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("vit_model.visual."):
            vision[k[len("vit_model.visual."):]] = value
        elif k.startswith("vit_model."):
            continue  # CLIP's text-tower leftovers (positional_embedding, ln_final, ...): unused
        elif k.startswith("text_transformer."):
            _text_key(k[len("text_transformer."):], out, value)
        elif k.startswith(("itc_text_head.fc.", "itc_image_head.fc.")):
            out[k.replace(".fc.", ".", 1)] = value
        elif not _map_fusion_and_heads(k, value, out, skipped):
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown, "official BridgeTower state dict")
    if any(k.startswith("ln_separate.") for k in vision):
        log.warning("official checkpoint holds ln_separate.*; vlp uses the shared ln_post (vit_layernorm_shared=True,"
                    " the published setting) and drops them")
    out.update({"vision.vit." + k: v for k, v in clip_visual_to_timm(vision).items()})
    report_skipped(skipped, "official BridgeTower checkpoint")
    return out


def build_config_from_official(ckpt: dict, path="checkpoint"):
    """The ``BridgeTowerConfig`` of an official checkpoint: sizes from the tensor shapes, heads and dropout from
    ``hyper_parameters['config']`` when present (else width / 64 and 0.1), official LayerNorm eps."""
    from vlp.models.bridgetower import BridgeTowerConfig

    sd = _official_state_dict(ckpt, path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    hp = ckpt.get("hyper_parameters") or ckpt.get("hparams") or {}
    hp = hp.get("config", hp) if isinstance(hp, dict) else {}
    if hp.get("vit_layernorm_shared") is False:
        raise NotImplementedError(f"{path}: vit_layernorm_shared=False (per-layer ln_separate) is not supported")
    vision_sd = clip_visual_to_timm({k: v for k, v in sd.items() if k.startswith("vit_model.visual.")},
                                    "vit_model.visual.")
    vision = _clip_vision_config(vision_sd)
    words = sd["text_transformer.embeddings.word_embeddings.weight"]
    vocab, text_hidden = words.shape
    dropout = float(hp.get("drop_rate", 0.1))
    text = TextConfig(
        arch="roberta", vocab_size=vocab, hidden=text_hidden,
        layers=len(layer_indices(sd, "text_transformer.encoder.layer.")), heads=max(1, text_hidden // 64),
        intermediate=sd["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=sd["text_transformer.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["text_transformer.embeddings.token_type_embeddings.weight"].shape[0], ln_eps=1e-5,
        pad_token_id=1, dropout=dropout, fusion_layers=0, mlm_head=False)
    hidden = sd["cross_modal_text_transform.weight"].shape[0]
    itc = "itc_text_head.fc.weight" in sd
    weights = {"mlm": 1.0, "itm": 1.0, "itc": 1.0 if itc else 0.0}
    extra: dict[str, Any] = {}
    if itc:
        extra["itc_embed_dim"] = sd["itc_text_head.fc.weight"].shape[0]
        if "temperature" in sd:
            extra["temp"] = float(sd["temperature"].reshape(-1)[0])
    if "vqa_classifier.3.weight" in sd:
        extra["num_answers"] = sd["vqa_classifier.3.weight"].shape[0]
        extra["vqa_hidden_scale"] = sd["vqa_classifier.0.weight"].shape[0] // sd["vqa_classifier.0.weight"].shape[1]
    return BridgeTowerConfig(
        vision=vision, text=text, num_cross_layers=len(layer_indices(sd, "cross_modal_text_layers.")), hidden=hidden,
        cross_heads=int(hp.get("num_heads", max(1, hidden // 64))),
        cross_intermediate=sd["cross_modal_text_layers.0.intermediate.dense.weight"].shape[0],
        cross_dropout=dropout, cross_ln_eps=1e-12, bridge="add", bridge_ln_eps=1e-5, mlm_ln_eps=1e-12,
        loss_weights=weights, **extra)


def convert_official(src: str | Path) -> dict[str, torch.Tensor]:
    """The vlp state dict of an official BridgeTower Lightning checkpoint (read with ``weights_only=True``)."""
    return convert_official_state_dict(_official_state_dict(load_file(src, what=OFFICIAL), src))


def load_official(src: str | Path):
    """``(BridgeTowerConfig, vlp state dict)`` of an official BridgeTower Lightning checkpoint."""
    ckpt = load_file(src, what=OFFICIAL)
    return build_config_from_official(ckpt, src), convert_official_state_dict(_official_state_dict(ckpt, src))


# ----------------------------------------------------------------------------------------------- into a module ---
def build_module(cfg, state_dict: dict[str, torch.Tensor]):
    """A ``BridgeTower`` holding ``state_dict``; every converted tensor must fit, and every module parameter
    must be covered except heads the source does not have (kept fresh, listed in a warning)."""
    from vlp.models.bridgetower import BridgeTower

    module = BridgeTower(cfg)
    heads = ("mlm_head.", "itm_head.", "itc_", "vqa_head.")
    missing = check_fit(module, state_dict, "BridgeTower", optional=lambda k: k.startswith(heads))
    if missing:
        log.warning("heads not in the source, left freshly initialised: %s",
                    ", ".join(sorted({k.split(".")[0] for k in missing})))
    return module.eval()
