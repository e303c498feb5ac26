"""Two-stream fusion: co-attention cross-modal layers and the bridge layers that feed uni-modal states into them
(BridgeTower; METER with ``bridge="none"``).

* :class:`CrossModalLayer`: one layer of one stream. Self-attention, cross-attention to the other stream, FFN; each
  sub-layer is BERT's post-LN residual block (``LN(x + dropout(dense(f(x))))``). Built from transformers'
  ``BertAttention`` / ``BertIntermediate`` / ``BertOutput``, so its parameters are

      attention.self.{query,key,value}.*   attention.output.{dense,LayerNorm}.*
      crossattention.self.{query,key,value}.*   crossattention.output.{dense,LayerNorm}.*
      intermediate.dense.*   output.{dense,LayerNorm}.*

  exactly the names of BridgeTower's ``BertCrossLayer`` (official) and ``BridgeTowerBertCrossLayer`` (transformers):
  their ``cross_modal_{text,image}_layers.N.*`` map by a prefix rename.
* :class:`BridgeLayer`: how a uni-modal state ``x`` (already projected to the cross-modal width, type embedding
  added) joins the previous cross-modal output ``y`` (BridgeTower's ``LinkTower``):

      add          LN(x + y)                        BridgeTower's choice
      scaled_add   LN(s * x + y)                    s learnable, init 1
      interpolate  LN((1 - b) * x + b * y)          b learnable, init 0.5
      none         y                                no bridge (METER)

* :class:`CoAttentionStack`: two parallel stacks of K layers (text stream and image stream). At layer l each stream
  cross-attends to the other stream's INPUT of layer l (both layers read the same pair, not one the other's output).
  Layer 1's inputs are ``LN(x_1)`` (``text_input_norm`` / ``image_input_norm``, BridgeTower's first-layer
  ``cross_modal_*_layernorm``); with bridges, layer l > 1 reads ``bridge_{l-1}(x_l, previous output)``, x_l being
  the l-th uni-modal state handed in. With ``bridge="none"`` only one uni-modal state is handed in (METER: the top
  uni-modal layer) and layer l reads the previous layer's output.

Masks handed to :class:`CoAttentionStack` are keep-masks [B, N] (1 = attend), converted once to additive masks
(``vlp.blocks.text.additive_mask``). Attention runs through transformers' attention interface, by default PyTorch's
``scaled_dot_product_attention`` (``attn_implementation="sdpa"``; ``"eager"`` is the plain softmax(QK^T)V).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .text import additive_mask

__all__ = ["BRIDGE_KINDS", "CrossModalLayer", "BridgeLayer", "CoAttentionStack", "cross_layer_config"]

BRIDGE_KINDS = ("add", "scaled_add", "interpolate", "none")


def cross_layer_config(hidden: int, heads: int, intermediate: int, dropout: float = 0.1, ln_eps: float = 1e-12,
                       act: str = "gelu", attn_implementation: str = "sdpa"):
    """The transformers ``BertConfig`` the parts of a :class:`CrossModalLayer` are built from."""
    from transformers import BertConfig

    if hidden % heads:
        raise ValueError(f"cross-modal hidden size {hidden} is not a multiple of {heads} heads")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, layer_norm_eps=ln_eps,
                     hidden_act=act, vocab_size=1, num_hidden_layers=1)
    cfg._attn_implementation = attn_implementation
    return cfg


class CrossModalLayer(nn.Module):
    """Self-attention, cross-attention to another stream, FFN; post-LN (BERT) residual blocks.

    ``forward(hidden [B, T, H], other [B, S, Ho], mask=None, other_mask=None) -> [B, T, H]``; masks are ADDITIVE
    ([B, 1, 1, T] / [B, 1, 1, S], 0 = attend) or None (attend everywhere). ``other_width`` (default H) is the
    width of the other stream's tokens (the cross-attention key/value input).
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float = 0.1, ln_eps: float = 1e-12,
                 act: str = "gelu", other_width: int | None = None, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

        cfg = cross_layer_config(hidden, heads, intermediate, dropout, ln_eps, act, attn_implementation)
        self.attention = BertAttention(cfg, is_causal=False)
        self.crossattention = BertAttention(cfg, is_causal=False, is_cross_attention=True)
        if other_width is not None and other_width != hidden:
            xattn = self.crossattention.self
            xattn.key = nn.Linear(other_width, xattn.all_head_size)
            xattn.value = nn.Linear(other_width, xattn.all_head_size)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, hidden: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None,
                other_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(hidden, mask)[0]
        x = self.crossattention(x, None, other, other_mask)[0]
        return self.output(self.intermediate(x), x)


class BridgeLayer(nn.Module):
    """``forward(x, y)``: uni-modal state ``x`` joins cross-modal state ``y`` (see the module docstring).

    Parameters: ``LayerNorm.*`` (BridgeTower's ``link_tower.N.LayerNorm``), plus ``scale`` [1] (``scaled_add``,
    transformers' 0-d ``scaled_factor``) or ``beta`` [1] (``interpolate``). Scalars are 1-d so FSDP2 can shard them.
    """

    def __init__(self, kind: str = "add", hidden: int = 768, eps: float = 1e-5):
        super().__init__()
        if kind not in BRIDGE_KINDS:
            raise ValueError(f"bridge kind must be one of {BRIDGE_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "scaled_add":
            self.scale = nn.Parameter(torch.ones(1))
        elif kind == "interpolate":
            self.beta = nn.Parameter(torch.full((1,), 0.5))
        if kind != "none":
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kind == "scaled_add":
                self.scale.fill_(1.0)
            elif self.kind == "interpolate":
                self.beta.fill_(0.5)
            if self.kind != "none":
                self.LayerNorm.reset_parameters()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            return self.LayerNorm(x + y)
        if self.kind == "scaled_add":
            return self.LayerNorm(x * self.scale + y)
        if self.kind == "interpolate":
            return self.LayerNorm(x * (1 - self.beta) + y * self.beta)
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class CoAttentionStack(nn.Module):
    """Two parallel stacks of :class:`CrossModalLayer` joined by :class:`BridgeLayer` s (see the module docstring).

    Parameters: ``text_input_norm``, ``image_input_norm`` (first-layer LNs), ``text_layers.N``, ``image_layers.N``,
    and with bridges ``text_bridges.M``, ``image_bridges.M`` (M = 0 .. K-2: bridge M feeds layer M+1).

    ``forward(text_inputs, image_inputs, text_mask=None, image_mask=None, ...)`` with ``text_inputs`` /
    ``image_inputs`` sequences of ``num_inputs`` tensors [B, T, H] / [B, N, H] (or one tensor [B, num_inputs, ., H]):
    the uni-modal states projected to the cross-modal width, in layer order (BridgeTower: uni-modal layers
    L-K+1 .. L; METER / ``bridge="none"``: layer L only). Returns ``(text, image)`` outputs of the last layer, or with
    ``all_layers=True`` the lists of every layer's outputs. ``need_image_output=False`` skips the last image layer
    (an MLM-only pass reads only the text stream) and returns ``None`` for its output.
    """

    def __init__(self, num_layers: int, hidden: int, heads: int, intermediate: int, dropout: float = 0.1,
                 ln_eps: float = 1e-12, act: str = "gelu", bridge: str = "add", bridge_eps: float = 1e-5,
                 attn_implementation: str = "sdpa", grad_checkpointing: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if bridge not in BRIDGE_KINDS:
            raise ValueError(f"bridge must be one of {BRIDGE_KINDS}, got {bridge!r}")
        self.num_layers = num_layers
        self.bridge = bridge
        self.grad_checkpointing = grad_checkpointing
        self.text_input_norm = nn.LayerNorm(hidden, eps=bridge_eps)
        self.image_input_norm = nn.LayerNorm(hidden, eps=bridge_eps)

        def layer():
            return CrossModalLayer(hidden, heads, intermediate, dropout, ln_eps, act,
                                   attn_implementation=attn_implementation)

        self.text_layers = nn.ModuleList(layer() for _ in range(num_layers))
        self.image_layers = nn.ModuleList(layer() for _ in range(num_layers))
        if bridge != "none":
            self.text_bridges = nn.ModuleList(BridgeLayer(bridge, hidden, bridge_eps) for _ in range(num_layers - 1))
            self.image_bridges = nn.ModuleList(BridgeLayer(bridge, hidden, bridge_eps) for _ in range(num_layers - 1))

    @property
    def num_inputs(self) -> int:
        """How many uni-modal states per stream :meth:`forward` takes: K with bridges, 1 without."""
        return 1 if self.bridge == "none" else self.num_layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _layer(self, layer: nn.Module, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, text_inputs: Sequence[torch.Tensor] | torch.Tensor,
                image_inputs: Sequence[torch.Tensor] | torch.Tensor, text_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, all_layers: bool = False, need_image_output: bool = True):
        if isinstance(text_inputs, torch.Tensor):
            text_inputs = text_inputs.unbind(1)
        if isinstance(image_inputs, torch.Tensor):
            image_inputs = image_inputs.unbind(1)
        for what, inputs in (("text_inputs", text_inputs), ("image_inputs", image_inputs)):
            if len(inputs) != self.num_inputs:
                raise ValueError(f"{what}: the stack takes {self.num_inputs} uni-modal state(s) per stream "
                                 f"(bridge={self.bridge!r}, {self.num_layers} layers), got {len(inputs)}")
        x = self.text_input_norm(text_inputs[0])
        y = self.image_input_norm(image_inputs[0])
        tm = None if text_mask is None else additive_mask(text_mask, x.dtype)
        im = None if image_mask is None else additive_mask(image_mask, y.dtype)
        text_out, image_out = [], []
        last = self.num_layers - 1
        for i in range(self.num_layers):
            if i > 0 and self.bridge != "none":
                x = self.text_bridges[i - 1](text_inputs[i], x)
                y = self.image_bridges[i - 1](image_inputs[i], y)
            # Both streams read the pair (x, y) entering layer i.
            new_x = self._layer(self.text_layers[i], x, y, tm, im)
            if i == last and not need_image_output:
                new_y = None
            else:
                new_y = self._layer(self.image_layers[i], y, x, im, tm)
            x, y = new_x, new_y
            text_out.append(x)
            image_out.append(y)
        return (text_out, image_out) if all_layers else (x, y)
