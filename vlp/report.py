"""``make report`` / ``vlp report [RUN_DIR...]``: the README's results table, rewritten from the runs' results.json.

The table sits between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md. Each row is keyed by
its run: the first backquoted word of its first cell, the run directory below ``runs/`` (``tcl-tiny``,
``ablate-tcl/albef-tiny``). A run found here replaces the row with its key, in place, or is appended; rows of runs
that are not here are kept as they are, so the table never loses a measurement this machine does not hold. Every
generated row names the command that produced it (``results.json`` ``command``: ``VLP_COMMAND`` from the Makefile),
so nothing in the table is typed by hand.

Runs: the directories given, else every ``runs/*/`` and ``runs/*/*/`` holding a results.json with retrieval
results (VQA runs have no place in this table and are skipped with a note). The README is replaced atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

__all__ = ["BEGIN", "END", "HEADER", "ReportError", "add_args", "find_runs", "merge_rows", "row_key", "run",
           "run_row", "update_readme"]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
HEADER = ("| run | made by | steps × batch | wall | protocol | TR@1 / 5 / 10 | IR@1 / 5 / 10 |\n"
          "|---|---|---|---|---|---|---|")
DASH = "—"
PROTOCOLS = {  # results.json retrieval_protocol -> words; {k}: eval.k_test
    "contrastive+itm": "ITC top-{k} → ITM",
    "contrastive+max": "ITC top-{k} → ITM, max of both directions",
    "contrastive+itc": "ITC",
    "all_pairs+itm": "ITM over all pairs",
    "all_pairs+max": "ITM over all pairs, max of both directions",
}


class ReportError(ValueError):
    """One line naming the file and what was expected."""


def row_key(row: str) -> Optional[str]:
    """The run a table row belongs to: the first backquoted word of its first cell (None: not a keyed row)."""
    cells = row.strip().strip("|").split("|")
    match = re.search(r"`([^`]+)`", cells[0]) if cells else None
    return match.group(1) if match else None


def _run_key(run_dir: Path, runs_root: Path) -> str:
    try:
        return run_dir.resolve().relative_to(runs_root.resolve()).as_posix()
    except ValueError:
        return run_dir.as_posix()


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({type(e).__name__}); expected the run's resolved config") from None
    return data if isinstance(data, dict) else {}


def _three(section: dict, direction: str) -> str:
    values = [section.get(f"{direction}_r{k}") for k in (1, 5, 10)]
    if any(not isinstance(v, (int, float)) for v in values):
        return DASH
    return " / ".join(f"{v:.1f}" for v in values)


def _protocol(results: dict, config: dict) -> str:
    name = results.get("retrieval_protocol")
    k = (config.get("eval") or {}).get("k_test")
    words = PROTOCOLS.get(name, str(name) if name else "protocol not recorded").format(k=k)
    images, split = results.get("retrieval_images"), results.get("retrieval_split")
    return f"{words}, {images} {split} images" if images else words


def run_row(run_dir: str | os.PathLike, key: str) -> str:
    """The table row of one run directory (results.json and config.yaml)."""
    from vlp.compare import format_count, format_duration
    from vlp.eval.results import read_results

    run_dir = Path(run_dir)
    results = read_results(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    train = results.get("train") or {}
    model = results.get("model") or (config.get("model") or {}).get("name")
    params = train.get("parameters")
    what = f" ({model}, {format_count(params)} trained params)" if params else f" ({model})" if model else ""
    command = results.get("command")
    steps = train.get("steps", results.get("step"))
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    batch = data.get("batch_size")
    if isinstance(batch, int):
        batch *= int(trainer.get("accumulate_grad_batches") or 1)
    cells = [f"`{key}`{what}", f"`{command}`" if command else DASH,
             f"{steps} × {batch}" if steps is not None and batch else DASH,
             format_duration(train.get("wall_seconds")), _protocol(results, config),
             _three(results.get("retrieval") or {}, "txt"), _three(results.get("retrieval") or {}, "img")]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def find_runs(runs_root: str | os.PathLike = "runs") -> list[Path]:
    """Run directories below ``runs_root`` (one or two levels deep) that hold a results.json."""
    root = Path(runs_root)
    return sorted({p.parent for pattern in ("*/results.json", "*/*/results.json") for p in root.glob(pattern)})


def merge_rows(existing: list[str], generated: dict[str, str]) -> list[str]:
    """Generated rows replace the existing rows with their key, in place; the others are appended in order."""
    out, used = [], set()
    for row in existing:
        key = row_key(row)
        if key in generated:
            out.append(generated[key])
            used.add(key)
        else:
            out.append(row)
    return out + [row for key, row in generated.items() if key not in used]


def update_readme(readme: str | os.PathLike, generated: dict[str, str]) -> str:
    """README's text with the table between the markers rebuilt (header, kept and generated rows); written
    atomically."""
    from vlp.utils.io import atomic_write_text

    path = Path(readme)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; expected the README holding the results table") from None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReportError(f"{path}: expected one {BEGIN} line, then one {END} line around the results table")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    rows = [line for line in table.strip().splitlines() if line.startswith("|")][2:]  # after header + separator
    body = "\n".join([HEADER, *merge_rows(rows, generated)])
    new = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run directories (default: every runs/*/ and runs/*/*/ with retrieval results)")
    p.add_argument("--readme", default="README.md", help="the file holding the table (default: README.md)")
    p.add_argument("--runs-root", default="runs", help="where runs live; row keys are relative to it (default: runs)")


def run(args) -> int:
    from vlp.eval.results import read_results

    root = Path(args.runs_root)
    run_dirs = [Path(r) for r in args.runs] if args.runs else find_runs(root)
    generated: dict[str, str] = {}
    try:
        for run_dir in run_dirs:
            if not (run_dir / "results.json").is_file():
                raise ReportError(f"{run_dir / 'results.json'}: no such file; expected a run directory of "
                                  "vlp pretrain (results.json with retrieval results)")
            if not read_results(run_dir).get("retrieval"):
                print(f"skipped {run_dir}: no retrieval results in its results.json", file=sys.stderr)
                continue
            generated[_run_key(run_dir, root)] = run_row(run_dir, _run_key(run_dir, root))
        update_readme(args.readme, generated)
    except (ReportError, ValueError) as e:  # read_results raises ValueError naming the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {len(generated)} row(s) from runs: {', '.join(generated) or 'none'}")
    return 0


if __name__ == "__main__":  # `python -m vlp.report` (the Makefile's `make report`)
    parser = argparse.ArgumentParser(prog="vlp report", description=__doc__.splitlines()[0])
    add_args(parser)
    sys.exit(run(parser.parse_args()))
