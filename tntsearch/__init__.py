"""tntsearch: hardware-aware architecture search for Transformer-in-Transformer models."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path):
    """The model exported to ``path`` by ``python -m tntsearch.export`` (see docs/export.md)."""
    from tntsearch.export import load_model as f

    return f(path)
