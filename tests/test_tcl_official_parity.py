"""A converted official TCL checkpoint reproduces the official code's numbers (tests/fixtures/official/README.md).

The fixture holds a tiny official state_dict, the inputs of one forward, every random choice of that forward (MLM
masks, ITM negatives) and what the official code computed. We convert the state_dict, replay the same forward and
compare everything to 1e-5.
"""

from pathlib import Path

import pytest
import torch

from vlp.blocks.text import TextConfig
from vlp.blocks.vision import VisionConfig
from vlp.convert.tcl import load_into
from vlp.models.tcl import TCL, TCLConfig

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "tcl_tiny.pt"
TOL = dict(atol=1e-5, rtol=1e-5)


def official_config(c: dict) -> TCLConfig:
    b, v = c["bert"], c["vit"]
    return TCLConfig(
        vision=VisionConfig(name="custom", img_size=v["img_size"], patch_size=v["patch_size"], width=v["embed_dim"],
                            depth=v["depth"], heads=v["num_heads"], mlp_ratio=4.0, qkv_bias=v["qkv_bias"],
                            ln_eps=v["layer_norm_eps"]),
        text=TextConfig(arch="bert", vocab_size=b["vocab_size"], hidden=b["hidden_size"],
                        layers=b["num_hidden_layers"], heads=b["num_attention_heads"],
                        intermediate=b["intermediate_size"], max_position=b["max_position_embeddings"],
                        type_vocab_size=b["type_vocab_size"], ln_eps=b["layer_norm_eps"],
                        pad_token_id=b["pad_token_id"], dropout=b["hidden_dropout_prob"],
                        fusion_layers=b["num_hidden_layers"] - b["fusion_layer"], encoder_width=b["encoder_width"]),
        embed_dim=c["embed_dim"], temp=c["temp"], queue_size=c["queue_size"], momentum=c["momentum"],
        alpha=c["alpha"], lmi_locals=None,  # the official pooling rule (kernel int(sqrt(grid)))
    )


@pytest.fixture(scope="module")
def replay():
    fx = torch.load(FIXTURE, weights_only=True)
    model = TCL(official_config(fx["config"]))
    load_into(model, fx["state_dict"])
    model.eval()
    inp, rec = fx["inputs"], fx["records"]
    batch = {
        "image": inp["image"], "image_aug": inp["image_aug"], "input_ids": inp["input_ids"],
        "attention_mask": inp["attention_mask"], "mlm_input_ids": rec["mlm_input_ids"],
        "mlm_labels": rec["mlm_labels"], "neg_image_for_text": rec["neg_image_for_text"],
        "neg_text_for_image": rec["neg_text_for_image"],
    }
    with torch.no_grad():
        out = model(batch, alpha=float(inp["alpha"]))
    return model, out, rec, fx


def test_unimodal_embeddings_and_features(replay):
    _, out, rec, _ = replay
    torch.testing.assert_close(out["image_embeds"], rec["image_embeds"], **TOL)
    torch.testing.assert_close(out["text_embeds"], rec["text_embeds"], **TOL)
    torch.testing.assert_close(out["image_feat"], rec["image_feat"], **TOL)
    torch.testing.assert_close(out["text_feat"], rec["text_feat"], **TOL)


def test_fusion_states_and_itm_logits_of_positives(replay):
    _, out, rec, _ = replay
    torch.testing.assert_close(out["fused_pos"], rec["fused_pos"], **TOL)
    torch.testing.assert_close(out["itm_logits"][: rec["itm_logits_pos"].shape[0]], rec["itm_logits_pos"], **TOL)


def test_alignment_losses(replay):
    _, out, rec, _ = replay
    torch.testing.assert_close(out["loss_lmi_text"], rec["loss_lmi_text"], **TOL)
    torch.testing.assert_close(out["loss_lmi_image"], rec["loss_lmi_image"], **TOL)
    torch.testing.assert_close(out["ita"], rec["loss_ita"], **TOL)


def test_itm_loss_with_recorded_negatives(replay):
    _, out, rec, _ = replay
    torch.testing.assert_close(out["itm"], rec["loss_itm"], **TOL)


def test_mlm_loss_with_momentum_distillation(replay):
    _, out, rec, _ = replay
    torch.testing.assert_close(out["mlm"], rec["loss_mlm"], **TOL)


def test_queues_after_enqueue(replay):
    model, _, rec, _ = replay
    torch.testing.assert_close(model.queue.image_queue, rec["image_queue_after"], **TOL)
    torch.testing.assert_close(model.queue.text_queue, rec["text_queue_after"], **TOL)
    assert model.queue.queue_ptr.tolist() == rec["queue_ptr_after"].tolist()


def test_momentum_parameters_after_ema_update(replay):
    model, _, rec, _ = replay
    ours = dict(model.named_parameters())
    ours.update({k: v for k, v in model.state_dict().items()})
    for key, expected in rec["momentum_after"].items():
        assert key.startswith("visual_encoder_m.")
        mine = ours["momentum.vision.vit." + key[len("visual_encoder_m."):]]
        torch.testing.assert_close(mine, expected, **TOL)
