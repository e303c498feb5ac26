"""FSDP2 (``trainer.strategy: fsdp2``, vlp.utils.fsdp) on 2 gloo ranks.

One launch of tests/_fsdp_worker.py covers every registered model: the parameters are really sharded, and on the same
global batch the losses, the gathered gradients and the weights after two AdamW steps (momentum twins included)
equal DDP's (UNITER also with one sampled task per step); TCL's feature queue is the same on both ranks and equal to DDP's; a bf16-mixed step runs. Then a
``vlp pretrain`` of TCL under fsdp2 on 2 ranks, resumed from its step-2 checkpoint, ends exactly where the
uninterrupted run ends.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from _ranks import launch
from _tiny_runs import ROOT, compare_runs, load, subprocess_env, tiny_experiment, vlp_command
from vlp.models import MODELS

pytestmark = pytest.mark.slow

WORLD = 2
TOL = dict(atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch(Path(__file__).with_name("_fsdp_worker.py"), tmp_path_factory.mktemp("fsdp"), WORLD, timeout=300)


@pytest.mark.parametrize("name", [*sorted(MODELS), "uniter-sampled"])  # + UNITER's one task per step, as trained
def test_fsdp2_shards_and_equals_ddp(ranks, name):
    for rank, res in enumerate(ranks):
        r = res[name]
        # every rank holds about half of the elements (dim 0 split in two, padded where odd)
        assert r["local_numel"] < 0.6 * r["full_numel"], (rank, r["local_numel"], r["full_numel"])
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(r["loss_ref"]), **TOL)
        # Float tolerance: a block run twice in a step (BridgeTower's vision tower) has its two gradient parts
        # reduced apart under FSDP2, summed first under DDP (measured: 5e-6; TCL, UNITER, MVPTR: bitwise equal).
        for step, (diff, where) in enumerate(r["grad_diff"]):
            assert diff <= 2e-5, f"rank {rank} step {step}: gradient of {where} differs from DDP's by {diff:g}"
        # a tenth of one AdamW step at lr 1e-3 (measured: 1.7e-5); a wrong update would be off by about 1e-3
        diff, where = r["param_diff"]
        assert diff <= 1e-4, f"rank {rank}: after two steps {where} differs from DDP's by {diff:g}"
    # the ranks saw different halves of the batch
    assert ranks[0][name]["loss"] != ranks[1][name]["loss"]


def test_tcl_queue_is_identical_on_every_rank_and_equals_ddp(ranks):
    queues = [res["tcl"]["queue"] for res in ranks]
    assert int(queues[0]["queue_ptr"]) == 0  # two global batches of 4 written into 8 slots: wrapped around
    for key in queues[0]:
        assert torch.equal(queues[0][key], queues[1][key]), key
        torch.testing.assert_close(queues[0][key], ranks[0]["tcl"]["queue_ref"][key], **TOL)


def test_bf16_mixed_step(ranks):
    for res in ranks:
        r = res["bf16"]
        assert r["grads_finite"]
        assert r["param_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]  # shards, fp32 reduce
        assert r["loss_bf16"] != r["loss_fp32"]  # really computed in bf16 ...
        assert abs(r["loss_bf16"] - r["loss_fp32"]) < 0.03 * r["loss_fp32"]  # ... to bf16's precision


def test_fsdp2_resolves_to_data_parallel_model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from vlp.config import TrainerConfig
    from vlp.train import _strategy

    strategy = _strategy(TrainerConfig(strategy="fsdp2", rendezvous_timeout_s=42.0))
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._timeout.total_seconds() == 42.0 and strategy._save_distributed_checkpoint is False


def test_zero_d_parameters_are_refused_with_their_names():
    from torch import nn

    from vlp.utils.fsdp import shard_model

    module = nn.Module()
    module.scale = nn.Parameter(torch.tensor(1.0))
    module.layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"FSDP2 cannot shard 0-d parameters \['scale'\] of Module"):
        shard_model(module, [module.layer])


def test_mvptr_logit_scale_is_a_vector_and_a_0d_one_still_loads():
    from vlp.models.mvptr import MVPTR, MVPTRConfig

    model = MVPTR(MVPTRConfig.tiny())
    assert model.logit_scale.shape == (1,) and model.scale().shape == ()
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(2.5)  # the official file's (and older checkpoints') 0-d value
    model.load_state_dict(state)
    assert model.logit_scale.shape == (1,) and float(model.logit_scale.detach()) == 2.5


MAX_STEPS, EVERY = 4, 2


def test_cli_fsdp2_two_ranks_resume_equals_uninterrupted_run(shapes_shards, tmp_path):
    """``vlp pretrain`` (TCL, with a queue) under fsdp2 on 2 gloo ranks, saving steps 2 and 4; the same run stopped
    after its step-2 checkpoint (the later ones removed) and restarted ends where the uninterrupted one ends."""
    exp = tiny_experiment("tcl", tmp_path, shapes_shards, queue_size=16, max_steps=MAX_STEPS,
                          checkpoint_every_n_steps=EVERY, devices=2, strategy="fsdp2")
    cmd = vlp_command("pretrain", str(exp), "data.num_workers=0", "name=ref", "--no-eval")

    def run(args):
        out = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    run(cmd)
    ref, resumed = tmp_path / "ref", tmp_path / "run"
    ckpt = load(ref / "checkpoints" / f"step{EVERY:07d}.ckpt")
    # one file with the full (gathered) state, as every other strategy writes
    assert ckpt["state_dict"]["momentum.vision.vit.pos_embed"].shape == ckpt["state_dict"]["vision.vit.pos_embed"].shape
    shutil.copytree(ref, resumed)
    for name in ("last.ckpt", f"step{MAX_STEPS:07d}.ckpt"):
        (resumed / "checkpoints" / name).unlink()
    assert "resuming from" in run([a if a != "name=ref" else "name=run" for a in cmd])
    res = compare_runs(ref, resumed)
    assert res["steps"] == (MAX_STEPS, MAX_STEPS)
    for part in ("state_dict", "optimizer_states", "lr_schedulers"):
        diff, n, differ = res[part]
        assert not differ, f"{part}: {len(differ)} of {n} entries differ (max |diff| {diff:g}), e.g. {differ[:5]}"
    assert not res["metrics_differ"], res["metrics_differ"][:10]
