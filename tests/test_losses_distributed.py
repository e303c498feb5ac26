"""2-rank gloo parity of the contrastive loss: local-vs-global loss with gathered keys equals the whole batch.

Two ranks hold half the batch each; the mean of their losses and the gradients w.r.t. each rank's input features
(with DDP's 1/world averaging) must equal the single-process loss and gradients on the whole batch (1e-5).

The ranks run as plain subprocesses of tests/_dist_worker.py (``tests/_ranks.py``: no launcher variables in their
environment, a FileStore in a temp directory, so no port is needed and nothing leaks into later tests).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from _ranks import launch

WORKER = Path(__file__).with_name("_dist_worker.py")
WORLD = 2


def _load_worker():
    spec = importlib.util.spec_from_file_location("_vlp_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return launch(WORKER, tmp_path_factory.mktemp("dist_losses"), WORLD, timeout=120)


@pytest.mark.parametrize("case", ["plain_symmetric", "queue_soft", "ids_symmetric"])
def test_gathered_info_nce_matches_single_process(dist_results, case):
    worker = _load_worker()
    batch = worker.make_global_batch()
    single = worker.run_cases(batch, 0, worker.GLOBAL_B, 1)[case]
    ranks = [res[case] for res in dist_results]

    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, single["loss"], atol=1e-5, rtol=0)
    # The ranks see different queries, so their own losses differ (the comparison above is not vacuous).
    assert abs(ranks[0]["loss"].item() - ranks[1]["loss"].item()) > 1e-4
    for key in ("q_grad", "k_grad"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), single[key], atol=1e-5, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["t_grad"], single["t_grad"], atol=1e-5, rtol=1e-5)


def test_gather_no_grad_and_global_hard_negatives(dist_results):
    worker = _load_worker()
    batch = worker.make_global_batch()
    for res in dist_results:
        torch.testing.assert_close(res["gather_no_grad"]["value"], batch["q"], atol=0, rtol=0)
        assert not bool(res["gather_no_grad"]["requires_grad"])
    # Global indices, in rank order; same-id candidates on the other rank (scored 50) were never drawn.
    expected = [5, 7, 3, 2, 1, 0, 4, 6]
    assert torch.cat([res["global_hard"]["neg_img"] for res in dist_results]).tolist() == expected
    assert torch.cat([res["global_hard"]["neg_txt"] for res in dist_results]).tolist() == expected
