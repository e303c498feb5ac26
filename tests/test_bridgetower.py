"""BridgeTower: parity with transformers' BridgeTower (converted checkpoints), the official key map, bridge layers
against hand values, the co-attention wiring, training behaviour (overfit, no unused parameters, lr groups),
checkpoints (load/save, weights_only refusal, the convert CLI) and the VQA head."""

import dataclasses
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from vlp.blocks.fusion import BridgeLayer, CoAttentionStack, CrossModalLayer
from vlp.blocks.text import TextConfig
from vlp.blocks.vision import VisionConfig
from vlp.config import OptimConfig
from vlp.data.visual import Visual
from vlp.models.base import Text, param_groups
from vlp.models.bridgetower import BridgeTower, BridgeTowerConfig

TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- fixtures ---
def hf_config(link="add", tie=False, text_eps=1e-5, eps=1e-5):
    from transformers import BridgeTowerConfig as HFConfig

    # transformers' CLIP blocks have width // 64 heads: width 64 = 1 head. Text and vision depths must agree.
    vision = dict(hidden_size=64, num_hidden_layers=3, patch_size=8, image_size=32)
    text = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
                max_position_embeddings=40, layer_norm_eps=text_eps)
    return HFConfig(text_config=text, vision_config=vision, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, link_tower_type=link, tie_word_embeddings=tie, layer_norm_eps=eps)


def random_hf(cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # LayerNorms and bridge scalars away from their (1, 0) init, so a wrong map shows
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(b=3, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(b, t, dtype=torch.long)
    for i, n in enumerate([t, t - 2, 3][:b]):
        mask[i, n:] = 0
        ids[i, n:] = 1  # RoBERTa <pad>
    return torch.randn(b, 3, 32, 32, generator=g), ids, mask


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """{(class name, link): (hf model, save_pretrained dir)}"""
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM, BridgeTowerModel

    out = {}
    for cls, link, tie in [(BridgeTowerForImageAndTextRetrieval, "add", False), (BridgeTowerForMaskedLM, "add", True),
                           (BridgeTowerModel, "add", False), (BridgeTowerModel, "scaled_add", False),
                           (BridgeTowerForImageAndTextRetrieval, "interpolate", False)]:
        model = random_hf(cls, hf_config(link, tie))
        path = tmp_path_factory.mktemp(f"{cls.__name__}-{link}")
        model.save_pretrained(path)
        out[(cls.__name__, link)] = (model, path)
    return out


def converted(path):
    from vlp.convert.bridgetower import build_module, load_hf

    cfg, sd = load_hf(path)
    return build_module(cfg, sd)


# ------------------------------------------------------------------------------------ transformers parity ---
@pytest.mark.parametrize("link", ["add", "interpolate"])
def test_itm_logits_match_transformers_retrieval_model(hf_saved, link):
    hf, path = hf_saved[("BridgeTowerForImageAndTextRetrieval", link)]
    ours = converted(path)
    px, ids, mask = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = ours.pair_logits(Visual(pixels=px), Text(ids, mask))  # the model contract, end to end
    torch.testing.assert_close(got, ref, **TOL)
    assert got.shape == (3, 2)


def test_mlm_logits_match_transformers_masked_lm_with_tied_decoder(hf_saved):
    hf, path = hf_saved[("BridgeTowerForMaskedLM", "add")]
    ours = converted(path)
    px, ids, mask = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = ours.mlm_head(ours(px, ids, mask).text_feats)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("link", ["add", "scaled_add"])
def test_final_states_of_both_streams_match_transformers_model(hf_saved, link):
    hf, path = hf_saved[("BridgeTowerModel", link)]
    ours = converted(path)
    px, ids, mask = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px)
        got = ours(px, ids, mask)
    torch.testing.assert_close(got.text_feats, ref.text_features, **TOL)
    torch.testing.assert_close(got.image_feats, ref.image_features, **TOL)
    torch.testing.assert_close(got.cls_feats, ref.pooler_output, **TOL)
    # The uni-modal states the bridges read: text layers 2, 3 and ln_post(CLIP blocks 2, 3) (3 layers, K = 2).
    text_hidden, image_hidden, _ = ref.hidden_states
    with torch.no_grad():
        t_layers = ours.text_layers(ids, mask)
        v_layers = ours.image_layers(px)
    for k, (t, v) in enumerate(zip(t_layers, v_layers), start=2):
        torch.testing.assert_close(t, text_hidden[k], **TOL)
        ln_post = hf.vision_model.visual.forward_post(image_hidden[k])
        torch.testing.assert_close(v, ln_post, **TOL)


def test_retrieval_states_path_equals_the_direct_path(hf_saved):
    _, path = hf_saved[("BridgeTowerForImageAndTextRetrieval", "add")]
    ours = converted(path)
    px, ids, mask = inputs()
    with torch.no_grad():
        image = ours.encode_image(Visual(pixels=px))  # what vlp.eval caches once per image / text
        text = ours.encode_text(Text(ids, mask))
        cached = ours.match_logits(ours.fuse(image, text))
        direct = ours.itm_head(ours(px, ids, mask).cls_feats)  # transformers' forward
    torch.testing.assert_close(cached, direct, **TOL)
    assert image.states.shape == (3, 2, 17, 64) and text.states.shape == (3, 2, 7, 32)
    # transformers' retrieval model has no ITC heads: no contrastive embedding, and retrieval scores every pair with
    # ITM (the official protocol) instead of ranking by the cosine of [CLS] states no objective aligned.
    assert image.embedding is None and text.embedding is None and not ours.has_contrastive_head
    assert ours.retrieval_protocol == ("all_pairs", "itm")
    with_itc = BridgeTower(tiny_cfg(loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0}))
    assert with_itc.retrieval_protocol == ("contrastive", "max")


def test_config_from_transformers_carries_every_eps():
    from vlp.convert.bridgetower import build_config_from_hf

    cfg = build_config_from_hf(hf_config("interpolate", text_eps=1e-6, eps=1e-7))
    assert (cfg.text.ln_eps, cfg.cross_ln_eps, cfg.bridge_ln_eps, cfg.mlm_ln_eps) == (1e-6, 1e-6, 1e-7, 1e-7)
    assert cfg.vision.ln_eps == 1e-5 and cfg.vision.heads == 1 and cfg.vision.timm_kwargs["pre_norm"]
    assert (cfg.bridge, cfg.num_cross_layers, cfg.hidden, cfg.text.arch) == ("interpolate", 2, 32, "roberta")
    with pytest.raises(NotImplementedError, match="share_layernorm"):
        c = hf_config()
        c.vision_config.share_layernorm = False
        build_config_from_hf(c)


# ---------------------------------------------------------------------------------------- official and CLIP ---
def _to_official(hf_sd: dict) -> dict:
    """transformers BridgeTower keys -> the official BTTransformer names (shared/papers/tcl_bridgetower.md E.1)."""
    out = {}
    for key, v in hf_sd.items():
        k = key.removeprefix("bridgetower.")
        k = k.replace("vision_model.visual.embeddings.patch_embedding.", "vit_model.visual.conv1.")
        if k == "vision_model.visual.embeddings.position_embedding.weight":
            k = "vit_model.visual.positional_embedding"
        k = k.replace("vision_model.visual.embeddings.", "vit_model.visual.").replace("vision_model.", "vit_model.")
        k = k.replace("text_model.", "text_transformer.")
        out[k] = v
    return out


def test_official_lightning_checkpoint_converts_by_the_documented_map(hf_saved, tmp_path):
    from vlp.convert.bridgetower import convert_hf, load_official

    hf, path = hf_saved[("BridgeTowerForImageAndTextRetrieval", "add")]
    sd = _to_official(hf.state_dict())
    sd["mlm_score.decoder.weight"] = torch.randn(VOCAB, 32)  # the official pre-trained model has both heads
    sd["mlm_score.bias"] = torch.randn(VOCAB)
    sd["mlm_score.transform.dense.weight"] = torch.randn(32, 32)
    sd["mlm_score.transform.dense.bias"] = torch.randn(32)
    sd["mlm_score.transform.LayerNorm.weight"] = torch.randn(32)
    sd["mlm_score.transform.LayerNorm.bias"] = torch.randn(32)
    sd["itc_text_head.fc.weight"], sd["itc_text_head.fc.bias"] = torch.randn(16, 32), torch.randn(16)
    sd["itc_image_head.fc.weight"], sd["itc_image_head.fc.bias"] = torch.randn(16, 64), torch.randn(16)
    sd["temperature"] = torch.tensor(0.05)
    sd["vqa_classifier.0.weight"], sd["vqa_classifier.0.bias"] = torch.randn(128, 64), torch.randn(128)
    sd["vqa_classifier.1.weight"], sd["vqa_classifier.1.bias"] = torch.randn(128), torch.randn(128)
    sd["vqa_classifier.3.weight"], sd["vqa_classifier.3.bias"] = torch.randn(7, 128), torch.randn(7)
    sd["vit_model.positional_embedding"] = torch.randn(77, 64)  # CLIP text leftovers: dropped
    sd["vit_model.ln_final.weight"] = torch.randn(64)
    sd["nlvr2_classifier.0.weight"] = torch.randn(4, 4)  # not converted, with a warning
    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100,
                "hyper_parameters": {"config": {"num_heads": 2, "drop_rate": 0.1, "vit_layernorm_shared": True}}},
               ckpt)

    cfg, ours = load_official(ckpt)
    reference = convert_hf(path)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert ours["itc_temp.value"].shape == (1,) and float(ours["itc_temp.value"]) == pytest.approx(0.05)
    assert ours["vqa_head.3.weight"].shape == (7, 128) and "itc_image_head.weight" in ours
    assert not any(k.startswith(("vit_model", "nlvr2")) for k in ours)
    # Official LayerNorm eps: 1e-12 in the cross layers and the MLM transform, 1e-5 elsewhere.
    assert (cfg.cross_ln_eps, cfg.mlm_ln_eps, cfg.bridge_ln_eps, cfg.text.ln_eps) == (1e-12, 1e-12, 1e-5, 1e-5)
    assert (cfg.num_answers, cfg.vqa_hidden_scale, cfg.itc_embed_dim, cfg.loss_weights["itc"]) == (7, 2, 16, 1.0)
    assert (cfg.vision.img_size, cfg.vision.patch_size, cfg.vision.depth, cfg.cross_heads) == (32, 8, 3, 2)
    from vlp.convert.bridgetower import build_module

    module = build_module(cfg, ours)  # every parameter covered, nothing left over
    assert module.itc_temp.value.item() == pytest.approx(0.05)


def test_openai_clip_visual_layout_maps_like_the_transformers_layout(hf_saved):
    from vlp.convert.bridgetower import clip_visual_to_timm

    hf, _ = hf_saved[("BridgeTowerModel", "add")]
    visual = {k.removeprefix("vision_model.visual."): v for k, v in hf.state_dict().items()
              if k.startswith("vision_model.visual.")}
    openai = {"visual." + k.replace("embeddings.patch_embedding.", "conv1.")
              .replace("embeddings.position_embedding.weight", "positional_embedding")
              .replace("embeddings.class_embedding", "class_embedding"): v for k, v in visual.items()}
    openai["visual.proj"] = torch.randn(64, 16)  # CLIP's output projection: BridgeTower drops it
    openai["transformer.resblocks.0.ln_1.weight"] = torch.randn(8)  # the text tower: not under the prefix
    a, b = clip_visual_to_timm(visual), clip_visual_to_timm(openai, "visual.")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tower = BridgeTower(BridgeTowerConfig(vision=VisionConfig.clip(img_size=32, patch_size=8, width=64, depth=3,
                                                                   heads=1))).vision
    tower.vit.load_state_dict(b)  # strict: the preset's timm model has exactly CLIP's parameters


# ------------------------------------------------------------------------------------------ fusion blocks ---
def test_bridge_layers_against_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    eps = 1e-5

    def ln(v, var):
        return v / math.sqrt(var + eps)

    add = BridgeLayer("add", 4, eps)
    # x + y = [2, 2, 4, 4]: mean 3, variance 1
    torch.testing.assert_close(add(x, y), ln(torch.tensor([[-1.0, -1.0, 1.0, 1.0]]), 1.0))
    scaled = BridgeLayer("scaled_add", 4, eps)
    assert scaled.scale.shape == (1,) and scaled.scale.item() == 1.0
    with torch.no_grad():
        scaled.scale.fill_(2.0)
    # 2x + y = [3, 4, 7, 8]: mean 5.5, variance 4.25
    torch.testing.assert_close(scaled(x, y), ln(torch.tensor([[-2.5, -1.5, 1.5, 2.5]]), 4.25))
    interp = BridgeLayer("interpolate", 4, eps)
    assert interp.beta.item() == 0.5
    with torch.no_grad():
        interp.beta.fill_(0.25)
    # 0.75 x + 0.25 y = [1, 1.5, 2.5, 3]: mean 2, variance 0.625
    torch.testing.assert_close(interp(x, y), ln(torch.tensor([[-1.0, -0.5, 0.5, 1.0]]), 0.625))
    none = BridgeLayer("none", 4)
    assert list(none.parameters()) == [] and torch.equal(none(x, y), y)
    with pytest.raises(ValueError, match="bridge kind"):
        BridgeLayer("gated", 4)


def _stack(bridge="add", k=3):
    torch.manual_seed(0)
    return CoAttentionStack(k, 16, 2, 32, dropout=0.0, bridge=bridge).eval()


def test_co_attention_reads_the_other_streams_input_and_bridges_feed_each_layer():
    stack = _stack("add")
    g = torch.Generator().manual_seed(1)
    text_in = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]
    image_in = [torch.randn(2, 4, 16, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    add_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    with torch.no_grad():
        texts, images = stack(text_in, image_in, mask, all_layers=True)
        x, y = stack.text_input_norm(text_in[0]), stack.image_input_norm(image_in[0])
        for i in range(3):
            if i:
                x = stack.text_bridges[i - 1].LayerNorm(text_in[i] + x)
                y = stack.image_bridges[i - 1].LayerNorm(image_in[i] + y)
            x, y = stack.text_layers[i](x, y, add_mask, None), stack.image_layers[i](y, x, None, add_mask)
            torch.testing.assert_close(texts[i], x)
            torch.testing.assert_close(images[i], y)
        # Padding is masked: changing a padded text token changes neither stream's valid outputs.
        text_in2 = [t.clone() for t in text_in]
        text_in2[0][1, 4] += 5.0
        t2, i2 = stack(text_in2, image_in, mask)
    torch.testing.assert_close(t2[:, :3], texts[-1][:, :3])
    torch.testing.assert_close(i2, images[-1])


def test_meter_variant_takes_one_input_and_chains_the_cross_layers():
    stack = _stack("none")
    assert stack.num_inputs == 1 and not hasattr(stack, "text_bridges")
    t, v = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        x, y = stack([t], [v])
        a, b = stack.text_input_norm(t), stack.image_input_norm(v)
        for i in range(3):
            a, b = stack.text_layers[i](a, b), stack.image_layers[i](b, a)
    torch.testing.assert_close(x, a)
    torch.testing.assert_close(y, b)
    with pytest.raises(ValueError, match="takes 1 uni-modal"):
        stack([t, t], [v, v])


def test_cross_modal_layer_param_names_are_bridgetower_names():
    names = {n.rsplit(".", 1)[0] for n, _ in CrossModalLayer(16, 2, 32).named_parameters()}
    assert names == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "crossattention.self.query", "crossattention.self.key",
                     "crossattention.self.value", "crossattention.output.dense", "crossattention.output.LayerNorm",
                     "intermediate.dense", "output.dense", "output.LayerNorm"}


def test_eager_and_sdpa_cross_layers_agree():
    torch.manual_seed(0)
    a = CrossModalLayer(16, 2, 32, dropout=0.0, attn_implementation="sdpa").eval()
    b = CrossModalLayer(16, 2, 32, dropout=0.0, attn_implementation="eager").eval()
    b.load_state_dict(a.state_dict())
    x, o = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    m = (1.0 - torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])[:, None, None, :].float()) * -10000.0
    with torch.no_grad():
        torch.testing.assert_close(a(x, o, m, None), b(x, o, m, None), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- training ---
def tiny_cfg(**kw) -> BridgeTowerConfig:
    kw = {"num_cross_layers": 2, "cross_dropout": 0.0, "itc_embed_dim": 16, **kw}
    return BridgeTowerConfig(
        vision=VisionConfig.clip(img_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(arch="roberta", vocab_size=40, hidden=32, layers=2, heads=2, intermediate=64,
                        max_position=20, type_vocab_size=1, ln_eps=1e-5, pad_token_id=1, dropout=0.0), **kw)


def batch(b=8, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones(b, t, dtype=torch.long)
    colours = torch.randn(b, 3, 1, 1, generator=g)  # images that can be told apart
    labels = torch.full_like(ids, -100)  # the collator's MLM inputs: tokens 2 and 4 masked ([MASK] = 3)
    labels[:, [2, 4]] = ids[:, [2, 4]]
    return {"image": colours.expand(b, 3, 32, 32) + 0.1 * torch.randn(b, 3, 32, 32, generator=g),
            "input_ids": ids, "attention_mask": mask, "image_ids": torch.arange(b),
            "mlm_input_ids": torch.where(labels != -100, torch.full_like(ids, 3), ids), "mlm_labels": labels}


@pytest.mark.parametrize("itc,bridge", [(0.0, "add"), (1.0, "add"), (0.0, "none")])
def test_every_parameter_gets_a_gradient_in_one_step(itc, bridge):
    torch.manual_seed(0)
    model = BridgeTower(tiny_cfg(bridge=bridge, loss_weights={"mlm": 1.0, "itm": 1.0, "itc": itc}))
    losses = model.compute_losses(batch())
    assert set(losses) == ({"mlm", "itm", "itc"} if itc else {"mlm", "itm"})
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert hasattr(model, "itc_text_head") == bool(itc)


def test_fixed_batch_is_overfit():
    torch.manual_seed(0)
    model = BridgeTower(tiny_cfg())
    data = batch()
    data["mlm_input_ids"] = data["input_ids"].clone()
    data["mlm_input_ids"][:, 2] = 3
    data["mlm_labels"] = torch.full_like(data["input_ids"], -100)
    data["mlm_labels"][:, 2] = data["input_ids"][:, 2]
    data["itm_image_index"] = torch.tensor([0, 2, 2, 4, 4, 6, 6, 0])
    data["itm_labels"] = (data["itm_image_index"] == torch.arange(8)).long()
    opt = torch.optim.AdamW(param_groups(model, OptimConfig(lr=3e-3, weight_decay=0.0)), lr=3e-3)
    losses, itm = [], []
    for _ in range(30):
        out = model.compute_losses(data)
        total = out["mlm"] + out["itm"]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
        itm.append(out["itm"].item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert itm[-1] < 0.2 < itm[0], itm  # matched vs swapped pairs are told apart


def test_mlm_on_masked_positions_only_is_the_same_loss_and_image_states_are_reused():
    torch.manual_seed(0)
    model = BridgeTower(tiny_cfg()).eval()
    data = batch()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        fast = model.pretrain_outputs(data, generator=g)
        slow_model = BridgeTower(dataclasses.replace(tiny_cfg(), mlm_masked_only=False, reuse_image_states=False))
        slow_model.load_state_dict(model.state_dict())
        slow = slow_model.eval().pretrain_outputs(data, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast["mlm"], slow["mlm"])
    torch.testing.assert_close(fast["itm_logits"], slow["itm_logits"])
    labels = fast["itm_labels"]
    assert labels.sum() == 4  # half the pairs keep their image


def test_hard_itm_negatives_come_from_the_itc_similarities_of_the_batch():
    """``itm_negatives=local-hard`` (the official ITC variant): 1 positive + 2 negatives per pair, the negatives
    drawn from softmax of the ITC similarities; a pair whose ITC puts all its mass on one candidate always gets
    that one; candidates of the same image id never; without ITC the config is refused."""
    torch.manual_seed(0)
    cfg = tiny_cfg(itm_negatives="local-hard", loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0})
    model = BridgeTower(cfg).eval()
    data = batch()
    data["image_ids"] = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # pairs 0 and 1 show the same image
    with torch.no_grad():
        out = model.pretrain_outputs(data, generator=torch.Generator().manual_seed(0))
    assert out["itm_logits"].shape == (24, 2) and out["itm_labels"].tolist() == [1] * 8 + [0] * 16
    # the pairs the model scored are the triplets of what sample_negatives draws from the same similarities
    from vlp.losses.matching import itm_triplets, sample_negatives

    with torch.no_grad():
        image_layers = model.image_layers(data["image"])
        text_layers = model.text_layers(data["input_ids"], data["attention_mask"])
        sim = model.itc_image_head(image_layers[-1][:, 0]) @ model.itc_text_head(text_layers[-1][:, 0]).T
        sim = sim / model.itc_temp()
        neg_img, neg_txt = sample_negatives(sim, sim.T, "local-hard", image_ids=data["image_ids"],
                                            generator=torch.Generator().manual_seed(0))
        image_index, text_index, _ = itm_triplets(neg_img, neg_txt)
        feats = model.cross_modal_forward([v[image_index] for v in image_layers],
                                          [t[text_index] for t in text_layers], data["attention_mask"][text_index])
        expected = model.itm_head(model.cls_feats(*feats))
    torch.testing.assert_close(out["itm_logits"], expected)
    assert not {int(neg_img[0]), int(neg_img[1]), int(neg_txt[0]), int(neg_txt[1])} & {0, 1}  # same image id
    with pytest.raises(ValueError, match="needs loss_weights.itc > 0"):
        tiny_cfg(itm_negatives="local-hard", loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 0.0})
    # hard_negatives_from_step: random swaps (B pairs, half swapped) before that optimizer step, hard ones from it on
    late = BridgeTower(dataclasses.replace(cfg, hard_negatives_from_step=5)).eval()
    late.load_state_dict(model.state_dict())
    for step, rows in ((0, 8), (4, 8), (5, 24)):
        late.current_step = lambda step=step: step
        with torch.no_grad():
            got = late.pretrain_outputs(data, generator=torch.Generator().manual_seed(0))
        assert got["itm_logits"].shape[0] == rows, step
        if rows == 8:
            assert got["itm_labels"].sum() == 4


def test_bridged_layers_are_the_top_k_and_meter_reads_only_the_top_layer():
    data = batch(b=2)
    for bridge, expected in (("add", [1, 2]), ("none", [2])):
        cfg = dataclasses.replace(tiny_cfg(bridge=bridge), vision=VisionConfig.clip(img_size=32, patch_size=8,
                                                                                   width=32, depth=3, heads=2))
        model = BridgeTower(cfg).eval()
        with torch.no_grad():
            hidden = model.vision(data["image"]).hidden_states
            layers = model.image_layers(data["image"])
        assert len(layers) == len(expected)
        for got, k in zip(layers, expected):  # ln_post (the tower's final norm) on every fed block
            torch.testing.assert_close(got, model.vision.vit.norm(hidden[k]))


def test_grad_checkpointing_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    plain = BridgeTower(tiny_cfg())
    ckpt = BridgeTower(tiny_cfg(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    data = batch()
    grads = []
    for model in (plain, ckpt):
        losses = model.pretrain_outputs(data, generator=torch.Generator().manual_seed(5))
        (losses["mlm"] + losses["itm"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_lr_multipliers_first_match_over_module_names():
    model = BridgeTower(tiny_cfg(num_answers=5, loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0}))
    optim = OptimConfig(lr=1e-5, weight_decay=0.01,
                        lr_mult={"vqa_head": 50.0, "cross_modal": 5.0, "mlm_head": 5.0, "itm_head": 5.0, "itc": 5.0})
    lr_of = {id(p): g["lr"] for g in param_groups(model, optim) for p in g["params"]}
    expected = {"vision.": 1e-5, "text.": 1e-5, "token_type_embeddings": 1e-5, "cross_modal": 5e-5,
                "mlm_head": 5e-5, "itm_head": 5e-5, "itc_": 5e-5, "vqa_head": 5e-4}
    seen = set()
    for name, p in model.named_parameters():
        key = next(k for k in expected if name.startswith(k) or (k == "cross_modal" and k in name))
        assert lr_of[id(p)] == pytest.approx(expected[key]), name
        seen.add(key)
    assert seen == set(expected)
    assert any(n.startswith("cross_modal.text_bridges.") for n, _ in model.named_parameters())
    assert any(n == "itc_temp.value" for n, _ in model.named_parameters())


def test_vqa_head_and_loss():
    model = BridgeTower(tiny_cfg(num_answers=5)).eval()
    data = batch(b=2)
    with torch.no_grad():
        fused = model.fuse(model.encode_image(Visual(pixels=data["image"])),
                           model.encode_text(Text(data["input_ids"], data["attention_mask"])))
        logits = model.vqa_logits(fused)
    assert logits.shape == (2, 5)
    assert [type(m).__name__ for m in model.vqa_head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.vqa_head[0].out_features == 2 * 32 * 2
    z, y = torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.3, 0.0]])
    assert BridgeTower.vqa_loss(z, y).item() == pytest.approx(4 * math.log(2))  # BCE(0, y) = log 2 each


def test_a_batch_without_mlm_inputs_fails_clearly():
    data = batch()
    del data["mlm_input_ids"], data["mlm_labels"]
    with pytest.raises(ValueError, match="mlm_input_ids"):
        BridgeTower(tiny_cfg()).compute_losses(data)


# ------------------------------------------------------------------------------------------ checkpoints ---
def test_save_then_load_gives_the_module_in_eval_mode(tmp_path):
    import vlp.models
    from vlp.models.loading import save

    torch.manual_seed(0)
    model = BridgeTower(tiny_cfg(loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0}))
    path = save(model, tmp_path / "m.ckpt")
    loaded = vlp.models.load(path)
    assert isinstance(loaded, BridgeTower) and not loaded.training
    data = batch(b=2)
    with torch.no_grad():
        visual, text = Visual(pixels=data["image"]), Text(data["input_ids"], data["attention_mask"])
        torch.testing.assert_close(loaded.pair_logits(visual, text), model.eval().pair_logits(visual, text))


def test_lightning_trainer_checkpoint_loads(tmp_path):
    import lightning as L

    import vlp.models

    torch.manual_seed(0)
    model = BridgeTower(tiny_cfg(), OptimConfig(lr=1e-3))
    model.total_steps = 1
    trainer = L.Trainer(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, torch.utils.data.DataLoader([batch()], batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = vlp.models.load(tmp_path / "last.ckpt")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


class _Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_untrusted_pickles_are_refused(tmp_path):
    import vlp.models
    from vlp.convert.bridgetower import convert_official

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"model": {"name": "bridgetower"}},
                "extra": _Payload()}, bad)
    with pytest.raises(ValueError, match="refused to load"):
        vlp.models.load(bad)
    with pytest.raises(ValueError, match="weights_only"):
        convert_official(bad)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    torch.save({"w": _Payload()}, hf_dir / "pytorch_model.bin")
    from vlp.convert.bridgetower import convert_hf

    with pytest.raises(ValueError, match="refused to load"):
        convert_hf(hf_dir)


def test_convert_cli_bridgetower_hf_and_tcl(hf_saved, tmp_path):
    import vlp.models
    from vlp.convert import cli

    hf, path = hf_saved[("BridgeTowerForImageAndTextRetrieval", "add")]
    dst = tmp_path / "bt.ckpt"
    assert cli.run(Namespace(kind="bridgetower-hf", src=str(path), dst=str(dst), vision_heads=None,
                             text_heads=None, prefix=None)) == 0
    module = vlp.models.load(dst)
    px, ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(module.pair_logits(Visual(pixels=px), Text(ids, mask)),
                                   hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits, **TOL)

    fixture = torch.load(Path(__file__).parent / "fixtures" / "official" / "tcl_tiny.pt", weights_only=True)
    official = {"model": fixture["state_dict"]}  # the official checkpoint layout
    torch.save(official, tmp_path / "tcl_official.pth")
    dst = tmp_path / "tcl.ckpt"
    assert cli.run(Namespace(kind="tcl", src=str(tmp_path / "tcl_official.pth"), dst=str(dst), vision_heads=4,
                             text_heads=4, prefix=None)) == 0
    tcl = vlp.models.load(dst)
    assert type(tcl).__name__ == "TCL" and not tcl.training
    assert tcl.cfg.vision.heads == 4 and tcl.cfg.text.fusion_layers == 2 and tcl.cfg.queue_size == 16
    torch.testing.assert_close(tcl.vision.vit.pos_embed, official["model"]["visual_encoder.pos_embed"])


def test_experiment_configs_validate_and_tiny_builds():
    from vlp import config
    from vlp.models import build

    root = Path(__file__).parents[1] / "experiments" / "bridgetower"
    paper = config.load(root / "pretrain.yaml")
    assert (paper.model.num_cross_layers, paper.model.vision.img_size, paper.optim.betas) == (6, 288, [0.9, 0.98])
    assert paper.optim.lr_mult["cross_modal"] == 5.0 and paper.trainer.accumulate_grad_batches == 2
    tiny = config.load(root / "tiny.yaml", ["model.text.vocab_size=50", "model.text.pad_token_id=0"])
    model = build(tiny.model, tiny.optim)
    assert model.vision.vit.norm_pre is not None and type(model.vision.vit.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert model.text.arch == "roberta" and len(model.cross_modal.text_layers) == 2
