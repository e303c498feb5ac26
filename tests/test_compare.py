"""``vlp compare`` (vlp/compare.py) on hand-made run directories of the suite's layout: config.yaml (the keys
``vlp.config.save`` writes, trimmed to what matters here), metrics.csv (Lightning's CSVLogger columns, sparse rows),
results.json (written by the suite's own ``vlp.eval.results.write_results``), and for one run a checkpoint with a real
AdamW state. Checks the numbers in the table, the evaluation-setting markers, the figures' content and the PNGs,
the one-line errors on bad runs, and that a failing command leaves the previous report untouched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from vlp import compare as cmp
from vlp.eval.results import write_results

TCL_LOSSES = {"ita": 1.0, "itm": 1.0, "mlm": 1.0}
BT_LOSSES = {"mlm": 1.0, "itm": 1.0, "itc": 1.0}
PROTOCOL = {"retrieval_protocol": "contrastive+itm", "retrieval_images": 24, "retrieval_split": "test",
            "retrieval_captions": "first"}


def _config(name: str, model: str, loss_weights: dict, task: str = "pretrain") -> dict:
    """The shape of a run's config.yaml (``vlp.config.save`` of the resolved ExperimentConfig), the sections and
    keys compare reads plus their neighbours."""
    return {
        "name": name, "seed": 0, "output_dir": "runs",
        "model": {"name": model, "embed_dim": 16, "num_answers": 0 if task == "pretrain" else 3,
                  "loss_weights": loss_weights},
        "data": {"name": "shards", "train": [{"path": "data/shards/shapes/coco/train", "weight": 1.0}],
                 "test": "data/shards/shapes/coco/test", "batch_size": 8, "eval_batch_size": 16, "task": task},
        "optim": {"lr": 0.001, "schedule": "cosine", "warmup_steps": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "max_steps": 6, "log_every_n_steps": 1,
                    "accumulate_grad_batches": 1, "throughput": True},
        "eval": {"split": "test", "k_test": 4, "captions": "first", "first_stage": None, "combine": None},
        "finetune": {"from_scratch": False, "strict": True, "predictions": True},
        "ckpt": None,
    }


def _metrics(losses: dict[str, list[float | None]], rates: list[float | None] | None = None) -> list[dict]:
    """metrics.csv rows: step 0.., ``train/<term>`` per loss term (None: an empty cell, as when a term is not
    logged that step), the lr and an accuracy (not losses), and ``train/samples_per_s`` (None: still warming up)."""
    n = len(next(iter(losses.values())))
    rows = []
    for i in range(n):
        row = {"data/corrupt": 0.0, "epoch": 0, "step": i, "train/lr": 1e-4 * i, "train/itm_acc": 0.5}
        row.update({f"train/{t}": v[i] for t, v in losses.items()})
        if rates is not None:
            row["train/samples_per_s"] = rates[i]
        rows.append(row)
    return rows


def make_run(root: Path, name: str, *, model: str = "tcl", loss_weights: dict = TCL_LOSSES, task: str = "pretrain",
             losses: dict | None = None, rates: list | None = None, retrieval: dict | None = None,
             setting: dict | None = None, vqa: dict | None = None, step: int = 6) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(name, model, loss_weights, task), sort_keys=False))
    rows = _metrics(losses or {"loss": [3.0, 2.5, 2.0], "itm": [0.7, 0.6, 0.5]}, rates)
    fields = sorted({k for r in rows for k in r})
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    updates = {}
    if retrieval is not None:
        updates.update({"retrieval": retrieval, **(setting or PROTOCOL), "retrieval_seconds": 0.1})
    if vqa is not None:
        updates["vqa"] = vqa
    write_results(run, updates, model=model, step=step)
    return run


def retrieval(base: float) -> dict:
    """R@K values with full float precision (as the evaluation writes them)."""
    keys = [f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)]
    return {key: base + 10.0 * i + 1 / 3 for i, key in enumerate(keys)} | {"r_mean": base + 1 / 7}


def table_rows(table: str) -> dict[str, dict[str, str]]:
    """{run cell: {header: cell}} of the Markdown table."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def _two_runs(root: Path) -> tuple[Path, Path]:
    """TCL (4 rows, warm-up rows without a rate) and BridgeTower (3 rows, one empty itm cell), same setting."""
    tcl = make_run(root / "runs", "tcl-tiny", losses={"loss": [11.0, 10.0, 9.0, 8.5], "ita": [5.0, 4.0, 3.5, 3.0],
                                                          "itm": [0.7, 0.6, 0.55, 0.5], "mlm": [5.3, 5.2, 5.1, 5.0]},
                   rates=[None, 200.0, 100.0, 100.0], retrieval=retrieval(4.0), step=4)
    bt = make_run(root / "runs", "bt-tiny", model="bridgetower", loss_weights=BT_LOSSES,
                  losses={"loss": [8.3, 8.1, 8.0], "mlm": [5.3, 5.2, 5.0], "itm": [0.69, None, 0.68],
                          "itc": [2.3, 2.2, 2.1]}, retrieval=retrieval(1.0), step=3)
    return tcl, bt


@pytest.fixture
def two_runs(tmp_path):
    """Runs a test may change."""
    return _two_runs(tmp_path)


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """Runs no test changes, shared by the module."""
    return _two_runs(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def rendered(shared_runs, tmp_path_factory):
    """One rendered report of the shared runs (rendering the PNGs is the slow part), with its directory."""
    out = tmp_path_factory.mktemp("report") / "report"
    return cmp.compare(shared_runs, out=out), out


@pytest.fixture
def fast_png(monkeypatch):
    """Stand-in PNG bytes where a test is about files and wiring, not pixels (the module's report checks those)."""
    monkeypatch.setattr(cmp, "png_bytes", lambda fig: b"\x89PNG stand-in " + repr(len(fig.axes)).encode())


# -- the table --------------------------------------------------------------------------------------------------------
def test_table_numbers_equal_the_inputs(shared_runs):
    report = cmp.compare(shared_runs)
    rows = table_rows(report.table)
    assert list(rows) == ["tcl-tiny", "bt-tiny"]  # same setting: no marker on the names
    for name, base, model, steps in (("tcl-tiny", 4.0, "tcl", "4"), ("bt-tiny", 1.0, "bridgetower", "3")):
        row, values = rows[name], retrieval(base)
        for label, key in (("TR", "txt"), ("IR", "img")):
            for k in (1, 5, 10):
                assert row[f"{label}@{k}"] == f"{values[f'{key}_r{k}']:.2f}"
        assert (row["Model"], row["Task"], row["Steps"]) == (model, "pretrain", steps)
        assert row["Wall"] == "—" and row["Params"] == "—"  # not recorded, no checkpoint
    # samples/s: harmonic mean of the logged windows (warm-up rows empty): 3 / (1/200 + 1/100 + 1/100) = 120
    assert rows["tcl-tiny"]["Samples/s"] == "120.0"
    assert rows["bt-tiny"]["Samples/s"] == "—"  # no throughput column
    tcl = report.runs[0]
    assert tcl.retrieval == {k: v for k, v in retrieval(4.0).items() if k != "r_mean"}  # raw values kept exactly
    assert tcl.samples_per_s == pytest.approx(120.0)
    assert "VQA" not in report.table.splitlines()[0]


def test_matching_settings_have_no_marker(shared_runs):
    table = cmp.compare(shared_runs).table
    assert "[A]" not in table and "[B]" not in table and "differ" not in table
    assert "Every run with R@K: retrieval contrastive+itm, 24 images, split test, captions first" in table


@pytest.mark.parametrize("change", [{"retrieval_protocol": "all_pairs+itm"}, {"retrieval_images": 200},
                                    {"retrieval_captions": "all"}])
def test_different_settings_are_marked_with_footnotes(tmp_path, change):
    make_run(tmp_path, "a", retrieval=retrieval(4.0))
    make_run(tmp_path, "b", retrieval=retrieval(1.0), setting={**PROTOCOL, **change})
    make_run(tmp_path, "c", retrieval=retrieval(2.0))  # same setting as a: same marker
    report = cmp.compare([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    rows = table_rows(report.table)
    assert list(rows) == ["a [A]", "b [B]", "c [A]"]
    assert "Evaluation settings differ" in report.table
    footnotes = [ln for ln in report.table.splitlines() if ln.startswith("- [")]
    assert footnotes[0] == "- [A] retrieval contrastive+itm, 24 images, split test, captions first"
    b = {**PROTOCOL, **change}
    assert footnotes[1] == (f"- [B] retrieval {b['retrieval_protocol']}, {b['retrieval_images']} images, split test, "
                            f"captions {b['retrieval_captions']}")
    ticks = [t.get_text() for t in report.recall_figure.axes[0].get_xticklabels()]
    assert ticks == ["a [A]", "b [B]", "c [A]"]


def test_vqa_runs_get_their_own_column(tmp_path):
    pre = make_run(tmp_path, "pre", retrieval=retrieval(4.0))
    vqa = make_run(tmp_path, "ft", task="vqa", losses={"loss": [2.0, 1.0]},
                   vqa={"score": 61.234567, "split": "test", "step": 2, "questions": 40, "answered": 40}, step=2)
    report = cmp.compare([pre, vqa])
    rows = table_rows(report.table)
    assert rows["ft"]["VQA"] == "61.23" and rows["ft"]["Task"] == "vqa" and rows["ft"]["IR@1"] == "—"
    assert rows["pre"]["VQA"] == "—" and rows["pre"]["IR@1"] == f"{retrieval(4.0)['img_r1']:.2f}"
    assert [t.get_text() for t in report.recall_figure.axes[0].get_xticklabels()] == ["pre"]  # no retrieval: no bar


def test_parameters_from_the_checkpoints_optimizer_state(tmp_path):
    """A real AdamW state: the frozen weight and the buffer have no moments, so only trained parameters count."""
    import torch

    run = make_run(tmp_path, "tcl", retrieval=retrieval(4.0))
    net = torch.nn.ModuleDict({"online": torch.nn.Linear(40, 30), "twin": torch.nn.Linear(3, 2)})  # 1230 + 8
    net.twin.requires_grad_(False)
    net.register_buffer("queue", torch.zeros(16, 16))
    # torch.optim.AdamW(trained).state_dict() after a step, written out (a real step costs seconds of imports)
    trained = [p for p in net.parameters() if p.requires_grad]
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for i, p in enumerate(trained)}
    optimizer = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.02,
                                                   "params": list(range(len(trained)))}]}
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": net.state_dict(), "optimizer_states": [optimizer], "global_step": 6},
               run / "checkpoints" / "last.ckpt")
    damaged = make_run(tmp_path, "damaged", retrieval=retrieval(4.0))
    (damaged / "checkpoints").mkdir()
    (damaged / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    report = cmp.compare([run, damaged])
    assert report.runs[0].params == 1230
    rows = table_rows(report.table)
    assert rows["tcl"]["Params"] == "1.23 K" and rows["damaged"]["Params"] == "—"
    assert f"damaged: params: {damaged / 'checkpoints' / 'last.ckpt'}: truncated or corrupt" in report.table


def test_recorded_train_section_is_preferred(tmp_path):
    run = make_run(tmp_path, "r", retrieval=retrieval(4.0))
    write_results(run, {"train": {"wall_seconds": 488.4, "parameters": 3_600_000, "samples_per_s": 78.66}})
    row = table_rows(cmp.compare([run]).table)["r"]
    assert (row["Wall"], row["Params"], row["Samples/s"]) == ("8 min 8 s", "3.60 M", "78.7")


# -- the figures ------------------------------------------------------------------------------------------------------
def _lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_loss_figure_plots_every_term_of_every_run(rendered):
    report, out = rendered
    fig = report.loss_figure
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["loss", "ita", "itm", "mlm", "itc"]  # lr, itm_acc: not losses
    lines = {ax.get_title(): _lines_by_label(ax) for ax in panels}
    assert set(lines["loss"]) == set(lines["itm"]) == set(lines["mlm"]) == {"tcl-tiny", "bt-tiny"}
    assert set(lines["ita"]) == {"tcl-tiny"} and set(lines["itc"]) == {"bt-tiny"}
    # short series: the smoothing window is 1, so the plotted values are the metrics themselves
    assert lines["loss"]["tcl-tiny"] == ([0, 1, 2, 3], [11.0, 10.0, 9.0, 8.5])
    assert lines["mlm"]["bt-tiny"] == ([0, 1, 2], [5.3, 5.2, 5.0])
    assert lines["itm"]["bt-tiny"] == ([0, 2], [0.69, 0.68])  # the empty cell is skipped, not plotted as 0
    # one colour per run, the same in every panel
    colors = {ax.get_title(): {ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in panels}
    assert colors["loss"]["tcl-tiny"] == colors["ita"]["tcl-tiny"] == colors["itm"]["tcl-tiny"]
    # the PNG is that figure: 3 x 2 panels of 4 x 2.8 in at 100 dpi, and not blank
    png = matplotlib.image.imread(out / "losses.png")
    assert png.shape[:2] == (560, 1200)
    assert png[..., :3].std() > 0.05


def test_smoothing_is_a_trailing_running_mean(tmp_path):
    values = [float(i % 5) for i in range(60)]  # 60 points: window 3
    run = make_run(tmp_path, "long", losses={"loss": values}, retrieval=retrieval(4.0))
    expected = [sum(values[max(0, i - 2): i + 1]) / len(values[max(0, i - 2): i + 1]) for i in range(60)]
    assert cmp.smooth(values) == pytest.approx(expected)
    ax = cmp.compare([run]).loss_figure.axes[0]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(expected)
    ax_raw = cmp.compare([run], smoothing=1).loss_figure.axes[0]
    assert list(ax_raw.get_lines()[0].get_ydata()) == values


def test_recall_bars_are_the_r_at_1_values(rendered):
    report, out = rendered
    ax = report.recall_figure.axes[0]
    ir, tr = ax.containers[:2]
    assert (ir.get_label(), tr.get_label()) == ("IR@1", "TR@1")
    assert [b.get_height() for b in ir] == [retrieval(4.0)["img_r1"], retrieval(1.0)["img_r1"]]
    assert [b.get_height() for b in tr] == [retrieval(4.0)["txt_r1"], retrieval(1.0)["txt_r1"]]
    assert all(i.get_x() < t.get_x() for i, t in zip(ir, tr))  # IR then TR, side by side per run
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tcl-tiny", "bt-tiny"]
    png = matplotlib.image.imread(out / "r_at_1.png")
    width, height = report.recall_figure.get_size_inches() * cmp.DPI
    assert png.shape[:2] == (round(height), round(width)) == (320, 460)
    assert png[..., :3].std() > 0.05
    md = (out / "compare.md").read_text()
    assert "![losses](losses.png)" in md and "![R@1](r_at_1.png)" in md and report.table in md


# -- bad input and atomic writes --------------------------------------------------------------------------------------
def _break(run: Path, how: str) -> Path:
    if how == "missing results.json":
        (run / "results.json").unlink()
        return run / "results.json"
    if how == "corrupt results.json":
        (run / "results.json").write_text('{"retrieval": {"txt_r1": 4.1,')
        return run / "results.json"
    if how == "results.json not an object":
        (run / "results.json").write_text("[1, 2]")
        return run / "results.json"
    if how == "missing config.yaml":
        (run / "config.yaml").unlink()
        return run / "config.yaml"
    if how == "corrupt config.yaml":
        (run / "config.yaml").write_text("model: [unclosed\n")
        return run / "config.yaml"
    if how == "corrupt metrics.csv":
        (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,not-a-number\n")
        return run / "metrics.csv"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing results.json", "corrupt results.json", "results.json not an object",
                                 "missing config.yaml", "corrupt config.yaml", "corrupt metrics.csv"])
def test_bad_run_is_one_line_naming_the_file(tmp_path, how, capsys):
    from vlp.cli import main

    good = make_run(tmp_path, "good", retrieval=retrieval(4.0))
    bad_file = _break(make_run(tmp_path, "bad", retrieval=retrieval(1.0)), how)
    with pytest.raises(cmp.CompareError) as e:
        cmp.compare([good, bad_file.parent])
    message = str(e.value)
    assert message.startswith(f"{bad_file}: ") and "\n" not in message
    assert e.value.path == bad_file
    # the CLI prints exactly that line and exits 2, writing nothing
    assert main(["compare", str(good), str(bad_file.parent), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_missing_run_directory(tmp_path):
    with pytest.raises(cmp.CompareError, match=r"nope: no such directory"):
        cmp.compare([tmp_path / "nope"])


def _previous_report(rendered, out: Path) -> dict[str, bytes]:
    """A previous report in ``out``: the module's rendered one, copied."""
    out.mkdir(parents=True)
    for path in rendered[1].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("fail", ["plot", "render"])
def test_failed_command_leaves_the_previous_report(two_runs, rendered, tmp_path, monkeypatch, fail):
    out = tmp_path / "report"
    before = _previous_report(rendered, out)
    assert set(before) == {"compare.md", "losses.png", "r_at_1.png"}

    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    if fail == "plot":
        monkeypatch.setattr(cmp, "plot_recall_at_1", boom)
    else:  # the second PNG fails to render, after the first one rendered
        rendered_figures = []

        def second_fails(fig):
            rendered_figures.append(fig)
            return boom() if len(rendered_figures) > 1 else b"new"

        monkeypatch.setattr(cmp, "png_bytes", second_fails)
    with pytest.raises(RuntimeError, match="plot failed"):
        cmp.compare(two_runs, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # unchanged, and no temporary file left


def test_failed_write_keeps_the_previous_markdown(two_runs, rendered, tmp_path, monkeypatch, fast_png):
    """Writing stops at the second PNG: the first is replaced, compare.md (written last) is the old one, and the
    temporary file of the failed write is gone."""
    import os

    import vlp.utils.io

    out = tmp_path / "report"
    before = _previous_report(rendered, out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "r_at_1.png":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(vlp.utils.io.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        cmp.compare(two_runs, out=out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)
    assert after["compare.md"] == before["compare.md"] and after["r_at_1.png"] == before["r_at_1.png"]
    assert after["losses.png"] != before["losses.png"]


def test_cli_writes_the_report(shared_runs, tmp_path, capsys, fast_png):
    from vlp.cli import main

    out = tmp_path / "reports" / "cmp"
    assert main(["compare", *map(str, shared_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tcl-tiny | tcl | pretrain |" in printed and f"wrote {out / 'losses.png'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "losses.png", "r_at_1.png"]
    table = printed[: printed.index("wrote ")]
    assert table in (out / "compare.md").read_text() and "| bt-tiny | bridgetower | pretrain |" in table
    assert json.loads((shared_runs[0] / "results.json").read_text())["step"] == 4  # runs are only read


def test_runs_sharing_a_name_are_labelled_by_directory(tmp_path):
    a = make_run(tmp_path / "x", "tcl|tiny", retrieval=retrieval(4.0))
    b = make_run(tmp_path / "y", "tcl|tiny", retrieval=retrieval(1.0))
    report = cmp.compare([a, b])
    assert [r.name for r in report.runs] == [str(a), str(b)]
    assert f"| {str(a).replace('|', chr(92) + '|')} | tcl |" in report.table  # a "|" in a name is escaped
    with pytest.raises(cmp.CompareError, match="given twice"):
        cmp.compare([a, a])
