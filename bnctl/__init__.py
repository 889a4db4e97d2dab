"""bnctl: an experiment runner for studying Batch Normalization in convolutional networks."""

__version__ = "0.1.0"
