"""Exact resume of the training stream (DESIGN §7): restoring a position yields exactly the batches the
uninterrupted run would have produced next; resuming decodes nothing it skips; and a real Lightning checkpoint
written mid-epoch resumes onto exactly the remaining samples."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from _resume_shards import caption_texts, make_shards
from vlp.data.collate import SampleProcessor
from vlp.data.config import ShardsDataConfig, SourceConfig
from vlp.data.datamodule import ShardDataModule
from vlp.data.stream import ShardReader
from vlp.data.tokenizer import train_wordpiece


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    texts = caption_texts() + [f"ball number {i} caption {j}" for i in range(200) for j in range(3)]
    train_wordpiece(texts, root / "a" / "tokenizer", vocab_size=160)
    a = make_shards(root / "a", [10, 10, 7, 5, 8], tokenizer="tokenizer")  # 40 samples
    b = make_shards(root / "b", [7, 6], source="vg", start=100)  # 13 samples
    return {"a": str(a), "b": str(b), "tok": str(root / "a" / "tokenizer")}


def make_cfg(world, **kw):
    base = dict(train=[SourceConfig(world["a"], 1.0), SourceConfig(world["b"], 1.5)], batch_size=3, image_size=16,
                augment="albef", two_views=True, hflip=True, num_workers=0, seed=7)
    base.update(kw)
    return ShardsDataConfig(**base)


def run(stream, epoch, batches=0):
    """Batches of one epoch from ``batches`` on: (keys, a checksum of every tensor) per batch."""
    stream.load_state_dict({"epoch": epoch, "batches": batches})
    out = []
    for b in DataLoader(stream, batch_size=None, num_workers=stream.num_workers):
        sums = tuple(round(float(b[k].double().sum()), 6) for k in ("image", "image_aug", "mlm_input_ids"))
        out.append((tuple(b["keys"]), tuple(b["captions"]), sums, b["stream_state"]["index"]))
    return out


@pytest.mark.parametrize("world_size,workers,resampled", [(1, 0, False), (1, 2, False), (2, 2, False),
                                                          (1, 2, True)])
def test_resume_yields_exactly_the_remaining_batches(world, world_size, workers, resampled):
    cfg = make_cfg(world, num_workers=workers, resampled=resampled)
    tok = ShardDataModule(cfg).tokenizer
    for rank in range(world_size):
        stream = ShardDataModule(cfg, tokenizer=tok, rank=rank, world_size=world_size).build_train_stream()
        n = len(stream)
        full = run(stream, epoch=1)
        assert len(full) == n and [r[3] for r in full] == list(range(n))
        for p in sorted({1, n // 2 + 1, n - 1}):  # odd positions: the resumed loader starts on worker 1
            assert run(stream, epoch=1, batches=p) == full[p:], (rank, p)
        nxt = run(stream, epoch=2)
        assert nxt != full  # (the comparison above is not vacuous)
        assert run(stream, epoch=1, batches=n) == nxt  # the end of an epoch continues with the next


def test_resume_reads_and_decodes_nothing_it_skips(world, monkeypatch):
    """Cost of a resume: no decode, no member read for skipped samples; one header scan per shard touched."""
    decodes, reads, scans = [], [], []
    orig_decode, orig_read, orig_entry = SampleProcessor.decode, ShardReader.read, ShardReader._entry

    def decode(self, raw):
        decodes.append(raw["__key__"])
        return orig_decode(self, raw)

    def read(self, path, i, expected):
        reads.append((path, i))
        return orig_read(self, path, i, expected)

    def entry(self, path):
        if path not in self._cache:
            scans.append(path)
        return orig_entry(self, path)

    monkeypatch.setattr(SampleProcessor, "decode", decode)
    monkeypatch.setattr(ShardReader, "read", read)
    monkeypatch.setattr(ShardReader, "_entry", entry)
    cfg = make_cfg(world, train=[SourceConfig(world["a"], 1.0)], batch_size=2, augment="none", two_views=False)
    stream = ShardDataModule(cfg).build_train_stream()
    n = len(stream)  # 20 batches of 2
    for p in (0, n // 2, n - 2):
        decodes.clear(), reads.clear(), scans.clear()
        stream.load_state_dict({"epoch": 0, "batches": p})
        it = iter(stream)
        first = next(it)
        assert len(decodes) == len(reads) == 2  # only the 2 samples of the batch that is yielded
        assert len(scans) <= 2  # the shard(s) holding them: headers only
        rest = list(it)
        assert len(decodes) == len(reads) == 2 * (n - p) and 1 + len(rest) == n - p
        assert decodes == [k for b in [first, *rest] for k in b["keys"]]


def test_a_datamodule_position_resumes_elastically_on_two_ranks(world):
    """The position a Lightning checkpoint holds (recorded batch by batch) carries what elastic resume needs: the
    two new ranks together read exactly the epoch's samples the one-rank run had not (tests/test_elastic_resume.py
    has the general case)."""
    cfg = make_cfg(world, num_workers=0, augment="none", two_views=False, hflip=False)
    dm1 = ShardDataModule(cfg, rank=0, world_size=1)
    dm1.setup("fit")
    epoch = [b["keys"] for b in dm1.train_dataloader()]
    for b in dm1.train_dataloader():
        dm1.record(b)
        if b["stream_state"]["index"] == 9:
            break
    state = dm1.state_dict()
    assert (state["epoch"], state["batches"], state["topology"], state["hops"]) == (0, 10, [1, 1, 3], [])
    rest = []
    for rank in (0, 1):
        dm2 = ShardDataModule(cfg, tokenizer=dm1.tokenizer, rank=rank, world_size=2)
        dm2.setup("fit")
        dm2.load_state_dict(state)
        with pytest.warns(UserWarning, match="elastic resume of epoch 0 from world_size=1"):
            got = list(dm2.train_dataloader())
        assert len(got) == len(dm2.train_stream) - 10
        rest += [k for b in got for k in b["keys"]]
    left = Counter(k for b in epoch[10:] for k in b)
    assert not Counter(rest) - left  # (keys as a multiset: source b's weight 1.5 reads some keys twice)
    assert 0 <= sum(left.values()) - len(rest) < 2 * 3  # at most the remainder that fills no step on both ranks


def test_position_after_a_full_epoch_starts_the_next_epoch(world):
    cfg = make_cfg(world, num_workers=0)
    dm = ShardDataModule(cfg)
    dm.setup("fit")
    e0 = list(dm.train_dataloader())
    for b in e0:
        dm.record(b)
    assert dm.state_dict()["batches"] == len(e0)
    e1 = list(dm.train_dataloader())  # no trainer: the next iteration continues the stream with epoch 1
    assert {b["stream_state"]["epoch"] for b in e1} == {1} and len(e1) == len(e0)
    for b in e1[:4]:
        dm.record(b)
    fresh = ShardDataModule(cfg, tokenizer=dm.tokenizer)
    fresh.setup("fit")
    fresh.load_state_dict(dm.state_dict())
    assert [b["keys"] for b in fresh.train_dataloader()] == [b["keys"] for b in e1[4:]]


# ---------------------------------------------------------------------------------------------------------------------
# end to end with Lightning


def test_lightning_checkpoint_mid_epoch_resumes_on_the_remaining_keys(world, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.keys: list = []
            self.save_mid_step = None

        def training_step(self, batch, batch_idx):
            self.keys.append((self.current_epoch, tuple(batch["keys"])))
            if len(self.keys) == 8 and self.save_mid_step:  # what Lightning's SIGUSR1 handler does, mid-step
                self.trainer.save_checkpoint(self.save_mid_step)
            return self.lin(batch["image"].mean((2, 3))).pow(2).mean()

        def configure_optimizers(self):
            _ = self.trainer.estimated_stepping_batches  # what cosine schedules read (Lightning #20550)
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cfg = make_cfg(world, num_workers=2, batch_size=4, augment="none", two_views=False, hflip=False)
    tok = ShardDataModule(cfg).tokenizer

    def trainer(max_steps, callbacks=()):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                         default_root_dir=str(tmp_path))

    per_epoch = 2 * ((40 // 2 + int(1.5 * (13 // 2))) // 4)  # 2 workers x floor((20 + 9) / 4) = 14
    total = per_epoch + 5
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    model = Tiny()
    model.save_mid_step = str(tmp_path / "mid_step.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(total, [ckpt]).fit(model, datamodule=ShardDataModule(cfg, tokenizer=tok))
    full = model.keys
    assert len(full) == total and [e for e, _ in full] == [0] * per_epoch + [1] * 5
    # mid-epoch (odd: the next batch comes from worker 1), the epoch's last batch, and a save in the middle of the
    # 8th step, whose batch Lightning replays (its update is not in the checkpoint)
    for step, path in ((5, tmp_path / "ckpt" / "step=5.ckpt"), (per_epoch, tmp_path / "ckpt" / f"step={per_epoch}.ckpt"),
                       (7, tmp_path / "mid_step.ckpt")):
        resumed = Tiny()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(total).fit(resumed, datamodule=ShardDataModule(cfg, tokenizer=tok), ckpt_path=str(path))
        assert resumed.keys == full[step:], step
