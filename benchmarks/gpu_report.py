"""``benchmarks/gpu.sh``'s last step: one JSON (``gpu.json``) from what the script measured -- the train-step rows of
``train_step.py``, the test suite's JUnit XML (or the reason it did not run) -- with the MFU goal checked (>= 40 %
for TCL-base and BridgeTower-base pre-training, the best configuration of each) and a short table printed.

    python benchmarks/gpu_report.py --train-step T.json [--junit J.xml | --tests-skipped REASON] --tests-rc N
        --tests-command CMD --budget-s 480 --wall-s S [--dry-run] --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from _common import write_json

MFU_GOAL = 0.40
MFU_GOAL_MODELS = ("tcl", "bridgetower")


def junit_counts(path: Path) -> dict:
    """Totals of a pytest JUnit XML file: tests, failures, errors, skipped, passed, seconds."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    return total


def mfu_goal(runs: list[dict]) -> dict:
    """Per goal model: the best MFU over its measured rows and whether it reaches :data:`MFU_GOAL`."""
    out = {}
    for name in MFU_GOAL_MODELS:
        measured = [r for r in runs if r["model"] == name and r.get("mfu") is not None]
        best = max(measured, key=lambda r: r["mfu"], default=None)
        out[name] = {"goal": MFU_GOAL, "best_mfu": best and best["mfu"], "met": bool(best and best["mfu"] >= MFU_GOAL),
                     "best_config": best and {k: best[k] for k in ("size", "precision", "compile", "batch")}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-step", type=Path, required=True)
    p.add_argument("--train-step-rc", type=int, default=0)
    p.add_argument("--junit", type=Path)
    p.add_argument("--tests-skipped", help="why the test suite did not run")
    p.add_argument("--tests-rc", type=int)
    p.add_argument("--tests-command", default="")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--wall-s", type=float, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.train_step.is_file():
        raise SystemExit(f"{args.train_step}: train_step.py wrote no results (rc {args.train_step_rc})")
    train = json.loads(args.train_step.read_text())
    tests: dict = {"command": args.tests_command, "rc": args.tests_rc}
    if args.tests_skipped:
        tests["skipped"] = args.tests_skipped
    elif args.junit is not None and args.junit.is_file():
        tests.update(junit_counts(args.junit))
        tests["timed_out"] = args.tests_rc in (124, 137)  # `timeout` stopped it: the counts are what finished
    else:
        tests["skipped"] = f"no JUnit file at {args.junit} (pytest rc {args.tests_rc})"
    result = {"machine": train["machine"], "dry_run": args.dry_run, "budget_s": args.budget_s,
              "wall_s": round(args.wall_s, 1), "within_budget": args.wall_s <= args.budget_s,
              "train_step_rc": args.train_step_rc, "settings": train["settings"], "runs": train["runs"],
              "mfu_goal": mfu_goal(train["runs"]), "tests": tests}
    write_json(args.out, result)
    print(f"{'model':12s} {'prec':5s} {'compile':8s} {'samples/s':>10s} {'MFU':>7s} {'peak MiB':>9s}")
    for r in train["runs"]:
        if "samples_per_s" in r:
            print(f"{r['model']:12s} {r['precision']:5s} {str(r['compile']):8s} {r['samples_per_s']:10.1f} "
                  f"{r['mfu'] if r['mfu'] is not None else float('nan'):7.3f} {r['peak_mem_mib']:9.0f}")
        else:
            print(f"{r['model']:12s} {r['precision']:5s} {str(r['compile']):8s} {r.get('error') or r.get('skipped')}")
    print(f"tests: {json.dumps({k: v for k, v in tests.items() if k != 'command'})}")
    print(f"wrote {args.out} (wall {args.wall_s:.0f} s of {args.budget_s:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
