"""What a run records about itself and what is rendered from it: the training cost in results.json (wall time summed
over resumed segments), the command that made the run, the end-of-command summary, the run-long progress bar,
`trainer.logger`, and `make report`'s README table (rows merged by run, markers required, atomic rewrite)."""

import json
from pathlib import Path

import pytest
import yaml

from vlp import report
from vlp.eval.results import run_command, run_summary, training_record, write_results

RETRIEVAL = {"txt_r1": 33.33, "txt_r5": 81.7, "txt_r10": 89.5, "img_r1": 34.1, "img_r5": 86.26, "img_r10": 95.6,
             "r_mean": 70.1}


def make_run(root: Path, name: str, *, protocol="contrastive+itm", command="make pretrain-tcl", batch=64,
             accumulate=1, k_test=16) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": name.split("/")[-1], "model": {"name": "tcl"}, "data": {"batch_size": batch},
        "trainer": {"accumulate_grad_batches": accumulate}, "eval": {"k_test": k_test}}))
    write_results(run, {"retrieval": RETRIEVAL, "retrieval_protocol": protocol, "retrieval_images": 1000,
                        "retrieval_split": "test",
                        "train": training_record(488.0, 600, 1_790_000, 64 * accumulate), "command": command},
                  model="tcl", step=600)
    return run


def test_training_record_by_hand():
    # 600 steps x 64 samples in 120.04 s: 38,400 / 120.04 = 319.89 samples/s
    assert training_record(120.04, 600, 1234, 64) == {"wall_seconds": 120.0, "steps": 600, "parameters": 1234,
                                                      "samples_per_s": 319.9}
    assert training_record(0.0, 0, 10, 64)["samples_per_s"] is None


def test_run_command_names_make_then_vlp_then_nothing():
    assert run_command({"VLP_COMMAND": "make ablate-tcl ABLATE_STEPS=3"}, ["/x/bin/vlp", "pretrain"]) == \
        "make ablate-tcl ABLATE_STEPS=3"
    assert run_command({}, ["/x/.venv/bin/vlp", "pretrain", "a.yaml", "data.train=[{path: d}]"]) == \
        "vlp pretrain a.yaml 'data.train=[{path: d}]'"
    assert run_command({}, ["/r/vlp/__main__.py", "finetune", "f.yaml"]) == "vlp finetune f.yaml"
    assert run_command({}, ["/usr/bin/pytest", "-q"]) is None  # a library call: nothing to record


def test_summary_names_the_run_its_cost_and_headline(tmp_path):
    run = make_run(tmp_path, "tcl-tiny")
    assert run_summary(run, "tcl-tiny").splitlines() == [
        f"== tcl-tiny: {run}",
        "   trained 600 steps in 8 min 8 s (78.7 samples/s)",  # 600 x 64 / 488 s
        "   retrieval R@1/5/10  TR 33.3 / 81.7 / 89.5  IR 34.1 / 86.3 / 95.6  (contrastive+itm, 1000 images, step 600)",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_summary(empty).splitlines()[1] == ("   no results yet (results.json holds no training record or "
                                                  "evaluation)")


def test_compare_shows_the_recorded_wall_time(tmp_path):
    from vlp.compare import load_run

    run = load_run(make_run(tmp_path, "tcl-tiny"))
    assert (run.wall_s, run.params, run.samples_per_s) == (488.0, 1_790_000, 78.7)


def test_training_clock_adds_up_resumed_segments(tmp_path):
    """Lightning's own checkpoint carries the clock: the resumed segment goes on from the seconds of the first (and
    the run-long progress bar starts at the resumed step, its total the run's steps)."""
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    from vlp.train import TrainingClock, _run_progress_bar

    def trainer(steps, *callbacks):
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=list(callbacks), enable_progress_bar=True)

    first = TrainingClock()
    t1 = trainer(3, first)
    model = BoringModel()
    model.total_steps = 5
    t1.fit(model)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)["callbacks"]["TrainingClock"]["seconds"]
    assert saved == pytest.approx(first.seconds) and saved > 0

    second, bar = TrainingClock(), _run_progress_bar()
    t2 = trainer(5, second, bar)
    t2.fit(model, ckpt_path=tmp_path / "a.ckpt", weights_only=True)
    assert second.before == saved
    assert second.seconds == pytest.approx(saved + (second._stop - second._start))
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 5, 5)


def test_logger_config_and_a_missing_tensorboard(monkeypatch, tmp_path):
    import importlib.util

    from vlp import config as config_lib
    from vlp.train import _tensorboard_logger

    base = Path(__file__).resolve().parents[1] / "experiments/tcl/tiny.yaml"
    assert config_lib.load(base, ["trainer.logger=[csv,tensorboard]"]).trainer.logger == ["csv", "tensorboard"]
    for bad in ("[tensorboard]", "[csv,wandb]"):
        with pytest.raises(config_lib.ConfigError, match=r"trainer.logger must list csv and optionally tensorboard"):
            config_lib.load(base, [f"trainer.logger={bad}"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(config_lib.ConfigError) as e:
        _tensorboard_logger(tmp_path)
    assert str(e.value) == ("trainer.logger lists tensorboard, but neither the tensorboard nor the tensorboardX "
                            "package is installed; pip install tensorboard, or set trainer.logger=[csv]")


README = """# title

intro
<!-- results:begin -->
| run | made by | steps × batch | wall | protocol | TR@1 / 5 / 10 | IR@1 / 5 / 10 |
|---|---|---|---|---|---|---|
| `tcl-tiny` (old) | `make pretrain-tcl` | 600 × 64 | 8 min 8 s¹ | ITC top-16 → ITM | 1.0 / 2.0 / 3.0 | 1 / 2 / 3 |
| `uniter-tiny` (kept) | `make pretrain-uniter` | 1500 × 64 | 4 min 12 s | ITM over all pairs | 70.5 / 98.0 | 70.0 |
<!-- results:end -->

¹ a footnote
"""


def test_report_replaces_rows_by_run_keeps_the_rest_and_appends_new(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "tcl-tiny")
    make_run(runs, "ablate-tcl/albef-tiny", command="make ablate-tcl", protocol="all_pairs+itm", batch=32,
             accumulate=2)
    (runs / "bridgetower-tiny-vqa").mkdir()
    write_results(runs / "bridgetower-tiny-vqa", {"vqa": {"score": 50.0}})  # no retrieval: not a row here
    readme = tmp_path / "README.md"
    readme.write_text(README)

    class Args:
        pass

    args = Args()
    args.runs, args.readme, args.runs_root = [], str(readme), str(runs)
    assert report.run(args) == 0
    lines = readme.read_text().splitlines()
    table = lines[lines.index(report.BEGIN) + 1: lines.index(report.END)]
    assert table == [
        *report.HEADER.splitlines(),
        "| `tcl-tiny` (tcl, 1.79 M trained params) | `make pretrain-tcl` | 600 × 64 | 8 min 8 s | "
        "ITC top-16 → ITM, 1000 test images | 33.3 / 81.7 / 89.5 | 34.1 / 86.3 / 95.6 |",
        "| `uniter-tiny` (kept) | `make pretrain-uniter` | 1500 × 64 | 4 min 12 s | ITM over all pairs | "
        "70.5 / 98.0 | 70.0 |",
        "| `ablate-tcl/albef-tiny` (tcl, 1.79 M trained params) | `make ablate-tcl` | 600 × 64 | 8 min 8 s | "
        "ITM over all pairs, 1000 test images | 33.3 / 81.7 / 89.5 | 34.1 / 86.3 / 95.6 |",
    ]
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith("\n¹ a footnote\n")
    assert report.run(args) == 0 and readme.read_text() == text  # idempotent
    assert not list(tmp_path.glob(".README.md.*"))  # the atomic writer's temporary file is gone


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no table\n")
    with pytest.raises(report.ReportError) as e:
        report.update_readme(readme, {})
    assert str(e.value) == (f"{readme}: expected one <!-- results:begin --> line, then one <!-- results:end --> "
                            "line around the results table")
    assert readme.read_text() == "# no table\n"


def test_report_of_a_directory_without_results_names_the_file(tmp_path, capsys):
    class Args:
        runs, readme, runs_root = [str(tmp_path / "nowhere")], str(tmp_path / "README.md"), str(tmp_path)

    assert report.run(Args()) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nowhere' / 'results.json'}: no such file; expected a run "
                                       "directory of vlp pretrain (results.json with retrieval results)\n")


def test_results_json_stays_valid_json(tmp_path):
    run = make_run(tmp_path, "r")
    data = json.loads((run / "results.json").read_text())
    assert data["train"] == {"wall_seconds": 488.0, "steps": 600, "parameters": 1_790_000, "samples_per_s": 78.7}
    assert data["command"] == "make pretrain-tcl"
