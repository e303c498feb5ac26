"""The model contract (vlp.models.base, DESIGN §5), checked on every registered model: registering a model in
``vlp.models.MODELS`` is enough to hold it to these tests (timm's ``test_models.py`` idea).

Each model's config class provides ``tiny()``; the model provides ``example_inputs``. Checked: shapes of every
contract method on a batch whose texts (and, for region models, region counts) differ; no mixing between samples
(a sample's ITM logits are the same alone and inside a padded batch); finite losses, a gradient on every trainable
parameter; switching an objective off; a fixed batch is overfit; and ``vlp pretrain`` / ``vlp evaluate`` /
``vlp finetune`` (VQA) run end to end on the shapes world (with its simulated detector's regions) through the
contract alone.
"""

import json

import pytest
import torch

from vlp.data.visual import BATCH_KEYS
from vlp.models import MODELS, _import
from vlp.models.base import Encoded, Fused, Text

from _tiny_runs import tiny_experiment

NAMES = sorted(MODELS)
MASK_ID = 4  # the tiny vocabularies' [MASK] stand-in for hand-made MLM inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, **overrides):
    cfg_cls, cls = _import(name)
    torch.manual_seed(0)
    return cls(cfg_cls.tiny(**overrides))


def training_batch(model, b=4, seed=0) -> dict:
    """A training batch of the model's own inputs: the visual fields under their batch keys, the text, an MLM
    version of it (two masked tokens per row), distinct image ids."""
    visual, text = model.example_inputs(b, seed)
    keys = {field: key for key, field in BATCH_KEYS.items()}
    batch = {keys[f]: v for f, v in visual._asdict().items() if v is not None}
    ids, mask = text
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    for i in range(b):
        for t in (1, 2):
            labels[i, t], mlm_ids[i, t] = ids[i, t], MASK_ID
    batch.update(input_ids=ids, attention_mask=mask, mlm_input_ids=mlm_ids, mlm_labels=labels,
                 image_ids=torch.arange(b) + 100)
    if visual.tag_ids is not None:  # concept tags: the first tag masked (MVPTR's MCR)
        tag_ids, tag_labels = visual.tag_ids.clone(), torch.full_like(visual.tag_ids, -100)
        tag_labels[:, 1], tag_ids[:, 1] = visual.tag_ids[:, 1], MASK_ID
        batch.update(tag_mlm_ids=tag_ids, tag_mlm_labels=tag_labels)
    if getattr(model, "phrase_rows", 0):  # phrase tokens follow the words (MVPTR)
        batch["phrase_mask"] = ids >= model.word_vocab_size
    return batch


@pytest.mark.parametrize("name", NAMES)
def test_contract_shapes(name):
    model = build(name).eval()
    b = 3
    visual, text = model.example_inputs(b)
    assert model.reads and model.reads <= {"pixels", "regions", "tags", "phrases"}
    assert ("pixels" in model.reads) == visual.has_pixels and ("regions" in model.reads) == visual.has_regions
    assert len(set(text.attention_mask.sum(1).tolist())) > 1, "example texts must differ in length"
    if visual.has_regions:
        assert len(set(visual.mask.sum(1).tolist())) > 1, "example region counts must differ"
    with torch.no_grad():
        image, txt = model.encode_image(visual), model.encode_text(text)
        for enc, n in ((image, None), (txt, text.input_ids.shape[1])):
            assert isinstance(enc, Encoded)
            assert enc.states.shape[0] == b and enc.mask.shape == (b, enc.states.shape[-2])
            if n is not None:
                assert enc.states.shape[-2] == n
            if model.has_contrastive_head:
                assert enc.embedding.shape[0] == b
                torch.testing.assert_close(enc.embedding.norm(dim=-1), torch.ones(b))
            else:
                assert enc.embedding is None
        fused = model.fuse(image, txt)
        assert isinstance(fused, Fused) and fused.states.shape[0] == b
        assert fused.pooled.shape == (b, model.pooled_dim)
        logits = model.match_logits(fused)
        assert logits.shape == (b, 2) and torch.isfinite(logits).all()
    protocol = model.retrieval_protocol
    assert protocol.first_stage in ("contrastive", "all_pairs") and protocol.combine in ("itm", "itc", "max")
    assert protocol.first_stage == "all_pairs" or model.has_contrastive_head


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_mixes_samples(name):
    """Row i's ITM logits inside a padded batch equal those of row i alone, trimmed to its own length: the
    padding (text, and regions for region models) is masked everywhere, and samples never attend to each other.
    Cached encodings padded to another length (Encoded.cat, as retrieval caches them) give the same logits too."""
    model = build(name).eval()
    visual, text = model.example_inputs(3)
    with torch.no_grad():
        together = model.pair_logits(visual, text)
        image, txt = model.encode_image(visual), model.encode_text(text)
        for i in range(3):
            n = int(text.attention_mask[i].sum())
            row = torch.tensor([i])
            alone_visual = visual.select(row)
            if alone_visual.has_regions:
                k = int(alone_visual.mask.sum())
                alone_visual = alone_visual._replace(**{f: getattr(alone_visual, f)[:, :k]
                                                        for f in ("features", "boxes", "mask", "cls_prob")
                                                        if getattr(alone_visual, f) is not None})
            alone = model.pair_logits(alone_visual, Text(text.input_ids[i:i + 1, :n], text.attention_mask[i:i + 1, :n]))
            torch.testing.assert_close(alone, together[i:i + 1], atol=1e-5, rtol=1e-4)
        longer = Encoded.cat([txt, Encoded(txt.states[:1].new_zeros(1, *txt.states.shape[1:-2], txt.states.shape[-2] + 3,
                                                                     txt.states.shape[-1]),
                                           txt.mask.new_zeros(1, txt.states.shape[-2] + 3))])
        cached = model.match_logits(model.fuse(image, longer.select(torch.arange(3))))
        torch.testing.assert_close(cached, together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_losses_are_finite_and_reach_every_trainable_parameter(name):
    model = build(name).train()
    losses = model.compute_losses(training_batch(model))
    assert losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    assert set(losses) == {k for k in model.loss_weights if model.enabled(k)}
    sum(model.weight(k) * v for k, v in losses.items()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("name", NAMES)
def test_an_objective_with_weight_zero_is_not_computed(name):
    model = build(name)
    for off in [k for k in model.loss_weights if model.enabled(k)]:
        weights = {**model.loss_weights, off: 0.0}
        m = build(name, loss_weights=weights).train()
        losses = m.compute_losses(training_batch(m))
        assert off not in losses and losses


@pytest.mark.parametrize("name", NAMES)
def test_a_fixed_batch_is_overfit(name):
    model = build(name).train()
    batch = training_batch(model, b=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(60):
        losses = model.compute_losses(batch)
        total = sum(model.weight(k) * v for k, v in losses.items())
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < 0.5 * first, (first, float(total.detach()))


# -- end to end through the CLI on the shapes world (with its simulated detector's regions) ----------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pretrain_evaluate_and_finetune_through_the_contract(name, shapes_shards, tmp_path, capsys):
    from vlp.cli import main

    pre = tiny_experiment(name, tmp_path, shapes_shards, queue_size=None, max_steps=2, checkpoint_every_n_steps=2)
    assert main(["pretrain", str(pre), "--no-eval"]) == 0
    ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # zero-shot retrieval on a subset, by the model's protocol and by ITM over all pairs
    assert main(["evaluate", str(pre), f"ckpt={ckpt}", "eval.subset=12"]) == 0
    res = json.loads((tmp_path / name / "results.json").read_text())
    assert res["retrieval_images"] == 12 and set(res["retrieval"]) >= {"txt_r1", "img_r10"}
    assert main(["evaluate", str(pre), f"ckpt={ckpt}", "eval.subset=6", "eval.first_stage=all_pairs",
                 "eval.combine=itm"]) == 0
    res = json.loads((tmp_path / name / "results.json").read_text())
    assert res["retrieval_protocol"] == "all_pairs+itm" and res["retrieval_images"] == 6
    # VQA fine-tuning from that checkpoint: the shared head on Fused.pooled
    ft = tiny_experiment(name, tmp_path, shapes_shards, task="vqa", queue_size=None, max_steps=2,
                         checkpoint_every_n_steps=2)
    assert main(["finetune", str(ft), f"ckpt={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert "newly initialised: vqa_head" in out
    res = json.loads((tmp_path / f"{name}-vqa" / "results.json").read_text())
    assert res["vqa"]["answered"] > 0 and res["vqa"]["step"] == 2
