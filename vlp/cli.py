"""The ``vlp`` command. Each subcommand is a thin layer over a module that does the work.

Subcommands register themselves in ``COMMANDS``: a function adding its arguments and a function running it. Heavy
imports (torch, lightning) happen inside the runners, so ``vlp --help`` is instant.

An error a user can fix (config, data, checkpoint, trainer settings, recipe input, stall, non-finite loss) is one
``error: ...`` line on stderr and a non-zero exit status (``vlp.errors.user_error``); ``vlp --debug COMMAND`` shows
its full traceback instead. Ctrl-C during training says at which step the run stopped and that the same command
resumes it, and exits with 130 (128 + SIGINT, what a shell reports for a process ended by Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (may use base: includes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. trainer.devices=2")


# -- vlp config -------------------------------------------------------------------------------------------------------
def _run_config(args) -> int:
    from omegaconf import OmegaConf

    from vlp import config

    cfg = config.load(args.config, args.overrides)
    print(OmegaConf.to_yaml(OmegaConf.create(config.to_dict(cfg))), end="")
    return 0


# -- vlp data ---------------------------------------------------------------------------------------------------------
def _recipes() -> list[str]:
    import data_recipes

    return sorted(m.name for m in pkgutil.iter_modules(data_recipes.__path__) if not m.name.startswith("_"))


def _run_data(args) -> int:
    if args.recipe not in _recipes():
        print(f"unknown recipe {args.recipe!r}; available: {', '.join(_recipes())}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"data_recipes.{args.recipe}")
    return module.main(args.recipe_args) or 0


# -- vlp pretrain / finetune / evaluate -------------------------------------------------------------------------------
def _run_pretrain(args) -> int:
    from vlp import config
    from vlp.train import pretrain

    cfg = config.load(args.config, args.overrides)
    run_dir = pretrain(cfg, evaluate_after=not args.no_eval)
    print(f"run directory: {run_dir}")
    return 0


def _run_finetune(args) -> int:
    from vlp import config
    from vlp.train import finetune

    cfg = config.load(args.config, args.overrides)
    run_dir = finetune(cfg, evaluate_after=not args.no_eval)
    print(f"run directory: {run_dir}")
    return 0


def _run_evaluate(args) -> int:
    from vlp import config
    from vlp.train import evaluate

    evaluate(config.load(args.config, args.overrides))
    return 0


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the retrieval evaluation after training")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation on eval.split after training")


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    from vlp.convert import cli as convert_cli

    convert_cli.add_args(p)


def _run_convert(args) -> int:
    from vlp.convert import cli as convert_cli

    return convert_cli.run(args) or 0


COMMANDS = {
    "pretrain": (
        "pre-train a model (resumes from the run's last checkpoint when there is one)",
        _add_pretrain_args,
        _run_pretrain,
    ),
    "finetune": (
        "fine-tune a pre-trained checkpoint on a downstream task (data.task: vqa): vlp finetune CONFIG ckpt=PATH "
        "[key=value ...]; resumes from the run's last checkpoint when there is one",
        _add_finetune_args,
        _run_finetune,
    ),
    "evaluate": (
        "evaluate a checkpoint (ckpt=PATH, default: the run's last.ckpt) on the test split",
        _add_config_args,
        _run_evaluate,
    ),
    "config": (
        "print the resolved, validated config of an experiment",
        _add_config_args,
        _run_config,
    ),
    "convert": (
        "convert an official or transformers checkpoint into a vlp checkpoint (vlp convert KIND SRC DST)",
        _add_convert_args,
        _run_convert,
    ),
    "data": (
        "run a data recipe: vlp data <recipe> --help (same as python -m data_recipes.<recipe>)",
        lambda p: (p.add_argument("recipe"), p.add_argument("recipe_args", nargs=argparse.REMAINDER)),
        _run_data,
    ),
}


# -- vlp compare (vlp/compare.py) -------------------------------------------------------------------------------------
def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of vlp pretrain / vlp finetune")
    p.add_argument("--out", default="reports/compare", help="report directory (default: reports/compare)")


def _run_compare(args) -> int:
    from vlp.compare import CompareError, compare

    try:
        report = compare(args.runs, out=args.out)
    except CompareError as e:  # one line naming the run directory's missing or invalid file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table, end="")
    print(f"wrote {', '.join(str(p) for p in report.paths)}")
    return 0


COMMANDS["compare"] = (
    "compare runs: a Markdown table (R@K or VQA score, steps, wall time, parameters, samples/s) and loss / R@1 plots "
    "in --out (compare.md, losses.png, r_at_1.png)",
    _add_compare_args,
    _run_compare,
)


# -- vlp report (vlp/report.py) --------------------------------------------------------------------------------------
from vlp import report as _report  # noqa: E402  (light: argparse, re, pathlib only)

COMMANDS["report"] = (
    "rewrite README's results table from the runs' results.json (vlp report [RUN_DIR...] [--readme FILE])",
    _report.add_args,
    _report.run,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="Vision-language pre-training experiments.")
    parser.add_argument("--debug", action="store_true",
                        help="show an error's full traceback instead of its one-line message (same as VLP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


# Warnings that Lightning prints for choices we made on purpose (a sized IterableDataset is what makes resume exact;
# no validation_step during pre-training), and a deprecation inside Lightning itself: noise for a user.
_BENIGN_WARNINGS = (
    r".*IterableDataset.*has `__len__` defined.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*You passed in a `val_dataloader` but have no `validation_step`.*",
)

INTERRUPTED = 130  # 128 + SIGINT


def main(argv: list[str] | None = None) -> int:
    import warnings

    from vlp.errors import DEBUG_ENV

    for pattern in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = build_parser().parse_args(argv)
    before = os.environ.get(DEBUG_ENV)
    if args.debug:  # in the environment, so that DDP ranks and recipe workers started by this run see it too
        os.environ[DEBUG_ENV] = "1"
    try:
        return _run_reporting_errors(args)
    finally:  # an in-process caller (tests, notebooks) gets its environment back
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


def _run_reporting_errors(args) -> int:
    from vlp.errors import debug_enabled, user_error
    from vlp.utils.interrupt import RunInterrupted

    try:
        return COMMANDS[args.command][2](args)
    except RunInterrupted as e:  # at which step, and from which checkpoint the same command resumes
        if debug_enabled():
            raise
        if e.rank == 0:
            print(str(e), file=sys.stderr, flush=True)
        return INTERRUPTED
    except KeyboardInterrupt:  # outside training (start-up, evaluation, a recipe): nothing to resume
        if debug_enabled():
            raise
        print(f"stopped by Ctrl-C (vlp {args.command})", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as e:
        found = None if debug_enabled() else user_error(e)
        if found is None:  # a bug, or --debug: the traceback
            raise
        line, status = found
        print(line, file=sys.stderr, flush=True)
        return status
