"""``vlp compare RUN_DIR... [--out reports/NAME]``: one Markdown table and two plots over several runs.

A run directory is what ``vlp pretrain`` / ``vlp finetune`` leave (``vlp.train``): ``config.yaml`` (the resolved
config), ``results.json`` (``vlp.eval.results``: retrieval R@K with the protocol it was measured under, or the VQA
score), ``metrics.csv`` (Lightning's CSVLogger, sparse rows) and ``checkpoints/last.ckpt``. From each run the table
takes:

==============  ====================================================================================================
Run, Model,     ``config.yaml`` ``name`` (the directory name when absent), ``model.name``, ``data.task``
Task
TR/IR@1/5/10    ``results.json`` ``retrieval.txt_r*`` / ``img_r*`` (percent); runs measured under different settings
                (``retrieval_protocol``, ``retrieval_images``, ``retrieval_split``, ``retrieval_captions``) are marked
                ``[A]``, ``[B]``, ... with a footnote each, and a warning says their R@K are not comparable
VQA             ``results.json`` ``vqa.score``; different ``vqa.split`` / question counts are marked ``[V1]``, ...
Steps           ``results.json`` ``step`` (the step evaluated), else the last step in metrics.csv + 1
Wall            the training wall time, ``results.json`` ``train.wall_seconds`` (``vlp pretrain`` / ``finetune`` record
                it, summed over a run's resumed segments), else "—" for older runs: file times are not used (they do
                not survive a copy and count the pauses between resumes)
Params          parameters the optimizer updates: the AdamW state (``exp_avg``) in ``checkpoints/last.ckpt``, read with
                the suite's safe reader (EMA twins, queues and frozen weights have none); ``results.json``
                ``train.parameters`` when recorded
Samples/s       the harmonic mean of ``train/samples_per_s`` in metrics.csv (``vlp.utils.throughput``: global samples
                over each logged window; the harmonic mean of equal-sample windows is total samples / total time),
                else ``results.json`` ``train.samples_per_s``
==============  ====================================================================================================

Plots (matplotlib's Agg canvas, no pyplot state): ``losses.png``, one panel per loss term (``train/loss`` and the
terms of ``model.loss_weights`` that metrics.csv holds), one lightly smoothed line per run over the step;
``r_at_1.png``, IR@1 and TR@1 bars side by side per run. :func:`compare` renders everything in memory first and only
then replaces the files (``vlp.utils.io``: temporary file in the same directory, then ``os.replace``), so a command
that fails leaves the previous report as it was.

A bad run directory raises :class:`CompareError`, one line naming the file and what was expected.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["CompareError", "Comparison", "Run", "compare", "format_count", "format_duration", "format_table",
           "harmonic_mean", "load_run", "load_runs", "plot_losses", "plot_recall_at_1", "png_bytes", "setting_markers",
           "smooth", "write_report"]

RUN_LAYOUT = "a run directory of vlp pretrain / vlp finetune (config.yaml, results.json, metrics.csv)"
DASH = "—"
DPI = 100
LOSS_PANEL_IN = (4.0, 2.8)  # inches per loss panel (width, height)
RECALL_HEIGHT_IN = 3.2
DIRECTIONS = (("TR", "txt"), ("IR", "img"))  # the column order of vlp.eval.results.format_retrieval_table
KS = (1, 5, 10)


class CompareError(ValueError):
    """A run directory that cannot be compared. ``str(e)`` is one line naming the file (or directory) and what was
    expected, like ``vlp.utils.checkpoint.CheckpointError``, so the CLI prints it as it is."""

    def __init__(self, path: str | os.PathLike, problem: str, expected: str = RUN_LAYOUT):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}; expected {expected}")


@dataclass
class Run:
    """What the table and the plots need from one run directory (raw values; formatting happens in the table)."""

    path: Path
    name: str
    model: Optional[str] = None
    task: Optional[str] = None
    retrieval: dict[str, float] = field(default_factory=dict)  # txt_r1 ... img_r10, percent
    retrieval_setting: Optional[tuple] = None  # (protocol, images, split, captions); None: no retrieval results
    vqa: Optional[float] = None
    vqa_setting: Optional[tuple] = None  # (split, answered questions); None: no VQA results
    steps: Optional[int] = None
    wall_s: Optional[float] = None
    params: Optional[int] = None
    samples_per_s: Optional[float] = None
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # term -> [(step, value)]
    notes: list[str] = field(default_factory=list)  # why a value is missing


@dataclass
class Comparison:
    """The result of :func:`compare`: the table, the whole Markdown report, the runs, the figures (for a caller or a
    test to inspect), and the files written (empty when no ``out`` was given)."""

    table: str
    markdown: str
    runs: list[Run]
    loss_figure: Any
    recall_figure: Any
    paths: list[Path] = field(default_factory=list)


# -- reading a run ---------------------------------------------------------------------------------------------------
def _run_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CompareError(path, "no such directory")
    if not path.is_dir():
        raise CompareError(path, "not a directory")
    return path


def _read_config(run_dir: Path) -> dict:
    """config.yaml as a plain dict. Read as YAML, not validated against today's schema: comparing an older run must
    not fail on a key renamed since."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CompareError(path, "no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CompareError(path, f"not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CompareError(path, f"holds a {type(data).__name__}, not a mapping")
    return data


def _read_results(run_dir: Path) -> dict:
    """results.json, required: a run without it was never evaluated and has nothing to put in the table."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise CompareError(path, "no such file (not evaluated yet? `vlp evaluate` writes it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise CompareError(path, f"not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise CompareError(path, f"holds a JSON {type(data).__name__}, not an object")
    for section in ("retrieval", "vqa", "train"):
        if section in data and not isinstance(data[section], dict):
            raise CompareError(path, f"'{section}' is a JSON {type(data[section]).__name__}, not an object")
    return data


def _read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {column: [(step, value)]} (``vlp.plots.read_metrics``); optional: a run evaluated by
    ``vlp evaluate`` alone has none, and then has no curves."""
    import csv

    from vlp.plots import read_metrics

    path = run_dir / "metrics.csv"
    expected = "Lightning's CSVLogger file (a step column, numeric cells)"
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header and "step" not in header:
            raise CompareError(path, "no 'step' column in its header", expected)
        return read_metrics(path)
    except (ValueError, csv.Error, OSError) as e:  # UnicodeDecodeError is a ValueError
        if isinstance(e, CompareError):
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CompareError(path, f"not a readable metrics CSV ({detail})", expected) from None


def _number(value: Any) -> Optional[float]:
    """A finite JSON number as float, else None (null, strings, booleans and NaN are not results)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _retrieval(results: dict) -> tuple[dict[str, float], Optional[tuple]]:
    """R@K both ways and the setting they were measured under (None when the run has no retrieval numbers)."""
    section = results.get("retrieval") or {}
    values = {f"{d}_r{k}": v for _, d in DIRECTIONS for k in KS if (v := _number(section.get(f"{d}_r{k}"))) is not None}
    if not values:
        return {}, None
    setting = tuple(_hashable(results.get(key)) for key in
                    ("retrieval_protocol", "retrieval_images", "retrieval_split", "retrieval_captions"))
    return values, setting


def _hashable(value: Any) -> Any:
    """A recorded setting as a value that can key a marker (a list or dict from a hand-edited file as its JSON)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _vqa(results: dict) -> tuple[Optional[float], Optional[tuple]]:
    section = results.get("vqa")
    if not section:
        return None, None
    return _number(section.get("score")), (_hashable(section.get("split")), _hashable(section.get("answered")))


def _steps(results: dict, metrics: dict) -> Optional[int]:
    """The step the results were measured at; else the run's last logged step + 1 (metrics.csv numbers steps from
    0, and a run of N optimizer steps logs its last row at N - 1)."""
    for value in (results.get("step"), (results.get("vqa") or {}).get("step")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    last = [s for series in metrics.values() for s, _ in series[-1:]]
    return max(last) + 1 if last else None


def _loss_terms(config: dict, metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """``train/loss`` and the model's own loss terms (the keys of ``model.loss_weights``) that metrics.csv holds,
    under their short names. Metrics that are not losses (lr, accuracies, temperature, TCL's ita_* parts,
    throughput) are left out by construction."""
    weights = (config.get("model") or {}).get("loss_weights") or {}
    terms = ["loss", *[str(k) for k in weights if str(k) != "loss"]]
    return {t: metrics[f"train/{t}"] for t in terms if metrics.get(f"train/{t}")}


def harmonic_mean(values: Iterable[float]) -> Optional[float]:
    """Of window rates over equal numbers of samples: total samples / total time (an arithmetic mean would give
    fast windows too much weight)."""
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return len(values) / sum(1.0 / v for v in values) if values else None


def _samples_per_s(results: dict, metrics: dict) -> Optional[float]:
    rate = harmonic_mean(v for _, v in metrics.get("train/samples_per_s", []))
    return rate if rate is not None else _number((results.get("train") or {}).get("samples_per_s"))


def _optimizer_parameters(ckpt: dict) -> Optional[int]:
    """Elements of the parameters an Adam-family optimizer holds state for: exactly those it updates."""
    total = 0
    for opt in ckpt.get("optimizer_states") or []:
        for state in (opt.get("state") or {}).values() if isinstance(opt, dict) else []:
            moment = state.get("exp_avg") if isinstance(state, dict) else None
            if moment is not None and hasattr(moment, "numel"):
                total += int(moment.numel())
    return total or None


def _parameters(run_dir: Path, results: dict, notes: list[str]) -> Optional[int]:
    """Trained parameters: recorded in results.json, else counted from last.ckpt's optimizer state (read with the
    suite's safe reader, ``weights_only``). A missing or unreadable checkpoint leaves "—" and a note, not an error:
    the rest of the row is still worth comparing."""
    recorded = (results.get("train") or {}).get("parameters")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        notes.append(f"params: no {path}")
        return None
    from vlp.utils.checkpoint import CheckpointError, read_checkpoint

    try:
        count = _optimizer_parameters(read_checkpoint(path, expect="a vlp training checkpoint"))
    except CheckpointError as e:
        notes.append(f"params: {e}")
        return None
    if count is None:
        notes.append(f"params: {path} holds no optimizer state (a converted checkpoint?)")
    return count


def load_run(run_dir: str | os.PathLike) -> Run:
    """One run directory as a :class:`Run`; :class:`CompareError` when a file it needs is missing or invalid."""
    path = _run_dir(run_dir)
    config = _read_config(path)
    results = _read_results(path)
    metrics = _read_metrics(path)
    retrieval, retrieval_setting = _retrieval(results)
    vqa, vqa_setting = _vqa(results)
    notes: list[str] = []
    model = (config.get("model") or {}).get("name") or results.get("model")
    return Run(path=path, name=str(config.get("name") or path.name), model=model,
               task=(config.get("data") or {}).get("task"), retrieval=retrieval, retrieval_setting=retrieval_setting,
               vqa=vqa, vqa_setting=vqa_setting, steps=_steps(results, metrics),
               wall_s=_number((results.get("train") or {}).get("wall_seconds")),
               params=_parameters(path, results, notes), samples_per_s=_samples_per_s(results, metrics),
               losses=_loss_terms(config, metrics), notes=notes)


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run, in the order given; runs sharing a name are labelled by their directory instead, so that rows,
    legend entries and bars stay distinguishable."""
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise CompareError(".", "no run directories given", "one or more run directories")
    seen: set[Path] = set()
    runs = []
    for d in run_dirs:
        run = load_run(d)
        if run.path.resolve() in seen:
            raise CompareError(run.path, "given twice", "distinct run directories")
        seen.add(run.path.resolve())
        runs.append(run)
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


# -- the table -------------------------------------------------------------------------------------------------------
def setting_markers(settings: list[Optional[tuple]], prefix: str) -> list[str]:
    """A marker per run (``[A]``, ``[B]`` / ``[V1]``, ...) when the runs' evaluation settings differ, "" for every run
    when they all agree or for a run without that evaluation: numbers from different settings must never sit in one
    column unmarked."""
    distinct = list(dict.fromkeys(s for s in settings if s is not None))
    if len(distinct) < 2:
        return ["" for _ in settings]
    label = (lambda i: chr(ord("A") + i) if i < 26 else f"A{i}") if not prefix else (lambda i: f"{prefix}{i + 1}")
    names = {s: f"[{label(i)}]" for i, s in enumerate(distinct)}
    return [names[s] if s is not None else "" for s in settings]


def _describe_retrieval(setting: tuple) -> str:
    protocol, images, split, captions = setting
    if all(v is None for v in setting):
        return "retrieval protocol not recorded in results.json"
    parts = [f"retrieval {protocol}" if protocol is not None else "retrieval protocol not recorded"]
    parts.append(f"{images} images" if images is not None else "image count not recorded")
    parts.append(f"split {split}" if split is not None else "split not recorded")
    parts.append(f"captions {captions}" if captions is not None else "captions not recorded")
    return ", ".join(parts)


def _describe_vqa(setting: tuple) -> str:
    split, answered = setting
    return f"VQA split {split if split is not None else 'not recorded'}" + (
        f", {answered} answered questions" if answered is not None else "")


def format_count(n: Optional[int]) -> str:
    """3 significant digits with K / M / B: parameter counts are read as magnitudes."""
    if n is None:
        return DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return str(n)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return DASH
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s} s" if m else f"{s} s"


def _pct(value: Optional[float]) -> str:
    return DASH if value is None else f"{value:.2f}"


def _rate(value: Optional[float]) -> str:
    return DASH if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _cell(text: Any) -> str:
    return DASH if text is None or text == "" else str(text)


def _columns(runs: list[Run]) -> tuple[bool, bool]:
    """Which result groups to show: retrieval when any run has it (or when no run has either), VQA when any has it."""
    has_retrieval = any(r.retrieval for r in runs)
    has_vqa = any(r.vqa_setting is not None for r in runs)
    return has_retrieval or not has_vqa, has_vqa


def _row(run: Run, mark: str, vmark: str, show_retrieval: bool, show_vqa: bool) -> list[str]:
    name = f"{run.name} {' '.join(m for m in (mark, vmark) if m)}".strip()
    cells = [name, _cell(run.model), _cell(run.task)]
    if show_retrieval:
        cells += [_pct(run.retrieval.get(f"{d}_r{k}")) for _, d in DIRECTIONS for k in KS]
    if show_vqa:
        cells.append(_pct(run.vqa))
    cells += [_cell(run.steps), format_duration(run.wall_s), format_count(run.params), _rate(run.samples_per_s)]
    return [c.replace("|", "\\|") for c in cells]


def format_table(runs: list[Run]) -> str:
    """The Markdown table, one row per run, with the evaluation-setting markers' warning above it and their
    footnotes (and the notes on missing values) below it."""
    show_retrieval, show_vqa = _columns(runs)
    marks = setting_markers([r.retrieval_setting for r in runs], "")
    vmarks = setting_markers([r.vqa_setting for r in runs], "V")
    header = ["Run", "Model", "Task"]
    if show_retrieval:
        header += [f"{name}@{k}" for name, _ in DIRECTIONS for k in KS]
    if show_vqa:
        header.append("VQA")
    header += ["Steps", "Wall", "Params", "Samples/s"]
    lines = []
    if any(marks) or any(vmarks):
        lines += ["**Evaluation settings differ between these runs**: numbers with different markers were measured "
                  "differently and are not directly comparable (see the footnotes).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    lines += ["| " + " | ".join(_row(r, m, v, show_retrieval, show_vqa)) + " |" for r, m, v in zip(runs, marks, vmarks)]
    lines += [""] + _footnotes(runs, marks, vmarks)
    return "\n".join(lines).rstrip("\n") + "\n"


def _footnotes(runs: list[Run], marks: list[str], vmarks: list[str]) -> list[str]:
    out = []
    for mark_list, attr, describe in ((marks, "retrieval_setting", _describe_retrieval),
                                      (vmarks, "vqa_setting", _describe_vqa)):
        for mark, setting in dict(zip(mark_list, (getattr(r, attr) for r in runs))).items():
            if mark:
                out.append(f"- {mark} {describe(setting)}")
    common = {r.retrieval_setting for r in runs if r.retrieval_setting is not None}
    if len(common) == 1 and not any(marks):
        out.append(f"- Every run with R@K: {_describe_retrieval(next(iter(common)))}.")
    out.append("- TR: image → text, IR: text → image (R@K, %). Params: parameters the optimizer updates (EMA twins, "
               "queues, frozen weights excluded). Samples/s: harmonic mean of metrics.csv train/samples_per_s, "
               "else results.json's whole-run rate. Wall: training wall time summed over resumed segments "
               f"(results.json train.wall_seconds), else {DASH}.")
    out += [f"- {r.name}: {note}" for r in runs for note in r.notes]
    return out


# -- the plots -------------------------------------------------------------------------------------------------------
def smooth(values: list[float], window: Optional[int] = None) -> list[float]:
    """Trailing running mean over ``window`` points (default ``max(1, n // 20)``, the smoothing of the run's own
    loss.png): light enough to keep the shape of a short run, enough to read noisy curves against each other."""
    n = len(values)
    w = max(1, n // 20) if window is None else max(1, int(window))
    if w == 1:
        return [float(v) for v in values]
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= w:
            total -= values[i - w]
        out.append(total / min(i + 1, w))
    return out


def _figure(width_in: float, height_in: float):
    """A Figure on matplotlib's Agg canvas, outside pyplot: nothing global to close, safe to keep for inspection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(runs: list[Run]) -> dict[str, Any]:
    """One colour per run, the same in every panel and in both figures."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}


def plot_losses(runs: list[Run], smoothing: Optional[int] = None):
    """One panel per loss term (``loss`` first, then in order of appearance), one line per run that logged it:
    x = step, y = :func:`smooth` of the term. Returns the Figure."""
    terms = list(dict.fromkeys(t for r in runs for t in r.losses))
    cols = max(1, min(3, len(terms)))
    rows = max(1, math.ceil(len(terms) / cols))
    fig = _figure(LOSS_PANEL_IN[0] * cols, LOSS_PANEL_IN[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flat
    colors = _colors(runs)
    for ax, term in zip(axes, terms):
        for run in runs:
            if term in run.losses:
                steps, values = zip(*run.losses[term])
                ax.plot(steps, smooth(list(values), smoothing), lw=1.3, label=run.name, color=colors[run.name])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    all_axes = fig.axes
    for ax in all_axes[len(terms):]:
        ax.axis("off")
    if not terms:
        all_axes[0].text(0.5, 0.5, "no training losses in metrics.csv", ha="center", va="center")
    elif len(runs) > 1:
        all_axes[0].legend(fontsize=7)
    fig.suptitle("training losses (smoothed)", fontsize=10)
    return fig


def plot_recall_at_1(runs: list[Run]):
    """IR@1 and TR@1 bars side by side for every run with retrieval results, tick labels carrying the setting
    markers of the table. Returns the Figure."""
    marks = setting_markers([r.retrieval_setting for r in runs], "")
    shown = [(r, m) for r, m in zip(runs, marks) if r.retrieval]
    fig = _figure(max(4.0, 1.3 * len(shown) + 2.0), RECALL_HEIGHT_IN)
    ax = fig.subplots()
    if not shown:
        ax.text(0.5, 0.5, "no retrieval results in these runs", ha="center", va="center")
        ax.axis("off")
        return fig
    width = 0.38
    for offset, (label, key) in ((-width / 2, ("IR@1", "img_r1")), (width / 2, ("TR@1", "txt_r1"))):
        heights = [r.retrieval.get(key, math.nan) for r, _ in shown]
        bars = ax.bar([i + offset for i in range(len(shown))], heights, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(shown)), [f"{r.name} {m}".strip() for r, m in shown], fontsize=8,
                  rotation=20 if len(shown) > 4 else 0)
    ax.set_ylabel("R@1 (%)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("R@1 per run" + ("\n[A], [B], ...: different retrieval settings (compare.md)" if any(marks) else ""),
                 fontsize=9)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# -- the report ------------------------------------------------------------------------------------------------------
def _markdown(runs: list[Run], table: str) -> str:
    listing = "\n".join(f"- `{r.name}`: `{r.path}`" for r in runs)
    return (f"# Run comparison\n\n{table}\nRuns:\n\n{listing}\n\n## Training losses\n\n![losses](losses.png)\n\n"
            f"## R@1\n\n![R@1](r_at_1.png)\n")


def write_report(out: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Replace each file atomically (temporary file beside it, fsync, ``os.replace``); the Markdown last, so that it
    never links plots older than itself."""
    from vlp.utils.io import atomic_write_bytes

    out = Path(out)
    order = sorted(files, key=lambda name: name.endswith(".md"))
    for name in order:
        atomic_write_bytes(out / name, files[name])
    return [out / name for name in order]


def compare(run_dirs: Iterable[str | os.PathLike], out: str | os.PathLike | None = None,
            smoothing: Optional[int] = None) -> Comparison:
    """Load the runs, build the table and both figures, and with ``out`` write ``compare.md``, ``losses.png`` and
    ``r_at_1.png`` there. Everything is rendered before the first file is replaced: any failure leaves ``out`` as
    it was."""
    runs = load_runs(run_dirs)
    table = format_table(runs)
    markdown = _markdown(runs, table)
    loss_figure = plot_losses(runs, smoothing)
    recall_figure = plot_recall_at_1(runs)
    paths: list[Path] = []
    if out is not None:
        files = {"losses.png": png_bytes(loss_figure), "r_at_1.png": png_bytes(recall_figure),
                 "compare.md": markdown.encode("utf-8")}
        paths = write_report(out, files)
    return Comparison(table, markdown, runs, loss_figure, recall_figure, paths)
