"""Retrieval fine-tuning: UNITER's hinge ranking loss and its candidate draws against hand-computed values, the
task's objectives composed from the shared losses (TCL's ITC + sampled ITM, MVPTR's ITC + hardest ITM, UNITER's
hinge over the hardest scored candidates), and `vlp finetune` with data.task=retrieval end to end for a pixel model
and a region model (results.json with R@K, read by `vlp compare`), with a bitwise resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from _tiny_runs import load, tiny_experiment
from vlp.losses.matching import sample_negatives, valid_negative_mask
from vlp.losses.ranking import draw_candidates, hardest_candidates, hinge_rank_loss
from vlp.models.base import Text

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# the loss and its draws


def test_hinge_rank_loss_by_hand():
    pos = torch.tensor([0.9, 0.5], requires_grad=True)
    neg = torch.tensor([[0.8, 0.1], [0.6, 0.2]], requires_grad=True)
    # terms: 0.2 + 0.8 - 0.9 = 0.1, 0.2 + 0.1 - 0.9 < 0, 0.2 + 0.6 - 0.5 = 0.3, 0.2 + 0.2 - 0.5 < 0 -> mean 0.4 / 4
    loss = hinge_rank_loss(pos, neg, margin=0.2)
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    assert torch.allclose(pos.grad, torch.tensor([-0.25, -0.25]))  # one active term per anchor, each 1/4
    assert torch.allclose(neg.grad, torch.tensor([[0.25, 0.0], [0.25, 0.0]]))
    assert hinge_rank_loss(torch.tensor([0.5]), torch.tensor([[0.1]]), margin=0.5).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"pos \[B\] and neg \[B, K\], got \(2,\), \(2,\)"):
        hinge_rank_loss(pos, pos)


def test_candidates_are_distinct_valid_uniform_and_the_hardest_are_picked():
    ids = torch.tensor([0, 1, 2, 2, 3, 4])
    valid = valid_negative_mask(6, 6, 0, ids, ids)
    picks = torch.cat([draw_candidates(valid, 3, torch.Generator().manual_seed(s)) for s in range(300)])
    assert picks.shape == (1800, 3)
    for row, cand in zip(range(6), picks.view(300, 6, 3).transpose(0, 1)):
        assert all(len(set(c.tolist())) == 3 for c in cand)  # distinct
        assert bool(valid[row][cand].all())  # never the anchor itself nor its image's other caption
        counts = torch.bincount(cand.flatten(), minlength=6)[valid[row]].float()
        assert counts.sum() == 900 and (counts - counts.mean()).abs().max() < 0.2 * counts.mean()  # uniform
    again = draw_candidates(valid, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, picks[:6])  # a pure function of the generator's seed
    with pytest.raises(ValueError, match=r"rows \[2, 3\] have fewer than 5 valid negatives \(at most 4\)"):
        draw_candidates(valid, 5)
    scores = torch.tensor([[0.1, 0.7, 0.3], [0.9, 0.2, 0.8]])
    cand = torch.tensor([[4, 5, 6], [1, 2, 3]])
    assert hardest_candidates(scores, cand, 2).tolist() == [[5, 6], [1, 3]]


# ---------------------------------------------------------------------------------------------------------------------
# the objectives, composed from the shared pieces


def _task(name: str, **objective):
    from vlp.models import _import
    from vlp.tasks.retrieval import OBJECTIVES, RetrievalTask

    cfg_cls, cls = _import(name)
    model = cls(cfg_cls.tiny())
    task = RetrievalTask(model, objective=dataclasses.replace(OBJECTIVES[name], **objective))
    return task.eval()  # no dropout: the hand computation below runs the same numbers


def _itc_by_hand(img: torch.Tensor, txt: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(i2t + t2i) / 2 with every caption of the same image a positive, from the formula."""
    logits = img @ txt.t() / temp
    targets = (ids[:, None] == ids[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    i2t = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(targets * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return (i2t + t2i) / 2


def test_tcl_objective_is_itc_plus_itm_on_sampled_hard_negatives():
    task = _task("tcl")
    m = task.model
    visual, text = m.example_inputs(6)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])  # two captions of image 2: positives of each other, never negatives
    out = task.step(visual, text, ids, torch.Generator().manual_seed(3))
    with torch.no_grad():
        img, txt = m.encode_image(visual), m.encode_text(text)
        temp = m.temp()
        itc = _itc_by_hand(img.embedding, txt.embedding, temp, ids)
        sim = img.embedding @ txt.embedding.t() / temp
        neg_img, neg_txt = sample_negatives(sim, sim.t(), "local-hard", ids, torch.Generator().manual_seed(3))
        assert not bool((ids[neg_img] == ids).any() or (ids[neg_txt] == ids).any())
        rows = torch.arange(6)
        pairs = [(rows, rows, 1), (neg_img, rows, 0), (rows, neg_txt, 0)]  # (image, text, label) blocks
        logits = torch.cat([m.match_logits(m.fuse(img.select(i), txt.select(t))) for i, t, _ in pairs])
        labels = torch.tensor([1] * 6 + [0] * 12)
        itm = F.cross_entropy(logits, labels)
    assert set(out.losses) == {"itc", "itm"}
    assert torch.allclose(out.losses["itc"], itc, atol=1e-6) and torch.allclose(out.losses["itm"], itm, atol=1e-5)


def test_mvptr_objective_is_itc_plus_itm_on_the_hardest_negatives():
    task = _task("mvptr")
    m = task.model
    visual, text = m.example_inputs(4)
    ids = torch.arange(4)
    out = task.step(visual, text, ids, torch.Generator().manual_seed(5))
    with torch.no_grad():
        img, txt = m.encode_image(visual), m.encode_text(text)
        itc = _itc_by_hand(img.embedding, txt.embedding, 1.0 / m.scale(), ids)
        sim = img.embedding @ txt.embedding.t()  # [image, text]
        off = sim - 10 * torch.eye(4)
        order = torch.randperm(4, generator=torch.Generator().manual_seed(5))
        first, rest = order[:2].tolist(), order[2:].tolist()
        # text-anchored: (text i, its most similar other image); image-anchored: (its most similar other text, image j)
        negatives = [(int(off[:, i].argmax()), i) for i in first] + [(j, int(off[j].argmax())) for j in rest]
        pairs = [(i, i) for i in range(4)] + negatives
        logits = torch.cat([m.match_logits(m.fuse(img.select(torch.tensor([i])), txt.select(torch.tensor([t]))))
                            for i, t in pairs])
        itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 4))
    assert torch.allclose(out.losses["itc"], itc, atol=1e-6) and torch.allclose(out.losses["itm"], itm, atol=1e-5)


def test_uniter_objective_is_the_hinge_over_the_hardest_scored_candidates():
    task = _task("uniter", candidates=3, hard_negatives=1)  # 4 pairs: every other image / text is a candidate
    m = task.model
    visual, text = m.example_inputs(4)
    out = task.step(visual, text, torch.arange(4), torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, txt = m.encode_image(visual), m.encode_text(text)
        s = torch.stack([torch.sigmoid(m.match_logits(m.fuse(img.select(torch.full((4,), i)),
                                                             txt.select(torch.arange(4))))[:, 1])
                         for i in range(4)])  # s[image, text]
        off = s - 10 * torch.eye(4)
        terms = []
        for i in range(4):
            terms += [(0.2 + off[:, i].max() - s[i, i]).clamp(min=0),  # text i vs its hardest image
                      (0.2 + off[i].max() - s[i, i]).clamp(min=0)]  # image i vs its hardest text
        expected = torch.stack(terms).mean()
    assert set(out.losses) == {"rank"} and expected > 0
    assert torch.allclose(out.losses["rank"], expected, atol=1e-5)


def test_itc_objective_needs_a_contrastive_head():
    from vlp.models.bridgetower import BridgeTower, BridgeTowerConfig
    from vlp.tasks.retrieval import RetrievalTask

    model = BridgeTower(BridgeTowerConfig.tiny(loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 0.0}))
    with pytest.raises(ValueError, match="no contrastive head.*model.loss_weights.itc > 0"):
        RetrievalTask(model)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def _experiment(name: str, out_dir, shards, pre, **trainer):
    """A `vlp finetune` config for ``name``'s tiny model on the world's caption shards (data.task: retrieval) in
    ``out_dir``, starting from ``pre``: a "pre-trained" checkpoint of the same architecture, written when missing."""
    from vlp import config as config_lib
    from vlp.models import build
    from vlp.models.loading import save
    from vlp.train import resolve

    path = tiny_experiment(name, out_dir, shards, checkpoint_every_n_steps=2, **trainer)
    exp = yaml.safe_load(path.read_text())
    exp["data"]["task"] = "retrieval"
    exp["name"] = f"{name}-retrieval"
    if not pre.exists():
        cfg, _ = resolve(config_lib.load(path))  # the pre-training config of the same model
        save(build(cfg.model), pre, global_step=12)
    exp["ckpt"] = str(pre)
    path.write_text(yaml.safe_dump(exp))
    return path, out_dir / exp["name"]


def _check_results(run, name: str, steps: int) -> None:
    """results.json holds R@K by the model's protocol at ``steps``, and `vlp compare` shows it as a retrieval run."""
    from vlp.compare import load_run

    res = json.loads((run / "results.json").read_text())
    assert res["step"] == steps and res["model"] == name and res["retrieval_init"].endswith(f"{name}-pre.ckpt")
    assert set(res["retrieval"]) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"}
    assert all(0.0 <= v <= 100.0 for v in res["retrieval"].values())
    assert res["retrieval_protocol"] == {"tcl": "contrastive+itm", "uniter": "all_pairs+itm"}[name]
    assert res["retrieval_objective"]["loss"] == {"tcl": "itc_itm", "uniter": "hinge"}[name]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/lr", *({"tcl": ["train/itc", "train/itm"], "uniter": ["train/rank"]}[name])} \
        <= set(header)
    shown = load_run(run)
    assert shown.task == "retrieval" and shown.retrieval["img_r1"] == res["retrieval"]["img_r1"]


def test_finetune_retrieval_of_a_region_model_writes_recall(shapes_shards, tmp_path, capsys):
    from vlp.cli import main

    path, run = _experiment("uniter", tmp_path, shapes_shards, tmp_path / "uniter-pre.ckpt", max_steps=3)
    assert main(["finetune", str(path)]) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and "newly initialised: nothing" in out
    assert "frozen (not used by retrieval): " in out and "mlm_head" in out
    _check_results(run, "uniter", 3)


def test_finetune_retrieval_of_a_pixel_model_writes_recall_and_resumes_bitwise(shapes_shards, tmp_path, capsys):
    from vlp.cli import main

    pre = tmp_path / "tcl-pre.ckpt"  # both runs start from the same weights
    straight, run_a = _experiment("tcl", tmp_path / "a", shapes_shards, pre, max_steps=4)
    assert main(["finetune", str(straight)]) == 0
    assert "newly initialised: nothing" in capsys.readouterr().out
    _check_results(run_a, "tcl", 4)
    stopped, run_b = _experiment("tcl", tmp_path / "b", shapes_shards, pre, max_steps=2)
    assert main(["finetune", str(stopped)]) == 0
    assert main(["finetune", str(stopped), "trainer.max_steps=4", f"ckpt={tmp_path / 'gone.ckpt'}"]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = load(run_a / "checkpoints/last.ckpt"), load(run_b / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    _check_results(run_b, "tcl", 4)


def test_finetune_retrieval_overrides_the_paper_objective_field_by_field():
    from vlp import config as config_lib
    from vlp.config import ConfigError
    from vlp.tasks.retrieval import OBJECTIVES, objective_for

    path = "experiments/finetune/retrieval_tcl_tiny.yaml"
    assert objective_for(config_lib.load(path)) == OBJECTIVES["tcl"]
    chosen = objective_for(config_lib.load(path, ["finetune.retrieval.loss=hinge", "finetune.retrieval.margin=0.5"]))
    assert (chosen.loss, chosen.margin, chosen.itm_negatives, chosen.candidates) == ("hinge", 0.5, "local-hard", 7)
    mvptr = objective_for(config_lib.load("experiments/finetune/retrieval_mvptr_tiny.yaml",
                                          ["finetune.retrieval.itm_negatives=local-hard"]))
    assert (mvptr.loss, mvptr.itm_negatives) == ("itc_itm", "local-hard")
    with pytest.raises(ConfigError, match=r"finetune.retrieval: .*itm_negatives must be one of local-hard, hardest, "
                                          r"got 'hard'"):
        objective_for(config_lib.load(path, ["finetune.retrieval.itm_negatives=hard"]))
    with pytest.raises(ConfigError, match=r"finetune.retrieval: .*need 1 <= hard_negatives \(9\) <= candidates \(7\)"):
        objective_for(config_lib.load(path, ["finetune.retrieval.hard_negatives=9"]))
