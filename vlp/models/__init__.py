"""One LightningModule per paper. Importing this package registers every model's config schema."""
