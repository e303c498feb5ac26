"""Shared blocks: vision tower (timm ViT), text tower (HF BERT/RoBERTa + fusion layers), heads, momentum and queues.

Reference points: a plain-torch ALBEF ViT written here, transformers' own BertForMaskedLM / RobertaForMaskedLM
(saved and loaded by path), hand-computed EMA/queue values, and the official TCL tiny fixture
(tests/fixtures/official/tcl_tiny.pt, see its README): its state dict loads into our blocks by prefix renames and
reproduces the official image/text/fusion states, projections, ITM logits, momentum update and queue.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks import (
    MASK_VALUE,
    FeatureQueue,
    ITMHead,
    MomentumPair,
    Pooler,
    Projection,
    TextConfig,
    TextTower,
    VisionConfig,
    VisionTower,
    mlp_head,
)

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "tcl_tiny.pt"
REPO = Path(__file__).resolve().parents[1]


def _perturb(module: nn.Module, scale: float = 0.05) -> nn.Module:
    """Move every parameter off its init (LayerNorm 1/0, zero biases), so a mis-mapped tensor shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def _text_batch(vocab: int, pad: int, lengths=(9, 7, 4), length: int = 9):
    ids = torch.randint(3, vocab, (len(lengths), length))
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Vision tower


def albef_vit_reference(sd: dict, x: torch.Tensor, patch: int, heads: int, eps: float = 1e-6):
    """ALBEF/TCL's ViT forward (models/vit.py) in plain torch: returns (final normed tokens, per-block outputs)."""
    B = x.shape[0]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]
    N, D = x.shape[1], x.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    blocks = []
    for i in range(depth):
        def p(name):
            return sd[f"blocks.{i}.{name}"]

        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, N, 3, heads, D // heads).permute(
            2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
        blocks.append(x)
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps), blocks


def test_vit_matches_albef_reference_forward():
    tower = _perturb(VisionTower(VisionConfig.tiny(depth=3))).eval()
    sd = {k[len("vit."):]: v for k, v in tower.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(x)
        ref_last, ref_blocks = albef_vit_reference(sd, x, patch=16, heads=4)
    torch.testing.assert_close(out.last_hidden_state, ref_last, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == len(ref_blocks) == 3
    for ours, ref in zip(out.hidden_states, ref_blocks):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vit_returns_every_block_and_final_norm():
    tower = VisionTower(VisionConfig.tiny(), depth=3).eval()  # fields override the config
    out = tower(torch.randn(2, 3, 64, 64))
    assert tower.depth == 3 and tower.num_tokens == 17 and tower.width == 64
    assert len(out.hidden_states) == 3
    assert all(h.shape == (2, 17, 64) for h in out.hidden_states)
    assert out.last_hidden_state.shape == (2, 17, 64)
    torch.testing.assert_close(tower.final_norm(out.hidden_states[-1]), out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[0], out.hidden_states[1])


def test_vit_param_names_are_albef_names_for_custom_and_timm_arch():
    custom = VisionTower(VisionConfig.tiny())
    named = VisionTower(name="deit_base_patch16_224", img_size=64, width=64, depth=2, heads=4)
    shapes = {k: tuple(v.shape) for k, v in custom.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in named.state_dict().items()}
    albef = {"vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias",
             "vit.norm.weight", "vit.norm.bias"}
    for i in range(2):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            albef |= {f"vit.blocks.{i}.{part}.weight", f"vit.blocks.{i}.{part}.bias"}
    assert set(shapes) == albef


def test_pos_embed_constant_survives_interpolation_4x4_to_8x8():
    small = VisionTower(VisionConfig.tiny())  # 64 px / 16 = 4x4 grid
    with torch.no_grad():
        small.vit.pos_embed[:, 1:] = 0.37
        small.vit.pos_embed[:, 0] = torch.randn(64)
    big = VisionTower(VisionConfig.tiny(img_size=128))  # 8x8 grid
    assert big.vit.pos_embed.shape == (1, 65, 64)
    big.load_state_dict(small.state_dict())  # resampled on load, whichever parent loads it
    assert big.vit.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(big.vit.pos_embed[:, 0], small.vit.pos_embed[:, 0])  # CLS row kept
    torch.testing.assert_close(big.vit.pos_embed[:, 1:], torch.full((1, 64, 64), 0.37), atol=1e-6, rtol=0)
    assert big.eval()(torch.randn(1, 3, 128, 128)).last_hidden_state.shape == (1, 65, 64)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_vision_checkpoint_file_other_resolution_is_bicubic_resampled(tmp_path, fmt):
    small = _perturb(VisionTower(VisionConfig.tiny()))
    sd = small.vit.state_dict()
    if fmt == "pth":  # a timm/DeiT-style file: wrapped, with a classifier head
        path = tmp_path / "vit.pth"
        torch.save({"model": {**sd, "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}}, path)
    else:  # a whole ALBEF-style model: only visual_encoder.* is taken
        from safetensors.torch import save_file

        path = tmp_path / "albef.safetensors"
        save_file({**{f"visual_encoder.{k}": v.contiguous() for k, v in sd.items()},
                   "text_encoder.bert.embeddings.word_embeddings.weight": torch.randn(5, 4)}, str(path))
    big = VisionTower(VisionConfig.tiny(img_size=128, checkpoint=str(path)))
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    expected = torch.cat([sd["pos_embed"][:, :1], expected.permute(0, 2, 3, 1).reshape(1, 64, 64)], dim=1)
    torch.testing.assert_close(big.vit.pos_embed, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(big.vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_vision_checkpoint_missing_keys_fail_clearly(tmp_path):
    sd = VisionTower(VisionConfig.tiny()).vit.state_dict()
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks 1 tower parameters.*norm.weight"):
        VisionTower(VisionConfig.tiny(checkpoint=str(tmp_path / "partial.pth")))


def test_vision_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(1)
    a = VisionTower(VisionConfig.tiny())
    b = VisionTower(VisionConfig.tiny(grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    la, lb = (m.train()(x).last_hidden_state.pow(2).sum() for m in (a, b))
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.vit.blocks[0].attn.qkv.weight.grad, b.vit.blocks[0].attn.qkv.weight.grad)


def test_configs_validate_through_the_experiment_schema():
    from vlp.config import ConfigError, build

    v = build(VisionConfig, {"name": "custom", "img_size": 96, "width": 128, "ln_eps": "1e-6"})
    assert v.width == 128 and v.ln_eps == 1e-6 and v.depth is None
    t = build(TextConfig, {"hidden": 64, "fusion_layers": 2, "arch": "roberta"})
    assert t.arch == "roberta" and t.fusion_layers == 2
    with pytest.raises(ConfigError, match="fusion_layer"):
        build(TextConfig, {"fusion_layer": 2})
    with pytest.raises(ConfigError, match="arch"):
        build(TextConfig, {"arch": "gpt2"})


# ---------------------------------------------------------------------------------------------------------------------
# Text tower


def _save_tiny_hf(tmp_path, arch: str):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(**common, pad_token_id=0))
    else:
        model = RobertaForMaskedLM(RobertaConfig(**common, pad_token_id=1, type_vocab_size=1))
    _perturb(model)
    model.eval()
    path = tmp_path / arch
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("arch,pad", [("bert", 0), ("roberta", 1)])
def test_text_tower_loads_hf_by_path_with_parity(tmp_path, arch, pad):
    hf, path = _save_tiny_hf(tmp_path, arch)
    ids, mask = _text_batch(100, pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    plain = TextTower(name=path, pretrained=True).eval()  # fusion_layers=0: text mode = all layers
    assert plain.arch == arch
    with torch.no_grad():
        hidden = plain.forward_text(ids, mask)
        logits = plain.mlm_logits(hidden)
    torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)

    # The top layer becomes a fusion layer: text mode stops before it, its own weights come from the checkpoint,
    # and its cross-attention (image tokens 48 wide) is freshly N(0, 0.02)-initialised.
    fused = TextTower(name=path, pretrained=True, fusion_layers=1, encoder_width=48).eval()
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_text(ids, mask), ref.hidden_states[2], atol=1e-5, rtol=1e-5)
    hf_top = getattr(hf, arch).encoder.layer[2]
    torch.testing.assert_close(fused.encoder.layer[2].attention.self.query.weight, hf_top.attention.self.query.weight)
    torch.testing.assert_close(fused.encoder.layer[2].output.dense.weight, hf_top.output.dense.weight)
    xattn = fused.encoder.layer[2].crossattention
    assert xattn.self.key.weight.shape == (32, 48) and xattn.self.query.weight.shape == (32, 32)
    for lin in (xattn.self.query, xattn.self.key, xattn.self.value, xattn.output.dense):
        assert abs(lin.weight.std().item() - 0.02) < 0.003 and abs(lin.weight.mean().item()) < 0.003
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.all(xattn.output.LayerNorm.weight == 1) and torch.count_nonzero(xattn.output.LayerNorm.bias) == 0
    assert not hasattr(fused.encoder.layer[1], "crossattention")


def _tiny_text(**kw) -> TextTower:
    return _perturb(TextTower(TextConfig.tiny(**kw))).eval()


def test_text_mode_ignores_image_tokens_and_multimodal_composes():
    tower = _tiny_text()
    ids, mask = _text_batch(100, 0)
    img_a, img_b = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    with torch.no_grad():
        text = tower.forward_text(ids, mask)
        torch.testing.assert_close(tower(ids, mask, image_tokens=img_a, mode="text"), text)
        torch.testing.assert_close(tower(ids, mask, image_tokens=img_b, mode="text"), text)
        multi = tower(ids, mask, image_tokens=img_a)  # default mode with image tokens: multimodal
        torch.testing.assert_close(multi, tower.forward_fusion(text, mask, img_a))
        torch.testing.assert_close(tower(ids, mask, image_tokens=img_a, mode="multi_modal"), multi)
    assert not torch.allclose(multi, text, atol=1e-3)
    with pytest.raises(ValueError, match="fusion layers: pass image_tokens"):
        tower.run_layers(text, mask, 0, 4)


def test_fusion_depends_on_image_tokens_and_is_bidirectional():
    tower = _tiny_text()
    ids, mask = _text_batch(100, 0, lengths=(9, 9, 9))
    img = torch.randn(3, 5, 64)
    with torch.no_grad():
        text = tower.forward_text(ids, mask)
        out = tower.forward_fusion(text, mask, img)
        other_img = tower.forward_fusion(text, mask, img + torch.randn_like(img))
        later = text.clone()
        later[:, -1] += 1.0  # change only the last token: token 0 must see it (no causal mask in fusion layers)
        out_later = tower.forward_fusion(later, mask, img)
    assert (out - other_img).abs().max() > 1e-3
    assert (out[:, 0] - out_later[:, 0]).abs().max() > 1e-4


def test_cross_attention_respects_image_mask():
    tower = _tiny_text()
    ids, mask = _text_batch(100, 0)
    img = torch.randn(3, 6, 64)
    image_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    masked_changed = img.clone()
    masked_changed[0, 3:] = torch.randn(3, 64) * 10
    masked_changed[1, 5:] = torch.randn(1, 64) * 10
    visible_changed = img.clone()
    visible_changed[2, 5] += 1.0
    with torch.no_grad():
        text = tower.forward_text(ids, mask)
        out = tower.forward_fusion(text, mask, img, image_mask)
        out_masked = tower.forward_fusion(text, mask, masked_changed, image_mask)
        out_visible = tower.forward_fusion(text, mask, visible_changed, image_mask)
        out_nomask = tower.forward_fusion(text, mask, img)
    torch.testing.assert_close(out_masked, out, atol=1e-6, rtol=0)
    assert (out_visible[2] - out[2]).abs().max() > 1e-4
    torch.testing.assert_close(out_visible[:2], out[:2])
    assert (out_nomask[0] - out[0]).abs().max() > 1e-4  # the mask did something
    torch.testing.assert_close(out_nomask[2], out[2])  # an all-ones mask equals no mask


def test_mlm_head_tied_to_word_embeddings_and_untied_option():
    tower = TextTower(TextConfig.tiny())
    emb = tower.embeddings.word_embeddings.weight
    assert tower.mlm_head.decoder.weight is emb
    assert tower.mlm_head.decoder.weight.data_ptr() == emb.data_ptr()
    h = torch.randn(2, 3, 64)
    expected = F.linear(tower.mlm_head.transform(h), emb) + tower.mlm_head.bias
    torch.testing.assert_close(tower.mlm_logits(h), expected)
    torch.optim.SGD(tower.parameters(), lr=1.0).zero_grad()
    tower.mlm_logits(h).sum().backward()
    with torch.no_grad():
        for p in tower.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    assert tower.mlm_head.decoder.weight is tower.embeddings.word_embeddings.weight

    untied = TextTower(TextConfig.tiny(tie_mlm=False))
    assert untied.mlm_head.decoder.weight.data_ptr() != untied.embeddings.word_embeddings.weight.data_ptr()
    assert TextTower(TextConfig.tiny(mlm_head=False)).mlm_head is None


def test_text_grad_checkpointing_same_outputs_and_grads():
    a = TextTower(TextConfig.tiny(dropout=0.0))
    b = TextTower(TextConfig.tiny(dropout=0.0, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    ids, mask = _text_batch(100, 0)
    img = torch.randn(3, 5, 64)
    la, lb = (m.train()(ids, mask, image_tokens=img).pow(2).sum() for m in (a, b))
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    w = lambda m: m.encoder.layer[3].crossattention.self.key.weight.grad  # noqa: E731
    torch.testing.assert_close(w(a), w(b))


def test_additive_mask_value():
    from vlp.blocks import additive_mask

    m = additive_mask(torch.tensor([[1, 0, 1]]), torch.float32)
    assert m.shape == (1, 1, 1, 3) and m.flatten().tolist() == [0.0, MASK_VALUE, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# Heads


def test_heads_shapes_and_math():
    proj = Projection(8, 4)
    x = torch.randn(5, 8)
    torch.testing.assert_close(proj(x), F.normalize(x @ proj.weight.T + proj.bias, dim=-1))
    assert set(proj.state_dict()) == {"weight", "bias"}
    itm = ITMHead(8)
    assert itm(x).shape == (5, 2) and set(itm.state_dict()) == {"weight", "bias"}
    pooler = Pooler(8)
    seq = torch.randn(5, 3, 8)
    torch.testing.assert_close(pooler(seq), torch.tanh(pooler.dense(seq[:, 0])))
    bt = mlp_head(8, 16, 7)
    assert [type(m) for m in bt] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear] and bt(x).shape == (5, 7)
    uniter = mlp_head(8, 16, 7, ln_eps=1e-12, act_before_norm=True)
    assert [type(m) for m in uniter] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Linear]
    assert set(uniter.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"}


# ---------------------------------------------------------------------------------------------------------------------
# Momentum and queues


def test_ema_update_matches_hand_values_and_twins_are_frozen():
    online = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    parent = nn.Module()
    parent.net = online
    parent.momentum = MomentumPair({"net": online}, momentum=0.5)
    twin = parent.momentum["net"]
    assert twin is parent.momentum.net and parent.momentum.online("net") is online
    assert all(not p.requires_grad for p in twin.parameters())
    assert all(p.requires_grad for p in online.parameters())
    # Keys mirror the online module; the online module is not stored twice.
    assert set(parent.state_dict()) == {f"net.{k}" for k in online.state_dict()} | {
        f"momentum.net.{k}" for k in online.state_dict()}
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn_like(p))
        for p in online.parameters():
            p.copy_(torch.randn_like(p))
    before_twin = [p.clone() for p in twin.parameters()]
    before_online = [p.clone() for p in online.parameters()]
    parent.momentum.update()
    for t, t0, o0, o in zip(twin.parameters(), before_twin, before_online, online.parameters()):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * o0)
        torch.testing.assert_close(o, o0)  # the online weights are untouched
    parent.momentum.update(momentum=0.0)  # override once: copy
    for t, o in zip(twin.parameters(), online.parameters()):
        torch.testing.assert_close(t, o)
    out = twin(torch.randn(2, 3)).sum()
    assert not out.requires_grad
    online(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is None for p in twin.parameters())


def test_ema_twin_of_text_tower_keeps_its_own_tie():
    text = TextTower(TextConfig.tiny())
    pair = MomentumPair({"text": text}, momentum=0.9)
    twin = pair["text"]
    assert twin.mlm_head.decoder.weight is twin.embeddings.word_embeddings.weight
    assert twin.embeddings.word_embeddings.weight is not text.embeddings.word_embeddings.weight
    with torch.no_grad():
        text.embeddings.word_embeddings.weight.add_(1.0)
    old = twin.embeddings.word_embeddings.weight.clone()
    pair.update()
    torch.testing.assert_close(twin.mlm_head.decoder.weight,
                               0.9 * old + 0.1 * text.embeddings.word_embeddings.weight)
    pair.sync()
    torch.testing.assert_close(twin.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)


def test_queue_init_and_ring_buffer_semantics():
    q = FeatureQueue(dim=4, size=8, names=("image", "text"), with_ids=True)
    assert q.image_queue.shape == (4, 8) and q.queue_ptr.dtype == torch.long and q.ptr == 0
    torch.testing.assert_close(q.image_queue.norm(dim=0), torch.ones(8))
    assert set(q.state_dict()) == {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
    batches = [(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([10 * k, 10 * k + 1])) for k in range(5)]
    for k, (img, txt, ids) in enumerate(batches[:4]):
        assert q.enqueue(img, txt, ids=ids) is None
        assert q.ptr == (2 * (k + 1)) % 8
    torch.testing.assert_close(q.features("image"), torch.cat([b[0] for b in batches[:4]]))
    torch.testing.assert_close(q.features("text"), torch.cat([b[1] for b in batches[:4]]))
    assert q.features("image").shape == (8, 4)
    img5, txt5, ids5 = batches[4]
    q.enqueue(img5, txt5, ids=ids5)  # wrapped: overwrites the oldest slots
    assert q.ptr == 2
    torch.testing.assert_close(q.features("image"), torch.cat([img5] + [b[0] for b in batches[1:4]]))
    assert q.ids().tolist() == [40, 41, 10, 11, 20, 21, 30, 31]
    assert q.features("image", snapshot=False).data_ptr() == q.image_queue.data_ptr()


def test_queue_size_must_divide_global_batch():
    q = FeatureQueue(dim=4, size=8)
    with pytest.raises(ValueError, match=r"queue size 8 is not a multiple of the global batch 3 \(local batch 3"):
        q.enqueue(torch.randn(3, 4), torch.randn(3, 4))
    assert q.ptr == 0
    with pytest.raises(ValueError, match="one tensor per queue"):
        q.enqueue(torch.randn(2, 4))


def test_queue_snapshot_keeps_backward_valid_after_enqueue():
    q = FeatureQueue(dim=4, size=8, names=("image",))
    feat = torch.randn(2, 4, requires_grad=True)
    loss = (feat @ q.features("image").T).logsumexp(dim=1).sum()
    q.enqueue(feat.detach())
    loss.backward()  # the loss kept a snapshot, so the in-place enqueue does not invalidate it
    assert feat.grad is not None
    view_loss = (feat @ q.features("image", snapshot=False).T).sum()
    q.enqueue(feat.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        view_loss.backward()


_DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from vlp.blocks.momentum import FeatureQueue
    torch.manual_seed(0)
    q = FeatureQueue(dim=3, size=8, names=("image", "text"), with_ids=True)
    img = torch.full((2, 3), float(rank + 1), requires_grad=True)
    q.enqueue(img * 1.0, -img.detach(), ids=torch.tensor([rank * 10, rank * 10 + 1]))
    try:
        q.enqueue(torch.zeros(3, 3), torch.zeros(3, 3), ids=torch.zeros(3))
        err = ""
    except ValueError as e:
        err = str(e)
    torch.save({"state": q.state_dict(), "err": err}, out)
    dist.destroy_process_group()
""")


def test_queue_gathers_across_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_", "PL_", "SLURM_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", _DIST_WORKER, str(r), str(port), str(tmp_path / f"{r}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    res = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for key in res[0]["state"]:
        torch.testing.assert_close(res[0]["state"][key], res[1]["state"][key])  # identical on every rank
    st = res[0]["state"]
    assert st["queue_ptr"].item() == 4
    torch.testing.assert_close(st["image_queue"][:, :4].T, torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
    torch.testing.assert_close(st["text_queue"][:, :4].T, -torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
    assert st["idx_queue"][0, :4].tolist() == [0, 1, 10, 11]
    assert "global batch 6 (local batch 3 x 2 rank(s))" in res[0]["err"]


# ---------------------------------------------------------------------------------------------------------------------
# The official TCL checkpoint (tiny, random weights) in our blocks

# Official key prefix -> our key prefix, for a model that holds our blocks as below (TinyTCL). Dropped on load:
# `*.embeddings.position_ids` (a constant, non-persistent buffer in transformers 5) and
# `*.cls.predictions.decoder.bias` (the same tensor as `*.cls.predictions.bias`).
OFFICIAL_TCL_PREFIXES = [
    ("visual_encoder_m.", "momentum.vision.vit."),
    ("visual_encoder.", "vision.vit."),
    ("text_encoder_m.bert.", "momentum.text."),
    ("text_encoder_m.cls.predictions.", "momentum.text.mlm_head."),
    ("text_encoder.bert.", "text."),
    ("text_encoder.cls.predictions.", "text.mlm_head."),
    ("vision_proj_m.", "momentum.vision_proj."),
    ("text_proj_m.", "momentum.text_proj."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("image_queue", "queue.image_queue"),
    ("text_queue", "queue.text_queue"),
    ("queue_ptr", "queue.queue_ptr"),
    ("temp", "temp"),
]
DROPPED_SUFFIXES = ("embeddings.position_ids", "mlm_head.decoder.bias")


def rename_official(key: str) -> str:
    for src, dst in OFFICIAL_TCL_PREFIXES:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    raise KeyError(f"no rename for official key {key!r}")


class TinyTCL(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        vit, bert = cfg["vit"], cfg["bert"]
        self.vision = VisionTower(VisionConfig.tiny(img_size=vit["img_size"], patch_size=vit["patch_size"],
                                                    width=vit["embed_dim"], depth=vit["depth"],
                                                    heads=vit["num_heads"], ln_eps=vit["layer_norm_eps"]))
        self.text = TextTower(TextConfig.tiny(
            vocab_size=bert["vocab_size"], hidden=bert["hidden_size"], layers=bert["num_hidden_layers"],
            heads=bert["num_attention_heads"], intermediate=bert["intermediate_size"],
            max_position=bert["max_position_embeddings"], ln_eps=bert["layer_norm_eps"],
            fusion_layers=bert["num_hidden_layers"] - bert["fusion_layer"], encoder_width=bert["encoder_width"]))
        self.vision_proj = Projection(vit["embed_dim"], cfg["embed_dim"])
        self.text_proj = Projection(bert["hidden_size"], cfg["embed_dim"])
        self.itm_head = ITMHead(bert["hidden_size"])
        self.temp = nn.Parameter(torch.tensor(cfg["temp"]))
        self.momentum = MomentumPair({"vision": self.vision, "vision_proj": self.vision_proj, "text": self.text,
                                      "text_proj": self.text_proj}, momentum=cfg["momentum"])
        self.queue = FeatureQueue(cfg["embed_dim"], cfg["queue_size"], names=("image", "text"))


@pytest.fixture(scope="module")
def official():
    if not FIXTURE.exists():
        pytest.fail(f"missing fixture {FIXTURE} (copy it from shared/fixtures/official/)")
    return torch.load(FIXTURE, weights_only=True)


def test_every_official_tcl_key_finds_a_home(official):
    model = TinyTCL(official["config"])
    ours = model.state_dict()
    buffers = dict(model.named_buffers())
    homes = {}
    for key, value in official["state_dict"].items():
        new = rename_official(key)
        if new.endswith("embeddings.position_ids"):  # non-persistent constant buffer
            assert buffers[new].shape == value.shape and torch.equal(buffers[new], value), key
            continue
        if new.endswith("mlm_head.decoder.bias"):  # duplicate of mlm_head.bias
            assert torch.equal(value, official["state_dict"][key.replace("decoder.bias", "bias")]), key
            continue
        assert new in ours, f"{key} -> {new}: no such key"
        assert ours[new].shape == value.shape, f"{key} -> {new}: {tuple(value.shape)} vs {tuple(ours[new].shape)}"
        homes[new] = key
    assert set(homes) == set(ours), f"our keys without an official source: {sorted(set(ours) - set(homes))}"


def _load_official(official) -> TinyTCL:
    model = TinyTCL(official["config"])
    sd = {rename_official(k): v for k, v in official["state_dict"].items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(DROPPED_SUFFIXES)}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_official_tcl_forward_states_reproduced(official):
    model = _load_official(official)
    inp, rec = official["inputs"], official["records"]
    ids, mask = inp["input_ids"], inp["attention_mask"]
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        image = model.vision(inp["image"]).last_hidden_state
        text = model.text.forward_text(ids, mask)
        torch.testing.assert_close(image, rec["image_embeds"], **tol)
        torch.testing.assert_close(text, rec["text_embeds"], **tol)
        torch.testing.assert_close(model.vision_proj(image[:, 0]), rec["image_feat"], **tol)
        torch.testing.assert_close(model.text_proj(text[:, 0]), rec["text_feat"], **tol)
        fused = model.text.forward_fusion(text, mask, image, torch.ones(image.shape[:2], dtype=torch.long))
        torch.testing.assert_close(fused, rec["fused_pos"], **tol)
        torch.testing.assert_close(model.itm_head(fused[:, 0]), rec["itm_logits_pos"], **tol)


def test_official_tcl_momentum_update_and_enqueue_reproduced(official):
    model = _load_official(official)
    inp, rec = official["inputs"], official["records"]
    model.momentum.update()
    ours = model.state_dict()
    for key, value in rec["momentum_after"].items():
        torch.testing.assert_close(ours[rename_official(key)], value, atol=1e-6, rtol=1e-6)
    m = model.momentum
    with torch.no_grad():
        image_feat_m = m.vision_proj(m.vision(inp["image_aug"]).last_hidden_state[:, 0])
        text_feat_m = m.text_proj(m.text.forward_text(inp["input_ids"], inp["attention_mask"])[:, 0])
    model.queue.enqueue(image_feat_m, text_feat_m)
    torch.testing.assert_close(model.queue.image_queue, rec["image_queue_after"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.queue.text_queue, rec["text_queue_after"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.queue.queue_ptr, rec["queue_ptr_after"])
