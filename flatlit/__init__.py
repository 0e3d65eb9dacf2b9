"""flatlit: a PyTorch Lightning trainer for flat-minima research."""

__version__ = "0.1.0"
