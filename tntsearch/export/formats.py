"""The files of an export folder: ``config.json``, the weights (safetensors) and the
TorchScript, ``torch.export`` and ONNX graphs; writing them, reloading each to check it
against the eager model, and loading an export back (docs/export.md, "Files")."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tntsearch.model import TNT, TNTConfig, create_model

__all__ = [
    "FILES",
    "FORMAT",
    "FORMAT_VERSION",
    "EXAMPLE_BATCH",
    "preprocessing",
    "class_names",
    "write_export",
    "verify_export",
    "read_config",
    "load_model",
]

FILES = {
    "config": "config.json",
    "weights": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "pt2": "model.pt2",
    "onnx": "model.onnx",
    "card": "README.md",
}
FORMAT = "tntsearch-model"
FORMAT_VERSION = 1
_TOLERANCE = 1e-4  # max |logit difference| a reloaded format may show against the eager model
EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1; 2 keeps the batch axis dynamic
_CHECK_BATCH = 3  # a batch size no exporter saw, so a baked-in batch size is caught


def preprocessing(arch: TNTConfig, data: Any | None) -> dict[str, Any]:
    """How images must be prepared, as the validation loader prepares them
    (tntsearch.data.loaders): a centre crop of ``data.val_crop_ratio`` of the shorter side, resized to
    ``img_size`` x ``img_size``, RGB scaled to [0, 1], then ``(x - mean) / std``, NCHW float32."""
    from tntsearch.spec import DataSpec

    crop = data.val_crop_ratio if data is not None else DataSpec.model_fields["val_crop_ratio"].default
    mean = tuple(data.mean) if data is not None else DataSpec.model_fields["mean"].default
    std = tuple(data.std) if data is not None else DataSpec.model_fields["std"].default
    return {
        "img_size": arch.img_size,
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "center_crop_ratio": crop,
        "resize_shorter_side": int(round(arch.img_size / crop)),
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def class_names(arch: TNTConfig, data: Any | None, notes: list[str]) -> list[str]:
    """Class names from the ``.classes.json`` beside the validation (else training) file;
    a class list that does not belong to its ``.beton`` is an error, not a fallback."""
    from tntsearch.data import read_classes

    for path in ((data.val, data.train) if data is not None else ()):
        try:
            names = read_classes(path)
        except FileNotFoundError:
            continue
        if len(names) != arch.num_classes:
            raise ValueError(f"{path}: holds {len(names)} class names but the model has num_classes={arch.num_classes}")
        return names
    notes.append("no class list found beside the data files: class names are the label indices")
    return [str(i) for i in range(arch.num_classes)]


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # NOTE: torch 2.14 deprecates torch.jit (FutureWarning on script/trace/save/load) in
    # favour of torch.export; TorchScript is still produced because deployment targets that
    # predate torch.export (LibTorch C++, older mobile runtimes) need it. model.pt2 is the
    # forward-looking format beside it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script`` (keeps every shape dynamic), or a trace if scripting fails; the
    caller checks the result at another batch size."""
    with _quiet_jit():
        try:
            return torch.jit.script(model)
        except Exception:  # noqa: BLE001 - any scripting failure: fall back to tracing
            return torch.jit.trace(model, example)


def _export_program(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The dynamo exporter (torch.export -> ONNX via onnxscript, torch's default since 2.9;
    the TorchScript-based one is deprecated with torch.jit), batch axis named ``batch``.
    Weights go into the one file below 2 GB (ONNXProgram.save's default)."""
    # NOTE: exporting the nn.Module, not the ExportedProgram made for model.pt2: from a
    # program the dynamic axis loses its name (it comes out as "s77").
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    onnx_program.save(str(path))


def write_export(model: TNT, out_dir: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, Path]:
    """Write config, weights and every format into ``out_dir`` (an existing folder); return
    the paths by kind. The model card is written later, by :func:`tntsearch.export.export`."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    model = model.eval()
    paths = {k: out / v for k, v in FILES.items() if k != "card"}
    paths["config"].write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(paths["weights"]), metadata={"format": "pt", "tntsearch.arch": json.dumps(config["architecture"])})
    size = config["architecture"]["img_size"]
    example = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scripted = _torchscript(model, example)
        with _quiet_jit():
            scripted.save(str(paths["torchscript"]))
        program = _export_program(model, example)
        torch.export.save(program, str(paths["pt2"]))
        save_onnx(model, example, paths["onnx"])
    return paths


def verify_export(model: nn.Module, out_dir: str | os.PathLike, *, tolerance: float = _TOLERANCE) -> dict[str, float]:
    """Reload every file in ``out_dir``, run it on a batch no exporter saw and return each
    format's largest |logit difference| from ``model``; raise if one exceeds ``tolerance``."""
    import onnxruntime as ort

    out = Path(out_dir)
    size = read_config(out)["architecture"]["img_size"]
    x = torch.randn(_CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.eval()(x)
        with _quiet_jit():
            scripted = torch.jit.load(str(out / FILES["torchscript"]), map_location="cpu")
        outputs = {
            "safetensors": load_model(out)(x),
            "torchscript": scripted(x),
            "pt2": torch.export.load(str(out / FILES["pt2"])).module()(x),
        }
    session = ort.InferenceSession(str(out / FILES["onnx"]), providers=["CPUExecutionProvider"])
    outputs["onnx"] = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    diffs = {k: float((v - ref).abs().max()) for k, v in outputs.items()}
    bad = {k: d for k, d in diffs.items() if not d <= tolerance}
    if bad:
        raise RuntimeError(f"exported formats disagree with the model beyond {tolerance:g}: {bad}")
    return diffs


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an export folder (or the file itself)."""
    p = Path(path)
    p = p / FILES["config"] if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no {FILES['config']} at {p}: not a tntsearch export folder")
    config = json.loads(p.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{p}: not a tntsearch export config (format must be {FORMAT!r})")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TNT:
    """The exported model, in eval mode: the architecture from ``config.json`` and the
    weights from ``model.safetensors`` (no pickle, no code from the folder is run)."""
    from safetensors.torch import load_model as load_weights

    config = read_config(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model = create_model(TNTConfig.from_dict(config["architecture"]))
    load_weights(model, str(folder / FILES["weights"]), strict=True, device=str(device))  # raises on any mismatch
    return model.to(device).eval()
