"""Data: shard reading, transforms, tokenization, masking, the LightningDataModule."""

from vlp.data import config as _config  # noqa: F401  (registers the data section schemas)
