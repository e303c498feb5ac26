"""UNITER's parts against hand values: the region embedder, the heads, the region losses and masks, the ITM pairs,
the per-step task sampler (distribution, ranks, resume, accumulation windows) and conditional masking."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from vlp.blocks.regions import RegionEmbedder, location_features
from vlp.losses.regions import mrc_kl_loss, mrc_loss, mrc_targets, mrfr_loss, region_mask
from vlp.models.base import Text
from vlp.models.uniter import TASK_LOSSES, TASKS, UNITER, TaskSampler, UNITERConfig, draw_itm_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> UNITER:
    torch.manual_seed(0)
    return UNITER(UNITERConfig.tiny(**overrides))


def batch_of(model: UNITER, b: int = 4, seed: int = 0) -> dict:
    visual, text = model.example_inputs(b, seed)
    ids, mask = text
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    labels[:, 1], mlm_ids[:, 1] = ids[:, 1], 4
    return {"region_features": visual.features, "region_boxes": visual.boxes, "region_mask": visual.mask,
            "region_cls_prob": visual.cls_prob, "input_ids": ids, "attention_mask": mask, "mlm_input_ids": mlm_ids,
            "mlm_labels": labels, "image_ids": torch.arange(b) + 10}


# -- region embedder --------------------------------------------------------------------------------------------------
def test_location_features_by_hand():
    loc = location_features(torch.tensor([[0.1, 0.2, 0.5, 0.6]]))
    torch.testing.assert_close(loc, torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]]))


def _ln(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_region_embedder_by_hand():
    torch.manual_seed(1)
    emb = RegionEmbedder(3, 4, dropout=0.0).eval()
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_()
    feats = torch.randn(1, 2, 3)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 0.5], [0.2, 0.3, 0.4, 0.9]]])
    type_e = torch.randn(4)
    loc = location_features(boxes)
    img = _ln(feats @ emb.img_linear.weight.T + emb.img_linear.bias, emb.img_layer_norm.weight,
              emb.img_layer_norm.bias)
    pos = _ln(loc @ emb.pos_linear.weight.T + emb.pos_linear.bias, emb.pos_layer_norm.weight, emb.pos_layer_norm.bias)
    expected = _ln(img + pos + type_e, emb.LayerNorm.weight, emb.LayerNorm.bias)
    torch.testing.assert_close(emb(feats, boxes, type_e), expected)
    torch.testing.assert_close(emb(feats, loc, type_e), expected)  # a ready 7-d location (official batches)
    # a masked region: its features are replaced by the mask vector (row 1); row 0 of the table plays no part
    masked = torch.tensor([[False, True]])
    with torch.no_grad():
        emb.mask_embedding.weight[0].fill_(5.0)
    out = emb(feats, boxes, type_e, masked)
    torch.testing.assert_close(out[:, 0], expected[:, 0])
    other = feats.clone()
    other[0, 1] = 100.0
    torch.testing.assert_close(emb(other, boxes, type_e, masked), out)
    swapped = feats.clone()
    swapped[0, 1] = emb.mask_embedding.weight[1].detach()
    torch.testing.assert_close(emb(swapped, boxes, type_e), out)


def test_region_embedder_init_and_errors():
    emb = RegionEmbedder(5, 8)
    assert not emb.mask_embedding.weight[0].any() and emb.mask_embedding.weight[1].any()
    assert [n for n, _ in emb.named_children()][:6] == ["img_linear", "img_layer_norm", "pos_layer_norm",
                                                        "pos_linear", "mask_embedding", "LayerNorm"]
    with pytest.raises(ValueError, match="region_dim"):
        emb(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(8))


# -- heads ------------------------------------------------------------------------------------------------------------
def test_heads_are_tied_and_computed_by_hand():
    m = tiny().eval()
    assert m.feat_regress.weight is m.img_embeddings.img_linear.weight
    assert m.mlm_head.decoder.weight is m.embeddings.word_embeddings.weight
    h = torch.randn(3, m.pooled_dim)
    lin, _, ln = m.feat_regress.net
    hidden = F.layer_norm(F.gelu(lin(h)), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(m.feat_regress(h), hidden @ m.img_embeddings.img_linear.weight + m.feat_regress.bias)
    assert m.region_classifier(h).shape == (3, m.cfg.region_classes)
    # the MRFR loss trains img_linear (the tie), the MLM loss the word embeddings
    m.train()
    losses = m.compute_losses(batch_of(m))
    losses["mrfr"].backward()
    assert m.img_embeddings.img_linear.weight.grad.abs().sum() > 0
    # VQA head: UNITER's order (Linear, GELU, LayerNorm 1e-12, Linear)
    v = tiny(num_answers=7)
    kinds = [type(x).__name__ for x in v.vqa_head]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Linear"] and v.vqa_head[2].eps == 1e-12
    assert v.vqa_head[0].out_features == 2 * v.pooled_dim and v.vqa_head[3].out_features == 7


# -- region losses and masks ------------------------------------------------------------------------------------------
def test_region_losses_by_hand():
    torch.testing.assert_close(mrfr_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)), torch.tensor(2.5))
    # q = (1/2, 1/2), p = (1, 0): KL elements (ln 2, 0), mean over 2 elements
    torch.testing.assert_close(mrc_kl_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])),
                               torch.tensor(math.log(2) / 2))
    p = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    assert mrc_targets(p).tolist() == [2, 1] and mrc_targets(p, skip_background=False).tolist() == [0, 1]
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    expected = (F.cross_entropy(logits[:1], torch.tensor([2])) + F.cross_entropy(logits[1:], torch.tensor([1]))) / 2
    torch.testing.assert_close(mrc_loss(logits, p), expected)
    empty = torch.zeros(0, 3, requires_grad=True)
    for loss in (mrfr_loss(empty, torch.zeros(0, 3)), mrc_kl_loss(empty, torch.zeros(0, 3)),
                 mrc_loss(empty, torch.zeros(0, 3))):
        assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_region_mask_rules():
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    g = torch.Generator().manual_seed(0)
    none = region_mask(valid, 0.0, g)
    assert none.sum(1).tolist() == [1, 1, 1] and not (none & ~valid).any()  # at least one, never padding
    assert region_mask(valid, 1.0, g).equal(valid)
    a = region_mask(valid, 0.15, torch.Generator().manual_seed(3))
    assert a.equal(region_mask(valid, 0.15, torch.Generator().manual_seed(3)))  # a pure function of the seed
    big = torch.ones(400, 50, dtype=torch.bool)
    rate = region_mask(big, 0.15, torch.Generator().manual_seed(1)).float().mean()
    assert abs(float(rate) - 0.15) < 0.01


def test_itm_pairs_never_pair_an_image_with_its_own_id():
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    g = torch.Generator().manual_seed(0)
    negatives = 0
    for _ in range(200):
        index, labels = draw_itm_pairs(8, ids, 0.5, g)
        assert (index[labels == 1] == torch.arange(8)[labels == 1]).all()
        assert (ids[index[labels == 0]] != ids[labels == 0]).all()
        negatives += int((labels == 0).sum())
    assert abs(negatives / 1600 - 0.5) < 0.05
    index, labels = draw_itm_pairs(3, torch.tensor([7, 7, 7]), 0.5, g)  # no other image: all positive
    assert labels.tolist() == [1, 1, 1] and index.tolist() == [0, 1, 2]


# -- task sampling ----------------------------------------------------------------------------------------------------
def test_task_distribution_follows_the_mix():
    mix = {"itm": 3.0, "mlm": 4.0, "mrfr": 2.0, "mrc_kl": 2.0}
    sampler = TaskSampler(mix, seed=42)
    n = 22000
    counts = Counter(sampler(s) for s in range(n))
    assert set(counts) == set(mix)
    for task, w in mix.items():
        p = w / 11
        assert abs(counts[task] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (task, counts[task] / n, p)


def test_task_sequence_is_a_pure_function_of_seed_and_step():
    mix = UNITERConfig().task_mix
    rank0, rank1 = TaskSampler(mix, seed=7), TaskSampler(mix, seed=7)  # two ranks build their own
    seq = [rank0(s) for s in range(300)]
    assert seq == [rank1(s) for s in range(300)]
    resumed = TaskSampler(mix, seed=7)  # a resumed run rebuilds it and continues at its global step
    assert [resumed(s) for s in range(150, 300)] == seq[150:]
    assert seq != [TaskSampler(mix, seed=8)(s) for s in range(300)]
    assert len(set(seq)) == 4


def test_a_task_without_enabled_losses_is_never_sampled():
    m = tiny(loss_weights={"itm": 1.0, "ot": 0.1, "mlm": 0.0, "mrfr": 1.0, "mrc": 0.0, "mrc_kl": 1.0})
    assert set(m.active_tasks()) == {"itm", "mrfr", "mrc_kl"}
    assert {m.task_of_step(s) for s in range(200)} == {"itm", "mrfr", "mrc_kl"}
    with pytest.raises(ValueError, match="unknown tasks"):
        UNITERConfig(task_mix={"vqa": 1.0})


@pytest.mark.parametrize("touch", [True, False])
def test_a_sampled_step_computes_one_task(touch, monkeypatch):
    m = tiny(touch_unused=touch).train()
    monkeypatch.setattr(m, "sampling", lambda: True)
    task = m.task_of_step(0)
    out = m.step(batch_of(m))
    assert set(out.losses) == set(TASK_LOSSES[task]) and out.metrics["task"] == TASKS.index(task)
    sum(out.losses.values()).backward()
    without = [n for n, p in m.named_parameters() if p.grad is None]
    assert (without == []) == touch  # the zero-weight touch gives every parameter a gradient (DDP)


def test_one_task_per_optimizer_step_under_a_trainer(tmp_path):
    """Lightning with accumulate_grad_batches=2: every micro-batch of a window runs the task of the window's optimizer
    step, as the sampler says; each micro-batch computes only that task's losses; every parameter gets a gradient."""
    import lightning as L

    m = tiny(ot_iterations=3)
    seen = []
    original = m.step

    def spy(batch):
        out = original(batch)
        seen.append((m.global_step, m.task_of_step(m.global_step), set(out.losses)))
        return out

    m.step = spy

    class NoGradMissing(L.Callback):
        def on_after_backward(self, trainer, module):
            missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing

    batches = [batch_of(m, 4, seed=i) for i in range(8)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[NoGradMissing()], default_root_dir=str(tmp_path))
    trainer.fit(m, loader)
    assert [s for s, _, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    for step, task, losses in seen:
        assert losses == set(TASK_LOSSES[task])
    assert [t for _, t, _ in seen][::2] == [m.task_sampler(s) for s in range(4)]


# -- conditional masking --------------------------------------------------------------------------------------------
def test_each_task_masks_one_modality_only():
    m = tiny().eval()
    b = batch_of(m)
    from vlp.data.visual import Visual

    visual = Visual.from_batch(b)
    clean, masked_text = Text(b["input_ids"], b["attention_mask"]), Text(b["mlm_input_ids"], b["attention_mask"])
    with torch.no_grad():
        mlm = m.task_outputs(b, "mlm")
        torch.testing.assert_close(mlm["states"], m.fuse(m.encode_image(visual), m.encode_text(masked_text)).states)
        masked = torch.zeros_like(b["region_mask"])
        masked[:, 0] = True
        for task in ("mrfr", "mrc", "mrc_kl"):
            out = m.task_outputs({**b, "region_masked": masked}, task)
            expected = m.fuse(m.encode_image(visual, masked), m.encode_text(clean)).states
            torch.testing.assert_close(out["states"], expected)
        itm = m.task_outputs({**b, "itm_labels": torch.ones(4, dtype=torch.long)}, "itm")
        torch.testing.assert_close(itm["states"], m.fuse(m.encode_image(visual), m.encode_text(clean)).states)
        # MRFR regresses the ORIGINAL features of the masked regions
        out = m.task_outputs({**b, "region_masked": masked}, "mrfr")
        expected = F.mse_loss(m.feat_regress(out["states"][:, b["input_ids"].shape[1]:][masked]),
                              b["region_features"][masked])
        torch.testing.assert_close(out["mrfr"], expected)


def test_model_draws_follow_the_run_position():
    """Model draws are a pure function of (task_seed, step, rank, call in the step, task): two fresh models (two runs,
    or a run and its resume at a window boundary) draw the same; the next call of the same step, another task or
    another task_seed draws apart."""
    a, b = tiny(), tiny()
    seeds_a = [a._generator(t).initial_seed() for t in ("mrfr", "mrfr", "itm")]
    seeds_b = [b._generator(t).initial_seed() for t in ("mrfr", "mrfr", "itm")]
    assert seeds_a == seeds_b and len(set(seeds_a)) == 3
    assert tiny(task_seed=1)._generator("mrfr").initial_seed() != seeds_a[0]
    batch = batch_of(a)
    masked = a.task_outputs(batch, "mrfr", torch.Generator().manual_seed(seeds_a[0]))["region_masked"]
    again = b.task_outputs(batch, "mrfr", torch.Generator().manual_seed(seeds_a[0]))["region_masked"]
    assert masked.equal(again) and (masked.sum(1) >= 1).all() and not (masked & ~batch["region_mask"]).any()


# -- configs ----------------------------------------------------------------------------------------------------------
def test_experiment_configs_validate_and_tiny_builds():
    from pathlib import Path

    from vlp import config
    from vlp.models import build

    root = Path(__file__).parents[1] / "experiments" / "uniter"
    paper = config.load(root / "pretrain.yaml")
    m, o, t = paper.model, paper.optim, paper.trainer
    assert (m.text.name, m.region_dim, m.region_classes, m.task_mix) == (
        "bert-base-cased", 2048, 1601, {"itm": 3.0, "mlm": 4.0, "mrfr": 2.0, "mrc_kl": 2.0})
    assert m.loss_weights["ot"] == 0.1 and m.masking.random_range == [106, 28996] and m.masking.min_masked == 1
    assert (o.lr, o.betas, o.eps, o.warmup_steps, o.schedule) == (5e-5, [0.9, 0.98], 1e-6, 10000, "linear")
    assert (t.max_steps, t.gradient_clip_val, paper.eval.first_stage) == (200000, 5.0, "all_pairs")
    tiny_cfg = config.load(root / "tiny.yaml", ["model.text.vocab_size=50"])
    assert tiny_cfg.eval.subset == 200 and tiny_cfg.data.train[0].path == "data/shards/shapes/coco/train"
    model = build(tiny_cfg.model, tiny_cfg.optim)
    assert model.encoder.depth == 4 and model.pooled_dim == 128 and model.reads == {"regions"}
    assert model.retrieval_protocol == ("all_pairs", "itm") and not model.has_contrastive_head


def test_bert_initialisation_loads_embeddings_layers_mlm_head_and_pooler(tmp_path):
    """``text.pretrained``: a BERT checkpoint (here a tiny BertForPreTraining saved locally) initialises the text
    embeddings, every layer of the single stream, the MLM head and the pooler; the region parts keep their init."""
    from transformers import BertConfig, BertForPreTraining

    from vlp.blocks.text import TextConfig

    torch.manual_seed(3)
    bert = BertForPreTraining(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=40)).eval()
    bert.save_pretrained(tmp_path / "bert")
    m = tiny(text=TextConfig(name=str(tmp_path / "bert"), pretrained=True, dropout=0.0))
    sd = bert.state_dict()
    torch.testing.assert_close(m.embeddings.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(m.encoder.layer[1].output.dense.weight, sd["bert.encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(m.mlm_head.transform.dense.weight, sd["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(m.pooler.dense.weight, sd["bert.pooler.dense.weight"])
    assert m.mlm_head.decoder.weight is m.embeddings.word_embeddings.weight
    assert m.resolved_config().text.name is None and m.resolved_config().text.vocab_size == 60


def test_grad_reduction_sum_scales_the_backward_loss_by_the_world_size():
    """optim.grad_reduction: sum -> the loss DDP averages is x world size (the official summed all-reduce); mean -> 1."""
    from types import SimpleNamespace

    from vlp.config import OptimConfig
    from vlp.models.uniter import UNITER, UNITERConfig

    for reduction, world, expect in (("mean", 4, 1.0), ("sum", 4, 4.0), ("sum", 1, 1.0)):
        m = UNITER(UNITERConfig.tiny(), OptimConfig(grad_reduction=reduction))
        assert m.grad_scale() == 1.0  # outside a Trainer
        m._trainer = SimpleNamespace(world_size=world)
        assert m.grad_scale() == expect
    with pytest.raises(ValueError, match="grad_reduction"):
        OptimConfig(grad_reduction="max")
