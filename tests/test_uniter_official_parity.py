"""A converted official UNITER checkpoint reproduces the official code's numbers (tests/fixtures/official/README.md,
``uniter_tiny.pt``: ChenRocks/UNITER at 1dbfa62, ``UniterForPretraining``, random weights, eval mode).

The fixture holds the official state_dict, the official collate output of each task (masks recorded there) and what
the official forward computed. We convert the state_dict (``vlp.convert.uniter``), feed the same inputs through our
batch keys (the region masks and ITM pairs as batch-provided draws) and compare to 1e-5. Every size and special id
comes from the fixture's own ``config``.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlp.convert.uniter import config_from_state_dict, convert_state_dict, load_into
from vlp.models.uniter import UNITER

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "uniter_tiny.pt"
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def model(fx):
    c = fx["config"]
    cfg = config_from_state_dict(fx["state_dict"], heads=c["num_attention_heads"])
    assert (cfg.text.vocab_size, cfg.text.hidden, cfg.text.layers, cfg.text.intermediate) == (
        c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"])
    assert (cfg.region_dim, cfg.region_classes) == (c["img_dim"], c["img_label_dim"])
    m = UNITER(cfg)
    assert m.weight("ot") == c["itm_ot_lambda"]  # the paper's lambda is the default weight of the ot loss
    assert load_into(m, fx["state_dict"]) == []
    return m.eval()


def lengths(fx):
    """Text lengths ([CLS] .. [SEP]) and region counts, from the ITM batch's padding masks (the same texts and images
    in every batch)."""
    ot = fx["batches"]["itm"]["ot_inputs"]
    return (ot["txt_pad"] == 0).sum(1), (ot["img_pad"] == 0).sum(1)


def our_batch(fx, task: str) -> dict:
    """The official collate output of ``task`` under our batch keys."""
    b, c = fx["batches"][task], fx["config"]
    t_len, n_reg = lengths(fx)
    ids = b["input_ids"]
    attn = (torch.arange(ids.shape[1]) < t_len[:, None]).long()
    n = b["img_feat"].shape[1]
    region_mask = torch.arange(n) < n_reg[:, None]
    # the official 7-d location feature, fed to the block as is (its xyxy part would give the same values)
    feats = fx["batches"]["mlm"]["img_feat"]  # unmasked features (the mrfr/mrc collates zero the masked ones)
    batch = {"input_ids": ids, "attention_mask": attn, "region_features": feats, "region_boxes": b["img_pos_feat"],
             "region_mask": region_mask, "image_ids": torch.arange(ids.shape[0])}
    if task == "mlm":
        batch.update(mlm_input_ids=ids, mlm_labels=b["txt_labels"].masked_fill(b["txt_labels"] == -1, -100))
    if task in ("mrfr", "mrckl"):
        batch["region_masked"] = b["img_masks"]
    if task == "mrckl":
        cls_prob = torch.full((*feats.shape[:2], c["img_label_dim"]), 1.0 / c["img_label_dim"])
        cls_prob[b["img_masks"]] = b["label_targets"]
        batch["region_cls_prob"] = cls_prob
    if task == "itm":
        batch.update(itm_labels=b["targets"], itm_image_index=torch.arange(ids.shape[0]))
    return batch


def run(model, fx, task):
    ours = {"mrckl": "mrc_kl"}.get(task, task)
    with torch.no_grad():
        return model.task_outputs(our_batch(fx, task), ours)


def test_the_conversion_covers_every_official_key(fx):
    sd = fx["state_dict"]
    converted = convert_state_dict(sd)
    assert len(converted) == len(sd)  # 70 official keys, none dropped (the tied copies are kept and checked)
    assert not converted["img_embeddings.mask_embedding.weight"][0].any()


def test_the_batches_are_the_collates_we_assume(fx):
    """The masked-region collates zero the masked features of the same images; the 7-d location is xyxy, w, h, w*h;
    the official gather_index is an index into our [text padded | regions padded] layout."""
    from vlp.blocks.regions import location_features

    base = fx["batches"]["mlm"]
    for task in ("mrfr", "mrckl"):
        b = fx["batches"][task]
        torch.testing.assert_close(b["img_feat"], base["img_feat"].masked_fill(b["img_masks"].unsqueeze(-1), 0))
    mrfr = fx["batches"]["mrfr"]
    torch.testing.assert_close(mrfr["feat_targets"], base["img_feat"][mrfr["img_masks"]])
    _, n_reg = lengths(fx)
    real = torch.arange(base["img_pos_feat"].shape[1]) < n_reg[:, None]
    loc = base["img_pos_feat"][real]
    torch.testing.assert_close(location_features(loc[:, :4]), loc, atol=1e-3, rtol=0)  # stored in fp16


def test_mlm_losses_and_encoder_output(model, fx):
    rec, b = fx["records"], fx["batches"]["mlm"]
    out = run(model, fx, "mlm")
    torch.testing.assert_close(out["mlm_elements"], rec["mlm_loss_elements"], **TOL)
    torch.testing.assert_close(out["mlm"], rec["mlm_loss"], **TOL)
    # our [txt | regions] layout through the official gather_index = the official compact sequence
    gathered = out["states"].gather(1, b["gather_index"].unsqueeze(-1).expand(-1, -1, out["states"].shape[-1]))
    real = b["attn_masks"].bool()
    torch.testing.assert_close(gathered[real], rec["sequence_output_mlm_batch"][real], **TOL)


def test_mrfr_losses(model, fx):
    rec = fx["records"]
    out = run(model, fx, "mrfr")
    torch.testing.assert_close(out["mrfr_elements"], rec["mrfr_loss_elements"], **TOL)
    torch.testing.assert_close(out["mrfr"], rec["mrfr_loss"], **TOL)


def test_mrc_kl_losses(model, fx):
    rec = fx["records"]
    out = run(model, fx, "mrckl")
    torch.testing.assert_close(out["mrc_kl_elements"], rec["mrckl_loss_elements"], **TOL)
    torch.testing.assert_close(out["mrc_kl"], rec["mrckl_loss"], **TOL)


def test_itm_logits_loss_and_optimal_transport(model, fx):
    rec, b = fx["records"], fx["batches"]["itm"]
    out = run(model, fx, "itm")
    torch.testing.assert_close(out["itm_logits"], rec["itm_logits"], **TOL)
    per_pair = F.cross_entropy(out["itm_logits"], b["targets"], reduction="none")
    torch.testing.assert_close(per_pair, rec["itm_loss_per_pair"], **TOL)
    torch.testing.assert_close(out["itm"], rec["itm_loss_per_pair"].mean(), **TOL)
    pos = b["targets"] == 1
    torch.testing.assert_close(out["ot_distance"][pos], rec["ot_pos"], **TOL)
    torch.testing.assert_close(out["ot_distance"][~pos], rec["ot_neg"], **TOL)
    torch.testing.assert_close(out["ot"], rec["ot_loss"], **TOL)


def test_vlp_convert_uniter_writes_a_checkpoint_that_loads(fx, model, tmp_path):
    """``vlp convert uniter SRC.pt DST.ckpt`` (weights_only read), then ``vlp.models.load``: the same numbers."""
    from vlp.convert.cli import main
    from vlp.models import load

    src, dst = tmp_path / "model_step_0.pt", tmp_path / "uniter.ckpt"
    torch.save(fx["state_dict"], src)
    assert main(["uniter", str(src), str(dst), "--text-heads", str(fx["config"]["num_attention_heads"])]) == 0
    loaded = load(dst)
    with torch.no_grad():
        out = loaded.task_outputs(our_batch(fx, "itm"), "itm")
    torch.testing.assert_close(out["itm_logits"], fx["records"]["itm_logits"], **TOL)
    torch.testing.assert_close(out["ot"], fx["records"]["ot_loss"], **TOL)


def test_a_file_whose_tied_heads_differ_is_refused(fx):
    sd = dict(fx["state_dict"])
    sd["feat_regress.weight"] = sd["feat_regress.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        convert_state_dict(sd)
    sd = dict(fx["state_dict"], **{"uniter.mystery.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="mystery"):
        convert_state_dict(sd)
