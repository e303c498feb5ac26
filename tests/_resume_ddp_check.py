"""Manual check (not collected by pytest; ~1-3 min on 2 cores): real DDP, 2 gloo ranks x N loader workers.

Trains a tiny model for 9 steps with ``strategy="ddp_spawn"`` (checkpoint every step), then resumes from step 3 and
checks on every rank that the resumed run sees exactly the remaining keys, and that the ranks' first epoch is
disjoint with equal step counts. Exit status 0 when all hold.

    .venv/bin/python tests/_resume_ddp_check.py [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k in list(os.environ):  # a leaked launcher environment would make Lightning think it is a rank already
    if _k.startswith(("PL_", "SLURM_")) or _k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR",
                                                  "MASTER_PORT"):
        del os.environ[_k]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from vlp.data.config import ShardsDataConfig, SourceConfig  # noqa: E402
from vlp.data.datamodule import ShardDataModule  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, out: str):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.out, self.keys = out, []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["keys"]))
        y = self.all_gather(self.lin(batch["image"].mean((2, 3))), sync_grads=True)  # hangs if ranks differ
        return y.pow(2).mean()

    def on_train_end(self):
        Path(f"{self.out}.rank{self.global_rank}.json").write_text(json.dumps(self.keys))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from _resume_shards import caption_texts, make_shards
    from vlp.data.tokenizer import train_wordpiece

    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="vlp-ddp-") as tmp:
        tmp = Path(tmp)
        train_wordpiece(caption_texts() + [f"number {i} caption {j}" for i in range(100) for j in range(3)],
                        tmp / "a" / "tokenizer", vocab_size=160)
        make_shards(tmp / "a", [10, 10, 7, 5, 8], tokenizer="tokenizer")
        cfg = ShardsDataConfig(train=[SourceConfig(str(tmp / "a"))], batch_size=3, image_size=16,
                               num_workers=args.workers)

        def fit(out, ckpt=None, callbacks=()):
            trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=9, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                                default_root_dir=str(tmp))
            trainer.fit(Tiny(str(tmp / out)), datamodule=ShardDataModule(cfg), ckpt_path=ckpt)

        fit("full", callbacks=[ModelCheckpoint(dirpath=tmp / "ck", every_n_train_steps=1, save_top_k=-1,
                                               filename="{step}")])
        fit("resumed", ckpt=str(tmp / "ck" / "step=3.ckpt"))
        ok = True
        full = [json.loads((tmp / f"full.rank{r}.json").read_text()) for r in (0, 1)]
        for r in (0, 1):
            resumed = json.loads((tmp / f"resumed.rank{r}.json").read_text())
            print(f"rank {r}: {len(full[r])} steps; resumed run sees exactly the remaining keys: {resumed == full[r][3:]}")
            ok &= resumed == full[r][3:] and len(full[r]) == 9
        per_epoch = len(ShardDataModule(cfg, world_size=2).build_train_stream())
        e0 = [{k for ks in f[:per_epoch] for k in ks} for f in full]
        print(f"epoch 0: {per_epoch} steps per rank, ranks disjoint: {not e0[0] & e0[1]}, "
              f"{len(e0[0] | e0[1])} distinct samples")
        ok &= not e0[0] & e0[1]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
