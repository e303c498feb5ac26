"""Elastic resume (DESIGN §7): a position saved under one topology (ranks x workers x batch size) resumes on another
over the same data with nothing repeated, every sample decoded as the uninterrupted run would have, and only the
reported remainder (less than one global batch) dropped; positions over other data fall back to the same fraction.
The last test runs it end to end: Lightning DDP on 2 gloo ranks, resumed on 1 process, resumed again on 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from _elastic_worker import sample_ids
from _resume_shards import caption_texts, make_shards
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
from vlp.data.stream import Hop, resume_position
from vlp.data.tokenizer import train_wordpiece

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    texts = caption_texts() + [f"ball number {i} caption {j}" for i in range(200) for j in range(3)]
    train_wordpiece(texts, root / "a" / "tokenizer", vocab_size=160)
    a = make_shards(root / "a", [10, 10, 7, 5, 8, 9], tokenizer="tokenizer")  # 49 samples
    b = make_shards(root / "b", [7, 6, 4], source="vg", start=100)  # 17 samples
    return {"a": str(a), "b": str(b)}


def make_cfg(world, **kw):
    base = dict(train=[SourceConfig(world["a"], 1.0), SourceConfig(world["b"], 1.5)], batch_size=3, image_size=16,
                augment="albef", two_views=False, hflip=True, num_workers=0, seed=7)
    base.update(kw)
    return ShardsDataConfig(**base)


def streams(world, world_size, workers, batch_size, **kw):
    cfg = make_cfg(world, num_workers=workers, batch_size=batch_size, **kw)
    tok = ShardDataModule(cfg).tokenizer
    return [ShardDataModule(cfg, tokenizer=tok, rank=r, world_size=world_size).build_train_stream()
            for r in range(world_size)]


def samples(batch) -> list[tuple]:
    """Each sample of a batch with what it was decoded and augmented into: a change of seed shows up here."""
    def unpadded(ids):  # (a batch pads to its longest caption)
        ids = ids.tolist()
        while ids and ids[-1] == 0:
            ids.pop()
        return tuple(ids)

    return [(key, cap, round(float(batch["image"][i].double().sum()), 4), unpadded(batch["mlm_input_ids"][i]))
            for i, (key, cap) in enumerate(zip(batch["keys"], batch["captions"]))]


def play(stream, stop=None):
    """The batches of one rank's loader from the stream's current position (``stop``: at most that many)."""
    out = []
    for b in DataLoader(stream, batch_size=None, num_workers=stream.num_workers):
        out.append(b)
        if stop is not None and len(out) == stop:
            break
    return out


def epoch_samples(world, epoch, topology, **kw) -> Counter:
    got = Counter()
    for s in streams(world, *topology, **kw):
        s.set_epoch(epoch)
        for b in play(s):
            got.update(samples(b))
    return got


def hop(world, state, topology, **kw):
    """Resume ``state`` on ``topology``: the new ranks' streams, positioned, and the warning's dropped count."""
    new = streams(world, *topology, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in new:
            s.load_state_dict(state)
    messages = [str(w.message) for w in caught]
    assert messages and all("elastic resume" in m for m in messages), messages
    m = re.search(r"(\d+) sample\(s\) of the epoch's remainder", messages[0])
    return new, int(m.group(1)) if m else 0


# (world size, workers, batch size) before -> after; the last: the stream is also resampled
CHANGES = [((1, 0, 3), (2, 0, 3)), ((2, 0, 3), (1, 0, 3)), ((2, 2, 3), (1, 0, 4)), ((1, 2, 2), (3, 2, 3)),
           ((3, 0, 2), (2, 2, 5))]


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("before,after", CHANGES)
def test_elastic_resume_continues_the_epoch_over_the_new_ranks(world, before, after, resampled):
    epoch = 1
    full = epoch_samples(world, epoch, before, resampled=resampled)
    old = streams(world, *before, resampled=resampled)
    p = len(old[0]) // 2 + 1  # odd: rank loaders stopped after a worker-1 batch
    consumed = Counter()
    for s in old:
        s.set_epoch(epoch)
        for b in play(s, stop=p):
            consumed.update(samples(b))
    state = old[0].state_dict(batches=p)
    new, dropped = hop(world, state, after, resampled=resampled)
    assert {len(s) for s in new} == {len(new[0])} and len(new[0]) > p
    rest = Counter()
    for s in new:
        got = play(s)
        assert [b["stream_state"]["index"] for b in got] == list(range(p, len(s)))  # every rank: the same count
        for b in got:
            rest.update(samples(b))
    # (as multisets: resampled slots may draw the same shard, and so the same sample, twice in one epoch)
    assert resampled or max(full.values()) == 1
    assert not (consumed + rest) - full, "a sample repeated, or one the uninterrupted epoch does not have"
    missing = sum((full - consumed - rest).values())
    S, B = after[0] * max(1, after[1]), after[2]
    assert missing == dropped < S * B
    # the next epoch is the new topology's normal epoch
    for s in new:
        s.set_epoch(epoch + 1)
    assert sum((Counter(x for s in new for b in play(s) for x in samples(b))).values()) == \
        sum(epoch_samples(world, epoch + 1, after, resampled=resampled).values())


def test_hops_nest_and_a_resume_on_the_same_topology_continues_them(world):
    """2 ranks -> 1 -> 3: the second cut is of what the first left; resuming the 3-rank state on 3 ranks again
    continues it (no third hop)."""
    epoch, full = 0, epoch_samples(world, 0, (2, 0, 2))
    consumed = Counter()
    old = streams(world, 2, 0, 2)
    for s in old:
        s.set_epoch(epoch)
        for b in play(s, stop=3):
            consumed.update(samples(b))
    one, dropped1 = hop(world, old[0].state_dict(batches=3), (1, 0, 3))
    p2 = len(one[0]) - 4
    for b in play(one[0], stop=p2 - 3):
        consumed.update(samples(b))
    state = one[0].state_dict(batches=p2)
    assert state["hops"] == [[2, 1, 2, 3]]
    three, dropped2 = hop(world, state, (3, 0, 1))
    assert [h.as_list() for h in three[0].hops] == [[2, 1, 2, 3], [1, 1, 3, p2 - 3]]
    again = streams(world, 3, 0, 1)
    mid = three[0].state_dict(batches=p2 + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same topology: no warning, no new hop
        for s in again:
            s.load_state_dict(mid)
    assert again[0].hops == three[0].hops and again[0].start_batch == p2 + 1
    rest = Counter(x for s in three for b in play(s) for x in samples(b))
    assert max(full.values()) == 1 and not (consumed + rest) - full
    assert sum((full - consumed - rest).values()) == dropped1 + dropped2


def test_the_remainder_cut_is_arithmetic_and_the_same_on_every_rank(world):
    """A pure function of the saved position: a new rank computes its part without the others and without
    reading (the ranks' ranges tile the concatenated tails exactly)."""
    s = streams(world, 3, 0, 2)[0]
    hops = (Hop(2, 2, 3, 5),)
    plan = s.plan(0, hops)
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == plan.cum[-1]
    assert all(a[1] == b[0] for a, b in zip(plan.ranges, plan.ranges[1:]))
    old = streams(world, 2, 2, 3)[0].layout
    tails = old.S * old.batches_per_worker * old.batch_size - old.batch_size * 5 * old.world_size
    assert plan.cum[-1] == tails
    assert len(plan.ranges) == 3 and s.epoch_length(0, hops) == 5 + plan.batches_per_worker


def test_a_position_over_other_data_resumes_at_the_same_fraction_with_a_warning(world):
    a = streams(world, 1, 0, 3)[0]
    b = streams(world, 2, 0, 3, seed=8)[1]
    state = a.state_dict(batches=10)
    with pytest.warns(UserWarning, match="exact resume is impossible"):
        epoch, batches, hops = resume_position(b, state)
    assert (epoch, hops) == (0, ()) and batches == 10 * len(b) // len(a)


def test_a_position_at_the_end_of_its_epoch_continues_with_the_next(world):
    a = streams(world, 2, 0, 3)[0]
    b = streams(world, 1, 0, 3)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume_position(b, a.state_dict(batches=len(a))) == (1, 0, ())
        assert resume_position(a, a.state_dict(batches=len(a))) == (1, 0, ())


# ---------------------------------------------------------------------------------------------------------------------
# end to end: Lightning DDP on 2 gloo ranks -> 1 process -> 2 ranks


E2E = dict(augment="none", two_views=False, hflip=False)  # tests/_elastic_worker.py's data


def _fit(world, out, tag, devices, workers, max_steps, ckpt=None):
    from _tiny_runs import subprocess_env

    args = {"a": world["a"], "b": world["b"], "out": str(out), "tag": tag, "devices": devices, "workers": workers,
            "max_steps": max_steps, "ckpt": None if ckpt is None else str(ckpt)}
    proc = subprocess.run([sys.executable, str(HERE / "_elastic_worker.py"), json.dumps(args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads((out / f"{tag}.rank{r}.json").read_text())["steps"] for r in range(devices)]
    return steps, proc.stderr


def _elastic_epoch(world, ckpt: Path, topology):
    """(epoch, start batch, epoch length) that ``topology`` resumes ``ckpt``'s data position at."""
    import torch

    state = torch.load(ckpt, weights_only=True)["ShardDataModule"]
    s = streams(world, *topology, **E2E)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epoch, p, hops = resume_position(s, state)
    return epoch, p, s.epoch_length(epoch, hops)


def _pairs(steps, epoch=None) -> Counter:
    return Counter((k, c, tuple(ids)) for e, batch in steps if epoch is None or e == epoch for k, c, ids in batch)


def _normal_epoch(world, epoch, topology) -> list[list]:
    """Each rank's (key, caption) batches of a normal ``epoch`` on ``topology``."""
    out = []
    for s in streams(world, *topology, **E2E):
        s.set_epoch(epoch)
        out.append([sample_ids(b) for b in play(s)])
    return out


def test_lightning_ddp_run_resumes_elastically_on_one_process_and_back(world, tmp_path):
    full0 = Counter({(k, c, ids): n for (k, c, _, ids), n in epoch_samples(world, 0, (2, 2, 3), **E2E).items()})
    assert max(full0.values()) == 1
    # A: 2 DDP ranks x 2 workers, 3 steps
    a, _ = _fit(world, tmp_path, "a", devices=2, workers=2, max_steps=3)
    consumed = sum((_pairs(r) for r in a), Counter())
    # B: one process without workers from A's step 3, through the rest of epoch 0 and the whole of epoch 1
    e, p, le = _elastic_epoch(world, tmp_path / "ckpt_a" / "step=3.ckpt", (1, 0, 3))
    assert (e, p) == (0, 3)
    n1 = len(streams(world, 1, 0, 3)[0])
    (b,), err = _fit(world, tmp_path, "b", devices=1, workers=0, max_steps=le + n1,
                     ckpt=tmp_path / "ckpt_a" / "step=3.ckpt")
    assert "elastic resume of epoch 0" in err
    assert [e for e, _ in b] == [0] * (le - 3) + [1] * n1  # and the epoch after the elastic one is a whole one
    assert not (consumed + _pairs(b, 0)) - full0  # nothing repeated, nothing new
    assert [batch for e, batch in b if e == 1] == _normal_epoch(world, 1, (1, 0, 3))[0]
    # C: back on 2 ranks from B's checkpoint in the middle of its elastic epoch (the hops nest), into epoch 1
    mid = 3 + (le - 3) // 2
    e, p, lc = _elastic_epoch(world, tmp_path / "ckpt_b" / f"step={mid}.ckpt", (2, 0, 3))
    assert (e, p) == (0, mid)
    n2 = len(streams(world, 2, 0, 3)[0])
    c, err = _fit(world, tmp_path, "c", devices=2, workers=0, max_steps=lc + n2,
                  ckpt=tmp_path / "ckpt_b" / f"step={mid}.ckpt")
    assert "elastic resume of epoch 0" in err
    consumed += _pairs(b[: mid - 3])
    rest = sum((_pairs(r, 0) for r in c), Counter())
    assert not (consumed + rest) - full0
    assert sum(rest.values()) == 2 * 3 * (lc - mid)
    assert [[batch for e, batch in r if e == 1] for r in c] == _normal_epoch(world, 1, (2, 0, 3))
