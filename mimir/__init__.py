"""mimir: MIMIR masked adversarial pre-training of vision transformers, on Ray."""

__version__ = "0.1.0"
