"""One run of the end-to-end elastic-resume test (tests/test_elastic_resume.py): a tiny model trained by a real
Lightning Trainer (DDP over gloo when ``devices`` > 1, Lightning's own launcher) on ``ShardDataModule``, with a
checkpoint after every step; each rank writes ``OUT/TAG.rankR.json``: per step, the epoch and the batch's
samples (``sample_ids``).

Usage: python tests/_elastic_worker.py '{"a": DIR, "b": DIR, "out": DIR, "tag": T, "devices": N, "workers": K,
"max_steps": S, "ckpt": PATH or null}'
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.data.config import ShardsDataConfig, SourceConfig  # noqa: E402
from vlp.data.datamodule import ShardDataModule  # noqa: E402

# the data of the test's elastic_cfg: keep the two in step
DATA = dict(batch_size=3, image_size=16, augment="none", two_views=False, hflip=False, seed=7)


def sample_ids(batch) -> list:
    """(key, caption, masked caption ids without padding) per sample: the ids differ between the cycles of a key
    (its per-sample seed includes the cycle), so a repeated sample shows as a repeated entry."""
    out = []
    for key, cap, ids in zip(batch["keys"], batch["captions"], batch["mlm_input_ids"].tolist()):
        while ids and ids[-1] == 0:
            ids.pop()
        out.append([key, cap, ids])
    return out


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.steps: list = []

    def training_step(self, batch, batch_idx):
        self.steps.append([self.current_epoch, sample_ids(batch)])
        return self.lin(batch["image"].mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(args: dict) -> None:
    out = Path(args["out"])
    cfg = ShardsDataConfig(train=[SourceConfig(args["a"], 1.0), SourceConfig(args["b"], 1.5)],
                           num_workers=args["workers"], **DATA)
    devices = args["devices"]
    ckpt = ModelCheckpoint(dirpath=out / f"ckpt_{args['tag']}", every_n_train_steps=1, save_top_k=-1,
                           filename="{step}")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=args["max_steps"], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ckpt],
                        default_root_dir=str(out))
    model = Tiny()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging).*")
        trainer.fit(model, datamodule=ShardDataModule(cfg), ckpt_path=args["ckpt"])
    (out / f"{args['tag']}.rank{trainer.global_rank}.json").write_text(json.dumps({"steps": model.steps}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
