"""What the search benchmarks share: the digits files the demo specs read."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "demo_data"]


def demo_data(work: Path) -> tuple[Path, Path]:
    """The demo's .beton files (``make demo``), or written into ``work`` if missing."""
    train, val = ROOT / "data" / "digits_train.beton", ROOT / "data" / "digits_val.beton"
    if train.is_file() and val.is_file():
        return train, val
    from tntsearch.data import convert

    train, val = work / "digits_train.beton", work / "digits_val.beton"
    convert("digits", train, split="train", num_workers=1)
    convert("digits", val, split="val", num_workers=1)
    return train, val
