"""Data sets as FFCV `.beton` files and the loaders that feed training.

- `convert(source, out, ...)` / `python -m tntsearch.data convert SOURCE OUT.beton`: write
  an image folder, a `.npz`, CIFAR batches, or the built-in `digits` / `synthetic` sets.
- `read_classes(beton)`: the class names; `read_info(beton)`: a checked description;
  `check_files(data_spec)`: both files of a spec checked, before Ray starts (`checking`).
- `make_loaders(data_spec, img_size, device=...)`: the train/val FFCV loaders.
- `clone_batch(batch)`: loaders reuse their batch buffers; clone what you keep.
- `ffcv_fixes`: the FFCV 1.0.2 defects and their workarounds, in one place.

See docs/data.md. Names are imported on first use, so that `python -m tntsearch.data`
answers bad input without importing torch and FFCV.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BUILTIN_SOURCES",
    "BetonInfo",
    "DataFileError",
    "PipelineError",
    "SafeLoader",
    "SafeWriter",
    "check_files",
    "clone_batch",
    "convert",
    "make_eval_loader",
    "make_loaders",
    "read_classes",
    "read_info",
]

_HOME = {
    "BUILTIN_SOURCES": "writing", "BetonInfo": "writing", "convert": "writing",
    "read_classes": "writing",
    "DataFileError": "checking", "check_files": "checking", "read_info": "checking",
    "PipelineError": "ffcv_fixes", "SafeLoader": "ffcv_fixes", "SafeWriter": "ffcv_fixes",
    "clone_batch": "ffcv_fixes",
    "make_loaders": "loaders", "make_eval_loader": "loaders",
}

if TYPE_CHECKING:
    from .writing import BUILTIN_SOURCES, BetonInfo, convert, read_classes
    from .checking import DataFileError, check_files, read_info
    from .ffcv_fixes import PipelineError, SafeLoader, SafeWriter, clone_batch
    from .loaders import make_eval_loader, make_loaders


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
