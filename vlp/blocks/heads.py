"""Small heads shared by the models: contrastive projections, matching head, pooler, MLP classifier, BERT init.

Parameter names follow the official checkpoints so that they convert by prefix renames:

* :class:`Projection` and :class:`ITMHead` *are* ``nn.Linear`` (keys ``<name>.weight``, ``<name>.bias``), as ALBEF/TCL's
  ``vision_proj``, ``text_proj``, ``itm_head`` and BridgeTower's ``itc_*_head``, ``itm_score``.
* :class:`Pooler` holds ``dense`` (keys ``<name>.dense.*``) as HF's ``BertPooler`` and BridgeTower's
  ``cross_modal_*_pooler``.
* :func:`mlp_head` returns an ``nn.Sequential`` whose Linear/LayerNorm sit at indices 0, 1|2, 3, as BridgeTower's
  ``vqa_classifier`` / ``nlvr2_classifier`` (Linear, LayerNorm, GELU, Linear) and UNITER's ``vqa_output``
  (Linear, GELU, LayerNorm, Linear: ``act_before_norm=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Projection", "ITMHead", "Pooler", "mlp_head", "init_bert_weights"]


@torch.no_grad()
def init_bert_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT's initialisation applied to every submodule: Linear/Embedding weights N(0, std), biases 0 (and an
    Embedding's padding row 0), LayerNorm weight 1 and bias 0. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
    return module


def _maybe_init(module: nn.Module, init_std: float | None) -> None:
    # None keeps PyTorch's default Linear init, which is what ALBEF/TCL's heads use (plain nn.Linear in __init__).
    if init_std is not None:
        init_bert_weights(module, init_std)


class Projection(nn.Linear):
    """Linear projection into the contrastive space, then L2 normalisation along the last dim (``normalize=True``).

    ``forward(x [..., in_dim]) -> [..., out_dim]``. ALBEF/TCL apply it to the CLS state: ``proj(hidden[:, 0])``.
    """

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = True, init_std: float | None = None):
        super().__init__(in_dim, out_dim)
        self.normalize = normalize
        _maybe_init(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.normalize(y, dim=-1) if self.normalize else y


class ITMHead(nn.Linear):
    """Image-text matching classifier: ``Linear(in_dim, 2)`` on a pooled joint state. Logit 1 = "matched"."""

    def __init__(self, in_dim: int, num_classes: int = 2, init_std: float | None = None):
        super().__init__(in_dim, num_classes)
        _maybe_init(self, init_std)


class Pooler(nn.Module):
    """``tanh(dense(hidden[:, 0]))``: BERT's pooler on token 0. ``forward([B, T, H]) -> [B, H]``."""

    def __init__(self, hidden: int, init_std: float | None = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        _maybe_init(self, init_std)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


def mlp_head(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    ln_eps: float = 1e-5,
    act_before_norm: bool = False,
    init_std: float | None = 0.02,
) -> nn.Sequential:
    """Two-layer classifier head: ``Linear(in, hidden) -> LayerNorm -> GELU -> Linear(hidden, out)``.

    ``act_before_norm=True`` gives UNITER's order (Linear, GELU, LayerNorm, Linear). Either way the Linear layers are
    indices 0 and 3, so BridgeTower's ``vqa_classifier.{0,1,3}`` and UNITER's ``vqa_output.{0,2,3}`` load by prefix.
    BridgeTower's VQA head: ``mlp_head(2H, 2H * 2, 3129)``; UNITER's: ``mlp_head(H, 2H, 3129, 1e-12, True)``.
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    norm, act = nn.LayerNorm(hidden_dim, eps=ln_eps), nn.GELU()
    layers += [act, norm] if act_before_norm else [norm, act]
    layers.append(nn.Linear(hidden_dim, out_dim))
    head = nn.Sequential(*layers)
    _maybe_init(head, init_std)
    return head
