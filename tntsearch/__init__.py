"""tntsearch: hardware-aware architecture search for Transformer-in-Transformer models."""
from __future__ import annotations

__version__ = "0.1.0"
