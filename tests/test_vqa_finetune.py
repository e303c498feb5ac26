"""VQA fine-tuning: the question-level data pipeline (soft targets, one question per image visit, every question in
evaluation), VQATask (learns a fixed batch; loads a pre-training checkpoint with only the head new) and
`vlp finetune` end to end on a small shapes world, with a resume."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from _resume_shards import jpeg
from vlp.data.collate import Collator, SampleProcessor
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
from vlp.data.stream import CorruptSample
from vlp.data.transforms import ImageTransform

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "experiments/finetune/vqa_bridgetower_tiny.yaml"

TINY = [  # BridgeTower small enough for seconds of training
    "model.vision.img_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=2",
    "model.vision.heads=2", "model.text.hidden=32", "model.text.layers=2", "model.text.heads=2",
    "model.text.intermediate=64", "model.hidden=32", "model.cross_heads=2", "model.cross_intermediate=64",
    "model.itc_embed_dim=16", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=4",
    "data.num_workers=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "trainer.checkpoint_every_n_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(shapes_shards):
    return shapes_shards


def data_args(shards: Path) -> list[str]:
    return [f"data.train=[{{path: {shards}/vqa/train, weight: 4.88}}]", f"data.val={shards}/vqa/val",
            f"data.test={shards}/vqa/test"]


def shard_questions(shard_dir: Path) -> list[dict]:
    """Every question of a shard directory, read straight from the tar files."""
    out = []
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out += json.load(tf.extractfile(m))["questions"]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# data


def _q(qid, labels, scores, answered=True, text="what color is the square?"):
    return {"question_id": qid, "question": text, "labels": labels, "scores": scores, "answered": answered}


def test_collator_soft_targets_and_question_rows(world):
    tok = ShardDataModule(ShardsDataConfig(test=str(world / "vqa/test"), task="vqa")).tokenizer
    collate = Collator(tok, max_text_len=16, num_answers=6)
    img = lambda v: torch.full((3, 4, 4), float(v))  # noqa: E731
    samples = [
        {"key": "a", "image": img(1), "image_id": 7, "questions": [_q(10, [2, 0], [1.0, 0.3])]},
        {"key": "b", "image": img(2), "image_id": 8, "questions": [_q(20, [], [], answered=False),
                                                                   _q(21, [5, 3, 1], [0.6, 0.9, 0.3])]},
    ]
    b = collate(samples)
    expected = torch.tensor([[0.3, 0.0, 1.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.3, 0.0, 0.9, 0.0, 0.6]])
    assert torch.equal(b["vqa_targets"], expected) and b["vqa_targets"].dtype == torch.float32
    assert b["question_image"].tolist() == [0, 1, 1] and b["question_ids"].tolist() == [10, 20, 21]
    assert b["vqa_answered"].tolist() == [True, False, True]
    assert b["image"].shape == (2, 3, 4, 4) and b["image_ids"].tolist() == [7, 8] and b["keys"] == ["a", "b"]
    assert b["input_ids"].shape[0] == b["attention_mask"].shape[0] == 3
    assert tok.decode(b["input_ids"][0], skip_special_tokens=True).replace(" ", "") == "whatcoloristhesquare?"
    assert "mlm_input_ids" not in b


def _raw(key: str, questions: list[dict]) -> dict:
    info = {"image_id": int(key.split("-")[1]), "captions": [], "questions": questions}
    return {"__key__": key, "jpg": jpeg(1, 16), "json": json.dumps(info).encode()}


def _shard_q(qid, labels=(1,), scores=(1.0,)):
    return {"question_id": qid, "question": f"question {qid}?", "answers": [{"answer": "x", "count": 10}],
            "labels": list(labels), "scores": list(scores)}


def test_one_question_per_visit_is_deterministic_and_covers_all_questions():
    qs = [_shard_q(100 + i) for i in range(5)]
    raw = _raw("vqa-1", qs)
    make = lambda seed=3: SampleProcessor(ImageTransform(16), seed=seed, task="vqa", num_answers=4)  # noqa: E731
    proc = make()

    def picks(p, epochs, passes=1):
        return [p(dict(raw), {"epoch": e, "cycle": c, "passes": passes})["questions"][0]["question_id"]
                for e in epochs for c in range(passes)]

    first = picks(proc, range(20))
    assert first == picks(make(), range(20))  # a pure function of (seed, key, epoch, cycle)
    rounds = [first[i: i + 5] for i in range(0, 20, 5)]
    assert all(sorted(r) == [100, 101, 102, 103, 104] for r in rounds)  # every 5 visits: each question once
    assert len({tuple(r) for r in rounds}) > 1  # in a fresh order each round
    # weight = questions per image: the cycles of one epoch use each question once
    assert sorted(picks(proc, [0], passes=5)) == sorted(picks(proc, [1], passes=5)) == [100, 101, 102, 103, 104]
    sample = proc(dict(raw), {"epoch": 0})
    assert len(sample["questions"]) == 1 and sample["questions"][0]["scores"] == [1.0]
    every = SampleProcessor(ImageTransform(16), task="vqa", num_answers=4, all_questions=True)(dict(raw), {})
    assert [q["question_id"] for q in every["questions"]] == [100, 101, 102, 103, 104]
    with pytest.raises(CorruptSample, match="outside the answer vocabulary"):
        proc(_raw("vqa-2", [_shard_q(1, labels=[4])]), {})
    with pytest.raises(CorruptSample, match="questions"):
        proc(_raw("vqa-3", []), {})


def test_training_stream_visits_each_image_once_per_pass_with_one_question(world):
    dm = ShardDataModule(ShardsDataConfig(train=[SourceConfig(str(world / "vqa/train"))], task="vqa", batch_size=8,
                                          image_size=32))
    stream = dm.build_train_stream()
    stream.set_epoch(0)
    batches = list(stream)
    assert dm.num_answers == 20
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 96  # one pass over the images
    for b in batches:
        assert b["input_ids"].shape[0] == b["image"].shape[0] == 8 and b["vqa_targets"].shape == (8, 20)
        assert torch.equal(b["question_image"], torch.arange(8))
        assert torch.allclose(b["vqa_targets"].sum(1), torch.ones(8))  # the shapes world: one answer, score 1



def test_eval_reader_yields_every_question_exactly_once(world):
    dm = ShardDataModule(ShardsDataConfig(val=str(world / "vqa/val"), test=str(world / "vqa/test"), task="vqa",
                                          eval_batch_size=3, image_size=32))
    for split in ("val", "test"):
        truth = {q["question_id"]: q for q in shard_questions(world / "vqa" / split)}
        seen = Counter()
        for b in dm.eval_dataloader(split):
            assert b["question_image"].max() < b["image"].shape[0] <= 3
            for qid, row in zip(b["question_ids"].tolist(), b["vqa_targets"]):
                seen[qid] += 1
                want = torch.zeros(20)
                want[truth[qid]["labels"]] = torch.tensor(truth[qid]["scores"])
                assert torch.equal(row, want)
        assert set(seen) == set(truth) and set(seen.values()) == {1}, split


# ---------------------------------------------------------------------------------------------------------------------
# the task


def _tiny_bridgetower(num_answers: int, itc: float = 0.0):
    from vlp.models.bridgetower import BridgeTower, BridgeTowerConfig

    cfg = BridgeTowerConfig(num_answers=num_answers, loss_weights={"mlm": 1.0, "itm": 1.0, "itc": itc})
    return BridgeTower(cfg)


def test_vqa_task_learns_a_fixed_batch():
    from vlp.config import OptimConfig
    from vlp.tasks.vqa import VQATask

    torch.manual_seed(0)
    task = VQATask(_tiny_bridgetower(6), OptimConfig(lr=1e-3, weight_decay=0.0, schedule="constant",
                                                     lr_mult={"vqa_head": 5.0}))
    frozen = task.freeze_unused()
    assert frozen and all(n.startswith(("mlm_head.", "itm_head.")) for n in frozen)
    task.total_steps = 60
    opt = task.configure_optimizers()["optimizer"]
    assert {g["lr"] for g in opt.param_groups} == {1e-3, 5e-3}
    n = 8
    targets = torch.zeros(n, 6)
    targets[torch.arange(n), torch.arange(n) % 6] = 1.0
    targets[0, 3] = 0.3
    batch = {"image": torch.randn(n, 3, 32, 32), "input_ids": torch.randint(3, 100, (n, 6)),
             "attention_mask": torch.ones(n, 6, dtype=torch.long), "vqa_targets": targets,
             "question_image": torch.arange(n)}
    losses = []
    for _ in range(60):
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    task.eval()
    with torch.no_grad():
        from vlp.eval.vqa import vqa_score

        logits = task.answer_logits(batch)
        before = vqa_score(torch.zeros_like(logits), targets)
        score = vqa_score(logits, targets)
    assert losses[-1] < 0.25 * losses[0]
    assert score == 100.0 and before < 50.0


def test_loading_a_pretraining_checkpoint_reports_only_the_head_as_new(tmp_path):
    from vlp.models.loading import save
    from vlp.tasks.common import load_pretrained as load_any
    from vlp.tasks.vqa import HEAD_PREFIX

    def load_pretrained(*args, **kwargs):  # the VQA head is the task's new weights
        return load_any(*args, new_prefixes=(HEAD_PREFIX,), **kwargs)

    torch.manual_seed(1)
    pre = _tiny_bridgetower(0, itc=1.0)  # pre-training: with ITC heads, no VQA head
    path = save(pre, tmp_path / "pre.ckpt", global_step=600)
    model = _tiny_bridgetower(7)
    report = load_pretrained(model, path)
    assert report.new and all(k.startswith("vqa_head.") for k in report.new)
    assert report.missing == [] and report.step == 600
    assert report.unexpected and all(k.startswith("itc_") for k in report.unexpected)
    pre_state, state = pre.state_dict(), model.state_dict()
    assert set(report.loaded) == set(state) - set(report.new)
    assert all(torch.equal(state[k], pre_state[k]) for k in report.loaded)
    assert "newly initialised: vqa_head.0.* (2), vqa_head.1.* (2), vqa_head.3.* (2)" in report.summary()

    # A checkpoint lacking weights besides the head is refused (strict) or loaded with a warning.
    sd = torch.load(path, weights_only=True)
    del sd["state_dict"]["cross_modal_text_pooler.dense.weight"]
    torch.save(sd, tmp_path / "partial.ckpt")
    with pytest.raises(KeyError, match="cross_modal_text_pooler"):
        load_pretrained(_tiny_bridgetower(7), tmp_path / "partial.ckpt")
    with pytest.warns(UserWarning, match="cross_modal_text_pooler"):
        load_pretrained(_tiny_bridgetower(7), tmp_path / "partial.ckpt", strict=False)
    # Another architecture: the error names the config fields that differ.
    from vlp.models.bridgetower import BridgeTower, BridgeTowerConfig

    other = BridgeTower(BridgeTowerConfig(num_answers=7, cross_intermediate=96))
    with pytest.raises(RuntimeError, match="cross_intermediate"):
        load_pretrained(other, path)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def test_finetune_cli_end_to_end_and_resume(world, tmp_path, capsys):
    from vlp import config as config_lib
    from vlp.cli import main
    from vlp.models import build
    from vlp.models.loading import save
    from vlp.tasks import vqa
    from vlp.train import resolve

    common = [*TINY, *data_args(world), f"output_dir={tmp_path}", "name=vqa", "trainer.val_check_interval=2"]
    # a "pre-training checkpoint" of the same architecture (with its ITC heads)
    cfg, dm = resolve(config_lib.load(TINY_YAML, common))
    cfg = vqa.prepare(cfg, dm)
    assert cfg.model.num_answers == 20
    pre = build(dataclasses.replace(cfg.model, num_answers=0, loss_weights={"mlm": 1.0, "itm": 1.0, "itc": 1.0}))
    ckpt = save(pre, tmp_path / "pre.ckpt")

    assert main(["finetune", str(TINY_YAML), *common, f"ckpt={ckpt}", "trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {ckpt}" in out and "newly initialised: vqa_head" in out
    assert "not used by this task (dropped): itc_" in out
    run = tmp_path / "vqa"
    for f in ("config.yaml", "metrics.csv", "loss.png", "checkpoints/last.ckpt", "results.json",
              "vqa_test_predictions.json"):
        assert (run / f).is_file(), f
    res = json.loads((run / "results.json").read_text())["vqa"]
    n_test = len(shard_questions(world / "vqa/test"))
    assert res["split"] == "test" and res["step"] == 4 and res["questions"] == res["answered"] == n_test
    assert 0.0 <= res["score"] <= 100.0
    preds = json.loads((run / "vqa_test_predictions.json").read_text())
    answers = json.loads((world / "vqa/answers.json").read_text())
    assert len(preds) == n_test and all(p["answer"] in answers for p in preds)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/vqa_score", "train/lr", "val/vqa_score", "test/vqa_score"} <= set(header)
    assert config_lib.load(run / "config.yaml").model.num_answers == 20

    # the same command with a larger budget resumes from the run's checkpoint (ckpt is not re-read)
    assert main(["finetune", str(TINY_YAML), *common, f"ckpt={tmp_path / 'gone.ckpt'}", "trainer.max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints'}" in out and "initialised from" not in out
    resumed = json.loads((run / "results.json").read_text())["vqa"]
    assert resumed["step"] == 6 and resumed["init"] == str(ckpt)  # the weights it started from, not the resume's ckpt=


def test_finetune_without_ckpt_is_a_clear_error(world, tmp_path, capsys):
    from vlp.cli import main

    args = ["finetune", str(TINY_YAML), *TINY, *data_args(world), f"output_dir={tmp_path}", "trainer.max_steps=1"]
    assert main([*args, "ckpt=null"]) == 2
    assert "ckpt=PATH" in capsys.readouterr().err
    assert main([*args, f"ckpt={tmp_path / 'missing.ckpt'}"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
