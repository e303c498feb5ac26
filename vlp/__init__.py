"""vlp: vision-language pre-training experiments (UNITER, TCL, MVPTR, BridgeTower) on PyTorch Lightning."""

__version__ = "0.1.0"
