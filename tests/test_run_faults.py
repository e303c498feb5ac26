"""Checkpoints a run can trust and losses that go non-finite (vlp.resume, vlp.utils.nonfinite), through ``vlp.cli``:

* ``last.ckpt`` holds the final step even when ``max_steps`` is no multiple of the checkpoint cadence; re-running a
  finished run says so and changes nothing; raising ``max_steps`` continues it exactly as a longer run would have;
* a damaged newest checkpoint is moved aside with a warning naming it and the next intact one is used;
* a resume whose config changes the model or the data fails before anything is written, naming the keys; safe
  changes (``RESUME_SAFE``) go through;
* ``trainer.nonfinite=stop`` stops with one line naming the step and the terms, ``skip`` drops the update and counts
  it, and no checkpoint ever holds non-finite weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from _tiny_runs import compare_runs, load, max_abs_diff, metrics_rows, tiny_experiment
from vlp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def exp(shapes_shards, tmp_path) -> Path:
    return tiny_experiment("tcl", tmp_path, shapes_shards)


def pretrain(exp: Path, *overrides: str) -> int:
    return main(["pretrain", str(exp), *overrides, "--no-eval"])


def snapshot(run: Path) -> dict:
    """Every file of a run directory with its bytes and mtime."""
    return {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# -- (a) the final step is in last.ckpt; a finished run is left alone ------------------------------------------------
def test_last_ckpt_holds_the_final_step_and_a_finished_run_is_left_alone(exp, tmp_path, capsys):
    run = tmp_path / "tcl"
    assert pretrain(exp, "trainer.max_steps=7", "optim.schedule=constant") == 0
    assert ckpt_names(run) == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt", "step0000007.ckpt"]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert sorted(metrics_rows(run)) == list(range(7))
    capsys.readouterr()

    before = snapshot(run)
    assert pretrain(exp, "trainer.max_steps=7", "optim.schedule=constant") == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "step 7" in out and "nothing to do" in out
    assert snapshot(run) == before, "a re-run of a finished run changed its directory"

    # Killed during (here: never run) its final evaluation: a re-run with evaluation only evaluates, once.
    assert main(["pretrain", str(exp), "trainer.max_steps=7", "optim.schedule=constant"]) == 0
    assert "evaluating its final checkpoint" in capsys.readouterr().out
    import json

    assert json.loads((run / "results.json").read_text())["step"] == 7
    before = snapshot(run)
    assert main(["pretrain", str(exp), "trainer.max_steps=7", "optim.schedule=constant"]) == 0
    assert "nothing to do" in capsys.readouterr().out and snapshot(run) == before

    # More steps (an allowed change) continue from the final checkpoint exactly as an uninterrupted longer run: the
    # final save has the loop state of a periodic one. (A constant schedule: the lr does not depend on max_steps.)
    assert pretrain(exp, "trainer.max_steps=10", "optim.schedule=constant") == 0
    assert pretrain(exp, "trainer.max_steps=10", "optim.schedule=constant", "name=straight") == 0
    res = compare_runs(run, tmp_path / "straight")
    assert res["steps"] == (10, 10)
    for part in ("state_dict", "optimizer_states"):
        assert not res[part][2], (part, res[part][0], res[part][2][:5])
    assert res["metrics_steps"] == (list(range(10)),) * 2 and not res["metrics_differ"]


def test_an_epoch_based_run_is_finished_too(exp, tmp_path, capsys):
    run = tmp_path / "tcl"
    # 96 training images / batch 8 = 12 steps per epoch; the last one is also a checkpoint step (every 3)
    assert pretrain(exp, "trainer.max_steps=-1", "trainer.max_epochs=1") == 0
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 12 and last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    capsys.readouterr()
    before = snapshot(run)
    assert pretrain(exp, "trainer.max_steps=-1", "trainer.max_epochs=1") == 0
    assert "already finished" in capsys.readouterr().out and snapshot(run) == before


# -- (b) a damaged checkpoint is set aside ---------------------------------------------------------------------------
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_next_intact_one_used(exp, tmp_path, capsys, caplog):
    run = tmp_path / "tcl"
    assert pretrain(exp, "trainer.max_steps=6") == 0
    last, step6 = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step0000006.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # truncated (an interrupted copy)
    step6.write_bytes(b"")  # empty
    capsys.readouterr()
    assert pretrain(exp, "trainer.max_steps=8") == 0
    out = capsys.readouterr().out
    warned = caplog.text
    for bad, problem in ((last, "truncated or corrupt"), (step6, "empty file")):
        assert str(bad) in warned and problem in warned and f"{bad.name}.corrupt" in warned
        assert bad.with_name(bad.name + ".corrupt").is_file()
    assert f"resuming from {run / 'checkpoints' / 'step0000003.ckpt'}" in out
    assert load(last)["global_step"] == 8
    assert sorted(metrics_rows(run)) == list(range(8))  # steps 3-5 logged once, from the resumed run

    # Nothing intact left: a fresh start (with the warnings), metrics.csv trimmed to the new run's rows.
    for p in (run / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"junk")
    caplog.clear()
    assert pretrain(exp, "trainer.max_steps=2") == 0
    assert "resuming from" not in capsys.readouterr().out
    assert "unusable" in caplog.text
    assert sorted(metrics_rows(run)) == [0, 1] and load(last)["global_step"] == 2


# -- (c) a changed config --------------------------------------------------------------------------------------------
def test_a_resume_that_changes_the_model_or_data_fails_before_writing_anything(exp, tmp_path, capsys, caplog):
    run = tmp_path / "tcl"
    assert pretrain(exp, "trainer.max_steps=3") == 0
    before = snapshot(run)
    capsys.readouterr()
    assert pretrain(exp, "trainer.max_steps=6", "model.embed_dim=8", "data.batch_size=4", "optim.lr=0.01") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error:"), err
    assert "data.batch_size, model.embed_dim, optim.lr" in err[0] and "Nothing was written" in err[0]
    assert "model.embed_dim: 16 -> 8" in err[0]
    assert snapshot(run) == before

    # Safe changes: more steps, evaluation settings, loader workers, logging cadence, the non-finite policy.
    assert pretrain(exp, "trainer.max_steps=5", "eval.k_test=2", "data.num_workers=1", "trainer.nonfinite=skip",
                     "trainer.log_every_n_steps=2") == 0
    assert "resuming from" in capsys.readouterr().out
    for key in ("trainer.max_steps", "eval.k_test", "data.num_workers", "trainer.nonfinite"):
        assert key in caplog.text
    from vlp import config as config_lib

    saved = config_lib.load(run / "config.yaml")
    assert saved.trainer.max_steps == 5 and saved.eval.k_test == 2 and saved.trainer.nonfinite == "skip"
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_resume_config_rule():
    from vlp.config import ExperimentConfig, TrainerConfig
    from vlp.resume import RESUME_SAFE, ResumeConfigError, changed_keys, check_resume_config

    a = ExperimentConfig()
    b = ExperimentConfig(trainer=TrainerConfig(max_steps=10, devices=2), output_dir="/elsewhere")
    assert changed_keys(a, b) == ["output_dir", "trainer.devices", "trainer.max_steps"]
    assert check_resume_config(a, b, Path("run/config.yaml")) == ["output_dir", "trainer.devices", "trainer.max_steps"]
    c = ExperimentConfig(seed=1, trainer=TrainerConfig(precision="bf16-mixed", max_steps=10))
    with pytest.raises(ResumeConfigError) as e:
        check_resume_config(a, c, Path("run/config.yaml"))
    assert e.value.keys == ["seed", "trainer.precision"]
    assert "trainer.accumulate_grad_batches" not in RESUME_SAFE and "eval." in RESUME_SAFE


# -- non-finite losses -----------------------------------------------------------------------------------------------
def finite_checkpoints(run: Path) -> dict[str, int]:
    """{file: step} of every checkpoint, each checked to hold only finite floating tensors."""
    out = {}
    for p in sorted((run / "checkpoints").glob("*.ckpt")):
        ckpt = load(p)
        for name, t in ckpt["state_dict"].items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (p.name, name)
        out[p.name] = ckpt["global_step"]
    return out


def test_huge_lr_stop_names_the_step_and_the_terms_and_writes_no_bad_checkpoint(exp, tmp_path, capsys):
    run = tmp_path / "tcl"
    rc = pretrain(exp, "optim.lr=1e30", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    line = lines[0]
    # warm-up from lr 0: step 0 changes nothing, step 1 applies lr 5e29, step 2's loss is the first non-finite one
    assert line.startswith("error: step 2: non-finite loss: train/loss=") and "train/ita" in line, line
    assert "trainer.nonfinite=skip" in line
    steps = finite_checkpoints(run)
    assert max(steps.values()) == 2 and "last.ckpt" in steps  # written after steps 0 and 1, never after step 2


def test_huge_lr_skip_drops_every_bad_update_and_counts_it(exp, tmp_path, capsys):
    # With TCL's feature queue the first bad forward enqueues NaN features, which no skip can undo: it stops.
    assert pretrain(exp, "optim.lr=1e30", "trainer.max_steps=6", "trainer.nonfinite=skip", "name=queued",
                    "trainer.checkpoint_every_n_steps=1") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: step 2: non-finite loss, update skipped"), lines
    assert "queue.image_queue" in lines[0]
    assert max(finite_checkpoints(tmp_path / "queued").values()) == 2

    run = tmp_path / "tcl"
    assert pretrain(exp, "optim.lr=1e30", "trainer.max_steps=6", "trainer.nonfinite=skip", "model.queue_size=0",
                    "trainer.checkpoint_every_n_steps=1") == 0
    rows = metrics_rows(run)
    counts = [float(rows[s]["train/skipped_nonfinite"]) for s in range(6)]
    assert counts == [0, 0, 1, 2, 3, 4], counts
    steps = finite_checkpoints(run)
    assert steps["last.ckpt"] == 6
    # no update after step 1: the weights and AdamW's moments of checkpoints 2..6 are those of checkpoint 2 (but for
    # what TCL's forward changes by itself: the EMA twins, and the temperature it clamps into [0.001, 0.5])
    ref = load(run / "checkpoints" / "step0000002.ckpt")
    last = load(run / "checkpoints" / "last.ckpt")
    online = [k for k in ref["state_dict"] if not k.startswith(("momentum.", "queue.", "temp."))]
    assert all(torch.equal(ref["state_dict"][k], last["state_dict"][k]) for k in online)
    for i, st in ref["optimizer_states"][0]["state"].items():
        assert torch.equal(st["exp_avg"], last["optimizer_states"][0]["state"][i]["exp_avg"])
    assert last["callbacks"]["NonFiniteGuard"] == {"skipped": 4}


@pytest.fixture
def nan_itm_at_step(monkeypatch):
    """Make TCL's ITM loss NaN at the given optimizer step (in this process)."""
    from vlp.models.tcl import TCL

    original = TCL.step

    def install(at: int):
        def step(self, batch):
            out = original(self, batch)
            if self.global_step == at:
                out.losses["itm"] = out.losses["itm"] * float("nan")
            return out

        monkeypatch.setattr(TCL, "step", step)

    return install


def test_a_nan_term_at_a_chosen_step_stop(exp, tmp_path, capsys, nan_itm_at_step):
    nan_itm_at_step(4)
    assert pretrain(exp, "trainer.max_steps=8") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: step 4: non-finite loss: train/loss=nan"), lines
    assert "train/itm=nan" in lines[0] and "train/mlm" not in lines[0]
    assert finite_checkpoints(tmp_path / "tcl") == {"last.ckpt": 3, "step0000003.ckpt": 3}


def test_a_nan_term_at_a_chosen_step_skip(exp, tmp_path, nan_itm_at_step):
    run = tmp_path / "tcl"
    nan_itm_at_step(4)
    assert pretrain(exp, "trainer.max_steps=6", "trainer.nonfinite=skip", "trainer.checkpoint_every_n_steps=1") == 0
    rows = metrics_rows(run)
    assert [float(rows[s]["train/skipped_nonfinite"]) for s in range(6)] == [0, 0, 0, 0, 1, 1]
    assert math.isnan(float(rows[4]["train/itm"])) and math.isfinite(float(rows[5]["train/loss"]))
    before, after = load(run / "checkpoints" / "step0000004.ckpt"), load(run / "checkpoints" / "step0000005.ckpt")
    online = [k for k in before["state_dict"] if not k.startswith(("momentum.", "queue."))]
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in online)
    # AdamW's moments and step counts did not move (the schedule's lr in param_groups did: the step still counts)
    assert max_abs_diff(before["optimizer_states"][0]["state"], after["optimizer_states"][0]["state"])[2] == []
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_step_seeds_are_a_pure_function_of_seed_step_rank_and_micro_batch():
    from vlp.utils.rng import seed_all, step_seed

    seeds = {step_seed(0, s, r, m) for s in range(50) for r in range(4) for m in range(3)}
    assert len(seeds) == 600 and step_seed(0, 7, 1, 2) == step_seed(0, 7, 1, 2) != step_seed(1, 7, 1, 2)
    seed_all(step_seed(0, 3, 0))
    a = torch.rand(4), torch.nn.functional.dropout(torch.ones(8), 0.5)
    torch.rand(100)  # whatever ran before
    seed_all(step_seed(0, 3, 0))
    b = torch.rand(4), torch.nn.functional.dropout(torch.ones(8), 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
