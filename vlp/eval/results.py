"""``<run>/results.json``: evaluation results of a run, merged across evaluations, written atomically.

Layout (sections are free-form; these are the ones the suite writes)::

    {"model": "tcl", "step": 12000,
     "retrieval": {"txt_r1": ..., "txt_r5": ..., "txt_r10": ..., "img_r1": ..., "img_r5": ..., "img_r10": ...,
                   "txt_r_mean": ..., "img_r_mean": ..., "r_mean": ..., "rsum": ...},
     "vqa": {"score": ...},
     "train": {"wall_seconds": ..., "steps": ..., "parameters": ..., "samples_per_s": ...},
     "command": "make pretrain-tcl"}

``train`` is the run's training cost (:func:`training_record`; ``vlp compare`` reads these names) and ``command`` the
command that produced the run (``VLP_COMMAND``, which the Makefile sets, else the ``vlp`` command line);
:func:`run_summary` is the short block ``vlp pretrain`` / ``vlp finetune`` print at the end.

:func:`write_results` deep-merges into what is already there (a retrieval evaluation and a VQA evaluation of the same
run coexist; keys not written are kept), under an advisory file lock, and replaces the file atomically
(:func:`vlp.utils.io.atomic_write_text`). Call it from one process (rank 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlp.utils.io import atomic_write_text

__all__ = [
    "RESULTS_FILE",
    "format_retrieval_table",
    "print_retrieval_table",
    "read_results",
    "results_path",
    "run_command",
    "run_summary",
    "training_record",
    "write_results",
]

RESULTS_FILE = "results.json"


def results_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RESULTS_FILE


def read_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's results, ``{}`` if it has none yet. A file that is not a JSON object raises ``ValueError``."""
    path = results_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _jsonable(x: Any) -> Any:
    """Tensors, numpy scalars/arrays, paths and tuples -> plain JSON values; NaN/inf -> null."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # torch.Tensor, numpy array / scalar
        return _jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store {type(x).__name__} in results.json")


def _deep_merge(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise read-modify-write of ``path`` between processes (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_results(
    run_dir: str | os.PathLike,
    updates: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Merge ``updates`` (e.g. ``{"retrieval": recall_at_k(...)}``) and ``model``/``step`` into
    ``<run_dir>/results.json``; returns the merged content. Nested dicts merge key by key; other values replace."""
    new: dict[str, Any] = dict(_jsonable(dict(updates or {})))
    if model is not None:
        new["model"] = str(model)
    if step is not None:
        new["step"] = int(step)
    path = results_path(run_dir)
    with _locked(path):
        merged = _deep_merge(read_results(run_dir), new)
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return merged


# ------------------------------------------------------------------------------------------- training record ---
def training_record(wall_seconds: float, steps: int, parameters: int, samples_per_step: int) -> dict[str, Any]:
    """The ``train`` section: wall seconds of training summed over the run's resumed segments, optimizer steps,
    trainable parameters, and samples/s over the whole run (global samples per optimizer step x steps / wall)."""
    wall = float(wall_seconds)
    return {"wall_seconds": round(wall, 1), "steps": int(steps), "parameters": int(parameters),
            "samples_per_s": round(samples_per_step * steps / wall, 1) if wall > 0 else None}


def run_command(environ: Mapping[str, str] | None = None, argv: list[str] | None = None) -> str | None:
    """What produced the run: ``VLP_COMMAND`` (set by the Makefile: ``make pretrain-tcl``), else ``vlp ...`` when this
    process is the ``vlp`` command, else None (a library call: nothing honest to record)."""
    import shlex
    import sys

    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    if environ.get("VLP_COMMAND"):
        return environ["VLP_COMMAND"]
    program = Path(argv[0]).name if argv else ""
    if program == "vlp" or (program == "__main__.py" and Path(argv[0]).parent.name == "vlp"):
        return shlex.join(["vlp", *argv[1:]])
    return None


def run_summary(run_dir: str | os.PathLike, name: str | None = None) -> str:
    """A few lines for the end of a command: where the run is, how long it trained, its headline figures."""
    from vlp.compare import format_duration

    results = read_results(run_dir)
    train = results.get("train") or {}
    lines = [f"== {name or Path(run_dir).name}: {run_dir}"]
    if train:
        rate = train.get("samples_per_s")
        lines.append(f"   trained {train.get('steps')} steps in {format_duration(train.get('wall_seconds'))}"
                     + (f" ({rate:.1f} samples/s)" if isinstance(rate, (int, float)) else ""))
    ret = results.get("retrieval") or {}
    if ret:
        def three(d: str) -> str:
            return " / ".join(f"{ret[f'{d}_r{k}']:.1f}" for k in (1, 5, 10) if f"{d}_r{k}" in ret)

        lines.append(f"   retrieval R@1/5/10  TR {three('txt')}  IR {three('img')}  "
                     f"({results.get('retrieval_protocol')}, {results.get('retrieval_images')} images, step "
                     f"{results.get('step')})")
    vqa = results.get("vqa") or {}
    if isinstance(vqa.get("score"), (int, float)):
        lines.append(f"   VQA score {vqa['score']:.2f} on {vqa.get('split')} ({vqa.get('answered')} questions)")
    if len(lines) == 1:
        lines.append("   no results yet (results.json holds no training record or evaluation)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ tables ---
_K_RE = re.compile(r"^(?:txt|img)_r(\d+)$")


def _runs(results: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """Normalise the accepted inputs to [(label, results dict)]."""
    def label(res: Mapping, fallback: str) -> str:
        return str(res.get("model") or fallback)

    def from_dir(run_dir) -> tuple[str, Mapping[str, Any]]:
        res = read_results(run_dir)
        return label(res, Path(run_dir).name), res

    if isinstance(results, (str, os.PathLike)):
        return [from_dir(results)]
    if isinstance(results, Mapping):
        if any(not isinstance(v, Mapping) for v in results.values()) or "retrieval" in results:
            return [(label(results, "run"), results)]  # one results dict
        return [(str(name), res) for name, res in results.items()]  # {name: results}
    if isinstance(results, Iterable):
        out = []
        for i, res in enumerate(results):
            if isinstance(res, (str, os.PathLike)):
                out.append(from_dir(res))
            else:
                out.append((label(res, f"run {i}"), res))
        return out
    raise TypeError(f"expected results dict(s) or run directories, got {type(results).__name__}")


def _table(results: Any, section: str) -> tuple[list[str], list[list[str]]]:
    runs = _runs(results)
    ks = sorted({int(m.group(1)) for _, r in runs for key in (r.get(section) or {}) if (m := _K_RE.match(key))})
    ks = ks or [1, 5, 10]
    header = ["Model", "Step"] + [f"TR@{k}" for k in ks] + [f"IR@{k}" for k in ks] + ["R_mean"]
    rows = []
    for name, res in runs:
        sec = res.get(section) or {}

        def fmt(key: str) -> str:
            v = sec.get(key)
            return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"

        step = res.get("step")
        rows.append([name, "–" if step is None else str(step)] + [fmt(f"txt_r{k}") for k in ks]
                    + [fmt(f"img_r{k}") for k in ks] + [fmt("r_mean")])
    return header, rows


def format_retrieval_table(results: Any, *, section: str = "retrieval") -> str:
    """Markdown table of TR/IR R@K and R_mean (percent, 2 decimals; "–" where missing), one row per run.

    ``results``: one results dict, a list of them, ``{label: results}``, or run directories (read from disk).
    Rows are labelled by the explicit label, else the ``model`` field, else the directory name.
    """
    header, rows = _table(results, section)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    sep = "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows]) + "\n"


def print_retrieval_table(results: Any, *, section: str = "retrieval", console=None) -> None:
    """Print the same table with rich (to ``console``, default a new stdout console)."""
    from rich.console import Console
    from rich.table import Table

    header, rows = _table(results, section)
    table = Table(title=f"{section} (R@K, %)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    (console or Console()).print(table)
