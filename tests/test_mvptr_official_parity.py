"""A converted official MVPTR checkpoint reproduces the official code's numbers (``tests/fixtures/official/
mvptr_tiny.pt`` and its data sheet ``mvptr_tiny.md``: Junction4Nako/mvp_pytorch at c401680,
``BiBertImgForPreTraining``, random weights, eval mode, one forward + backward).

The fixture's inputs are already corrupted (as the official dataset builds them); the recorded random choices (the
hard-negative permutation, WPG's negative images and top-3 picks) are replayed through the batch keys. Every size
comes from the fixture's own ``config`` and tensors, so any fixture of the same layout replays.
"""

from pathlib import Path

import pytest
import torch

from vlp.convert.mvptr import config_from_state_dict, convert_state_dict, load_into
from vlp.models.mvptr import MVPTR

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "mvptr_tiny.pt"
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def model(fx):
    c = fx["config"]
    cfg = config_from_state_dict(fx["state_dict"], heads=c["num_attention_heads"])
    assert (cfg.text.vocab_size, cfg.phrase_vocab_size) == (c["only_word_size"], c["phrase_vocab_size"])
    assert (cfg.text.hidden, cfg.text.layers, cfg.text.intermediate) == (
        c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"])
    assert cfg.region_dim == c["img_feature_dim"] and cfg.region_layernorm == bool(c["use_img_layernorm"])
    m = MVPTR(cfg)
    assert load_into(m, fx["state_dict"]) == []
    return m.eval()


def ranges_mask(index: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 2] [start, end) ranges -> bool [B, length]."""
    pos = torch.arange(length)
    return (pos >= index[:, :1]) & (pos < index[:, 1:])


def wpg_picks(fx, n_phrases: torch.Tensor):
    """The recorded top-3 picks, in the official call order (per text with phrases: positive, then negative), as
    [B, P] index tensors."""
    recorded = list(fx["records"]["wpg_top3_rand_index"])
    b, p = n_phrases.shape[0], max(1, int(n_phrases.max()))
    pos, neg = torch.zeros(b, p, dtype=torch.long), torch.zeros(b, p, dtype=torch.long)
    for t in range(b):
        n = int(n_phrases[t])
        if n:
            pos[t, :n], neg[t, :n] = recorded.pop(0), recorded.pop(0)
    assert not recorded
    return pos, neg


def our_batch(fx) -> dict:
    x, c = fx["inputs"], fx["config"]
    t_len, n_tags = x["input_ids_a"].shape[1], c["max_tag_length"]
    assert (x["token_type_ids_a"] == 0).all() and (x["token_type_ids_b"] == 1).all()
    labels_b = x["masked_lm_labels_b"]
    assert (labels_b[:, n_tags:] == -1).all()  # regions are never MCR targets
    region_mask = x["attention_mask_b"][:, n_tags:].bool()
    assert torch.equal(ranges_mask(x["img_index"] - t_len, region_mask.shape[1]), region_mask)
    phrase_mask = ranges_mask(x["phrase_index"], t_len)
    pick_pos, pick_neg = wpg_picks(fx, phrase_mask.sum(1))
    feats = x["img_feats"]
    return {
        "input_ids": x["input_ids_a"], "attention_mask": x["attention_mask_a"],
        "mlm_labels": x["masked_lm_labels_a"].masked_fill(x["masked_lm_labels_a"] < 0, -100),
        "phrase_mask": phrase_mask,
        "tag_ids": x["input_ids_b"], "tag_mask": x["attention_mask_b"][:, :n_tags],
        "tag_mlm_labels": labels_b[:, :n_tags].masked_fill(labels_b[:, :n_tags] < 0, -100),
        "region_features": feats, "region_boxes": torch.zeros(*feats.shape[:2], 4), "region_mask": region_mask,
        "itm_order": fx["records"]["dice_index"],
        "wpg_neg_image": torch.tensor(fx["records"]["wpg_neg_img_choice"]),
        "wpg_pick_pos": pick_pos, "wpg_pick_neg": pick_neg,
    }


@pytest.fixture(scope="module")
def run(fx, model):
    model.zero_grad()
    out = model.pretrain_outputs(our_batch(fx))
    total = sum(out[k] for k in ("mcr", "vsc", "itm", "mlm", "wpg"))
    total.backward()
    return out, total


def test_losses(fx, run):
    out, total = run
    r = fx["records"]["losses"]
    for ours, theirs in [("mcr", "vis_mlm_loss_MCR"), ("vsc", "retrieval_loss_VSC"), ("mlm", "masked_lm_loss_MLM"),
                         ("itm", "next_sentence_loss_ITM"), ("wpg", "wra_loss_WPG")]:
        torch.testing.assert_close(out[ours].detach(), torch.as_tensor(r[theirs]).float(), **TOL, msg=ours)
    torch.testing.assert_close(total.detach(), torch.as_tensor(r["total_loss"]).float(), **TOL)


def test_unimodal_states_and_similarities(fx, run):
    out, _ = run
    r = fx["records"]
    torch.testing.assert_close(out["txt_states"], r["txt_encoder_outputs"], **TOL)
    torch.testing.assert_close(out["vis_states"], r["vis_encoder_outputs"], **TOL)
    torch.testing.assert_close(out["sim"], r["sim_mat"], **TOL)
    torch.testing.assert_close(out["logit_scale_exp"], r["logit_scale_exp"], **TOL)


def test_cross_modal_and_hard_negatives(fx, run):
    out, _ = run
    r = fx["records"]
    torch.testing.assert_close(out["states"], r["sequence_output"], **TOL)
    torch.testing.assert_close(out["pooled"], r["pooled_output"], **TOL)
    assert torch.equal(out["hard_text_index"], r["hard_txt_index_full"])
    assert torch.equal(out["hard_image_index"], r["hard_img_index_full"])
    torch.testing.assert_close(out["hard_states"], r["hard_sequence_output"], **TOL)
    torch.testing.assert_close(out["hard_pooled"], r["hard_pooled_output"], **TOL)
    # contract: index 1 = matched; the official pre-training head has 0 = matched
    torch.testing.assert_close(out["itm_logits"].flip(1), r["itm_logits"], **TOL)
    assert torch.equal(1 - out["itm_labels"], r["itm_labels"])


def test_lm_heads(fx, run):
    out, _ = run
    r = fx["records"]
    torch.testing.assert_close(out["mlm_logits"], r["mlm_logits"], **TOL)
    assert torch.equal(out["mlm_targets"], r["mlm_labels"])
    torch.testing.assert_close(out["mcr_logits"], r["mcr_logits"], **TOL)
    assert torch.equal(out["mcr_targets"], r["mcr_labels"])


def test_grounding(fx, run):
    out, _ = run
    r = fx["records"]
    valid = r["wpg_valid_mask"]
    assert torch.equal(out["wpg_valid"], valid)
    torch.testing.assert_close(out["wpg_pos"][valid], r["wpg_pos_sims"][valid], **TOL)
    torch.testing.assert_close(out["wpg_neg"][valid], r["wpg_neg_sims"][valid], **TOL)


def test_gradients(fx, model, run):
    grads = fx["records"]["grads"]
    ours = dict(model.named_parameters())
    mapped = 0
    for name, g in grads.items():
        key = next(iter(convert_state_dict({name: g}, itm_match_index=0)), None)
        if key is None:
            continue
        # the converter flips the ITM rows, so the official gradient is flipped the same way
        expect = convert_state_dict({name: g}, itm_match_index=0)[key]
        assert ours[key].grad is not None, key
        torch.testing.assert_close(ours[key].grad, expect, atol=1e-5, rtol=1e-4, msg=key)
        mapped += 1
    assert mapped == len(grads)
