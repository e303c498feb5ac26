"""TCL module behaviour: it learns (overfits a fixed batch), the ALBEF ablation, EMA/queue stepping, optimizer groups
and the learning-rate schedule."""

import math

import pytest
import torch

from vlp.blocks.text import TextConfig
from vlp.blocks.vision import VisionConfig
from vlp.config import OptimConfig
from vlp.models.base import lr_lambda, param_groups
from vlp.models.tcl import TCL, TCLConfig

VOCAB = 40


def tiny_cfg(**kw) -> TCLConfig:
    kw = {"embed_dim": 16, "queue_size": 32, "alpha": 0.4, **kw}
    return TCLConfig(
        vision=VisionConfig(name="custom", img_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_ratio=2.0,
                            qkv_bias=True, ln_eps=1e-6),
        text=TextConfig(arch="bert", vocab_size=VOCAB, hidden=32, layers=2, heads=2, intermediate=64,
                        max_position=16, type_vocab_size=2, ln_eps=1e-12, pad_token_id=0, dropout=0.0,
                        fusion_layers=1, encoder_width=32), **kw)


def batch(b=8, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, t), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(b, t, dtype=torch.long)
    mask[b // 2:, t - 3:] = 0
    ids[mask == 0] = 0
    # MLM inputs as the collator makes them: tokens 2 and 5 of each caption masked ([MASK] = 3)
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5]] = ids[:, [2, 5]]
    mlm_ids = torch.where(labels != -100, torch.full_like(ids, 3), ids)
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "image_aug": torch.randn(b, 3, 32, 32, generator=g),
            "input_ids": ids, "attention_mask": mask, "image_ids": torch.arange(b), "mlm_input_ids": mlm_ids,
            "mlm_labels": labels}


def test_tcl_step_on_a_fixed_batch_drives_the_loss_down():
    torch.manual_seed(0)
    # A queue of one batch: a fixed batch repeated would otherwise fill the queue with copies of its positives.
    model = TCL(tiny_cfg(momentum=0.9, queue_size=8))
    opt = torch.optim.AdamW(param_groups(model, OptimConfig(lr=3e-3, weight_decay=0.0)), lr=3e-3)
    data = batch()
    colours = torch.randn(8, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    data["image"] = colours.expand(8, 3, 32, 32) + 0.1 * data["image"]  # tell-apart images
    data["image_aug"] = data["image"].clone()
    losses = []
    for step in range(60):
        out = model.compute_losses(data)
        total = out["ita"] + out["itm"] + out["mlm"]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_albef_ablation_averages_only_the_cross_modal_terms():
    torch.manual_seed(0)
    model = TCL(tiny_cfg(imc=False, lmi=False)).eval()
    with torch.no_grad():
        out = model(batch())
    assert "loss_i2i" not in out and "loss_lmi_image" not in out
    torch.testing.assert_close(out["ita"], (out["loss_i2t"] + out["loss_t2i"]) / 2)


def test_tcl_ita_is_the_mean_of_six_terms():
    torch.manual_seed(0)
    model = TCL(tiny_cfg()).eval()
    with torch.no_grad():
        out = model(batch())
    six = [out[k] for k in ("loss_i2t", "loss_t2i", "loss_i2i", "loss_t2t", "loss_lmi_image", "loss_lmi_text")]
    torch.testing.assert_close(out["ita"], sum(six) / 6)


def test_momentum_and_queue_advance_once_per_forward():
    torch.manual_seed(0)
    model = TCL(tiny_cfg(momentum=0.5))
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(1.0)  # online moves away from its twin
    before = model.momentum.vision.vit.cls_token.clone()
    online = model.vision.vit.cls_token.clone()
    data = batch()
    with torch.no_grad():
        out = model(data)
    torch.testing.assert_close(model.momentum.vision.vit.cls_token, 0.5 * before + 0.5 * online)
    assert model.queue.ptr == 8
    # The queue now holds the momentum features of this batch, in order.
    with torch.no_grad():
        feat_m = model.momentum.vision_proj(model.momentum.vision(data["image_aug"]).last_hidden_state[:, 0])
    torch.testing.assert_close(model.queue.image_queue[:, :8].t(), feat_m)
    assert not any(p.requires_grad for p in model.momentum.parameters())
    assert out["itm_logits"].shape == (24, 2)


def test_loss_weight_zero_switches_a_loss_off():
    model = TCL(tiny_cfg(loss_weights={"ita": 1.0, "itm": 0.0, "mlm": 0.0})).eval()
    with torch.no_grad():
        losses = model.compute_losses(batch())
    assert set(losses) == {"ita"}


def test_param_groups_exclude_frozen_twins_and_decay_by_rule():
    model = TCL(tiny_cfg())
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.05, lr_mult={"itm_head": 5.0}))
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in model.momentum.parameters())
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert decay_of[id(model.temp.value)] == 0.0  # 1-d
    assert decay_of[id(model.vision.vit.pos_embed)] == 0.05  # 3-d: decayed, as ALBEF does
    assert decay_of[id(model.itm_head.bias)] == 0.0
    assert lr_of[id(model.itm_head.weight)] == pytest.approx(5e-3)
    assert lr_of[id(model.vision_proj.weight)] == pytest.approx(1e-3)


def test_lr_schedule_warmup_then_cosine_to_floor():
    o = OptimConfig(lr=1e-4, warmup_steps=10, warmup_start_lr=1e-5, min_lr=1e-5, schedule="cosine")
    f = lr_lambda(o, total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    lin = lr_lambda(OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="linear"), total_steps=100)
    assert lin(10) == pytest.approx(1.0) and lin(55) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        lr_lambda(OptimConfig(schedule="cosin"), 10)(5)


def test_gradient_checkpointing_gives_the_same_gradients():
    from vlp.train import enable_grad_checkpointing

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = TCL(tiny_cfg(loss_weights={"ita": 1.0, "itm": 0.0, "mlm": 1.0}))
        if ckpt:
            assert enable_grad_checkpointing(model) >= 2
        data = batch()
        data["mlm_input_ids"], data["mlm_labels"] = data["input_ids"].clone(), data["input_ids"].clone()
        losses = model.compute_losses(data)
        sum(losses.values()).backward()
        grads.append(model.vision.vit.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
