"""Every registered model under DDP: 2 gloo ranks with half the batch each against one process on the whole batch.

DDP averages the ranks' gradients, so two ranks train as one process exactly when the single-process loss is the
mean of the ranks' losses. For each model (tests/_model_ddp_worker.py: one launch of 2 ranks for all of them) this
holds, and is checked loss by loss, for

* the losses that average per-row terms over the same count on every rank: MLM and MCR (two masked words, one
  masked tag per row), ITM over fixed pairs, UNITER's region losses (two masked regions per sample) and WRA, MVPTR's
  WPG (one phrase per text). With unequal counts per rank DDP's mean of the ranks' means weights the tokens
  differently from one process: a property of per-rank normalisation, not tested here;
* the contrastive losses whose keys are gathered from every rank with gradient: BridgeTower's ITC, MVPTR's VSC with
  ``vsc_gather: true``.

It does not hold, on purpose, for the losses the papers' code computes within each rank's batch: TCL's ``ita`` (CMA,
IMC and LMI against this rank's momentum keys; only the queue is gathered), MVPTR's VSC by default, and MVPTR's
ITM (the hardest negative of the rank's batch). For those the exact statement is that each rank's loss is the
single-process loss of its half, and the reference total and gradients use that. For the in-batch contrasts the
whole-batch value is checked to differ (for an InfoNCE with hard targets it is strictly larger: every query has
more negatives); MVPTR's mined ITM may pick the same pairs on the whole batch, so no difference is asserted there.

Random parts are fixed, because under training they cannot be equal: ``StepSeeding`` and ``step_generator`` draw
from (seed, step, rank, ...), and a draw over B/2 rows is not half of a draw over B rows (dropout masks,
``torch.multinomial`` ITM negatives, BridgeTower's swap permutation, UNITER's ITM labels and region masks, MVPTR's
ITM permutation and WPG choices). So dropout is 0 and every draw comes in the batch as a function of the row's
global index (the worker's ``rows``); with the draws fixed, everything else is deterministic.

Tolerances: losses rtol 1e-5 (atol 1e-6). Gradients, per parameter tensor: rtol 1e-5 with atol 1e-5 x that
tensor's largest reference magnitude + 1e-9 x the model's largest (measured: at most 6.3e-6 of a tensor's scale;
the floor covers gradients that are 0 in exact arithmetic and hold ~1e-11 of rounding, such as attention key
biases, which softmax ignores). The two ranks' averaged gradients are bitwise equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from _ranks import launch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_model_ddp_worker.py")
WORLD = 2
# Per-rank losses whose whole-batch value must differ (more negatives per query). Not MVPTR's ITM: its mined pairs
# may all lie on the same rank anyway, and at initialisation the ITM loss is about log 2 whatever the pairs.
IN_BATCH_CONTRAST = {"ita", "vsc"}


def _load_worker():
    spec = importlib.util.spec_from_file_location("_vlp_model_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()  # torch only at import; the models are imported in the rank processes
CASES = list(worker.CASES)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(WORKER, tmp_path_factory.mktemp("model_ddp"), WORLD)


def reference(results, case: str) -> dict:
    """The single-process values (computed by rank ``index % WORLD`` before the process group existed)."""
    return results[CASES.index(case) % WORLD]["reference"][case]


def ranks(results, case: str) -> list[dict]:
    return [res["ddp"][case] for res in results]


def close(actual, expected, what: str, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_every_registered_model_has_a_case(results):
    assert sorted({name for name, _, _ in worker.CASES.values()}) == results[0]["registered"]


@pytest.mark.parametrize("case", CASES)
def test_every_loss_is_the_ranks_mean_or_per_rank_by_design(results, case):
    ref, rs = reference(results, case), ranks(results, case)
    per_rank = worker.CASES[case][2]
    assert set(rs[0]["losses"]) == set(ref["whole"]) and ref["whole"], (sorted(rs[0]["losses"]), sorted(ref["whole"]))
    for name, whole in ref["whole"].items():
        values = [r["losses"][name] for r in rs]
        if name in per_rank:
            for rank, value in enumerate(values):
                close(value, ref["halves"][rank][name], f"{case} {name}: rank {rank} vs its half in one process")
            if name in IN_BATCH_CONTRAST:
                assert abs(float(torch.stack(values).mean() - whole)) > 1e-3, \
                    f"{case} {name}: per-rank by design, yet equal to the whole batch's value {float(whole)}"
        else:
            close(torch.stack(values).mean(), whole, f"{case} {name}: mean over ranks vs the whole batch")
    totals = torch.stack([r["total"] for r in rs])
    close(totals.mean(), ref["total"], f"{case} total: mean over ranks vs one process")
    # The ranks see different rows: their own totals differ, so the comparisons above are not vacuous.
    assert abs(float(totals[0] - totals[1])) > 1e-4, totals


@pytest.mark.parametrize("case", CASES)
def test_ddp_averaged_gradients_equal_the_single_process_gradients(results, case):
    ref, rs = reference(results, case), ranks(results, case)
    assert set(rs[0]["grads"]) == set(ref["grads"])
    missing = [k for k, g in ref["grads"].items() if torch.isnan(g).any()]
    assert not missing, f"{case}: no gradient reaches {missing}"
    largest = max(float(g.abs().max()) for g in ref["grads"].values())
    assert largest > 0
    for name, expected in ref["grads"].items():
        assert torch.equal(rs[0]["grads"][name], rs[1]["grads"][name]), f"{case} {name}: ranks differ after DDP"
        atol = 1e-5 * float(expected.abs().max()) + 1e-9 * largest
        close(rs[0]["grads"][name], expected, f"{case} grad {name}", rtol=1e-5, atol=atol)


def test_tcl_queue_and_momentum_after_one_step(results):
    """The queue is filled with the momentum features gathered in rank order, so after one step it holds exactly
    the single process's features of the whole batch, on every rank (buffers are not broadcast); after one SGD step
    with the averaged gradients, the momentum update gives the single process's twins."""
    ref, rs = reference(results, "tcl"), ranks(results, "tcl")
    queue = [k for k in ref["state"] if k.startswith("buffer:queue.")]
    twins = [k for k in ref["state"] if k.startswith("frozen:momentum.")]
    assert len(queue) == 3 and twins, sorted(ref["state"])
    assert int(ref["state"]["buffer:queue.queue_ptr"]) == worker.GLOBAL_B  # one global batch enqueued
    for key in ref["state"]:
        assert torch.equal(rs[0]["state"][key], rs[1]["state"][key]), f"tcl {key}: ranks differ"
        close(rs[0]["state"][key], ref["state"][key], f"tcl {key}: DDP vs one process")
    # the first global batch of slots holds new features, the rest is still the initial queue
    b, before = worker.GLOBAL_B, ref["state_before"]
    for key in ("buffer:queue.image_queue", "buffer:queue.text_queue"):
        assert not torch.isclose(ref["state"][key][:, :b], before[key][:, :b]).any(), key
        assert torch.equal(ref["state"][key][:, b:], before[key][:, b:]), key
    assert all(not torch.equal(ref["state"][k], before[k]) for k in twins), "the momentum update moved nothing"


def test_mvptr_vsc_is_per_rank_by_default_and_gathered_with_vsc_gather(results):
    """MVPTR's VSC contrasts within each rank's batch (official): each rank's value is its half's, and below the
    whole batch's (fewer negatives per query). ``vsc_gather: true`` contrasts against every rank's batch: the
    mean over ranks is the whole batch's VSC."""
    default, gathered = reference(results, "mvptr"), reference(results, "mvptr_vsc_gather")
    local = torch.stack([r["losses"]["vsc"] for r in ranks(results, "mvptr")])
    close(local, torch.stack([h["vsc"] for h in default["halves"]]), "vsc per rank vs each half")
    assert float(local.mean()) < float(default["whole"]["vsc"]) - 1e-3
    close(default["whole"]["vsc"], gathered["whole"]["vsc"], "one process: the option changes nothing")
    glob = torch.stack([r["losses"]["vsc"] for r in ranks(results, "mvptr_vsc_gather")])
    close(glob.mean(), gathered["whole"]["vsc"], "vsc_gather: mean over ranks vs the whole batch")
    assert (glob > local).all(), (glob, local)
