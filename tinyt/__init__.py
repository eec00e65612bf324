"""tinyt: a small, readable trainer for encoder-decoder Transformer translation models."""

__version__ = "0.1.0"
