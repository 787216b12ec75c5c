"""The model card (``README.md`` of an export folder, and the registry version's
description): what was exported, from which trial, how well it does and how to use it."""
from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["ALIAS", "model_card", "weights_text"]

ALIAS = "champion"  # the registry alias that names the exported version


def weights_text(src: Mapping[str, Any], m: Mapping[str, Any]) -> str:
    """Where the exported weights came from, in words (``config.json``'s ``source``)."""
    if src.get("retrain_epochs"):
        return (f"re-trained from scratch for {src['retrain_epochs']} epochs with the search's recipe "
                f"(checkpoint `{src['checkpoint']}`)")
    start = ("inherited from the supernet" if src.get("weights") == "supernet"
             else "the trial's own training")
    if src.get("finetune_epochs"):
        return (f"{start} (`{src['finetuned_from']}`), fine-tuned for {src['finetune_epochs']} epochs with the "
                f"search's recipe (checkpoint `{src['checkpoint']}`)")
    if src.get("weights") == "supernet":
        return f"{start}, not trained alone (the supernet's checkpoint `{src['checkpoint']}`)"
    return f"{start}, epoch {m.get('epoch', 'n/a')} (checkpoint `{src['checkpoint']}`)"


def model_card(config: Mapping[str, Any], registry: Mapping[str, Any] | None = None) -> str:
    """Markdown for ``config`` (as written to ``config.json``); with ``registry`` (name and
    version) it also says how to load the registered model."""
    arch, m, src, pre = config["architecture"], config["metrics"], config["source"], config["preprocessing"]

    def num(key: str, fmt: str = "{:,.0f}") -> str:
        v = m.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

    blocks = arch["tnt_blocks"]
    kind = ("TNT" if len(blocks) == arch["depth"] else "DeiT (no TNT block)" if not blocks
            else f"hybrid: TNT blocks {', '.join(map(str, blocks))} of {arch['depth']}, the rest vanilla")
    names = config["class_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} classes)" if len(names) > 20 else "")
    weights = weights_text(src, m)
    lines = [
        f"# {src.get('registered_model') or 'tntsearch model'}: {kind}, {arch['img_size']}x{arch['img_size']}",
        "",
        f"Exported by `tntsearch.export` from search **{src['search']}** (MLflow experiment `{src['experiment']}`, "
        f"parent run `{src['parent_run_id']}`), trial `{src['trial_id']}` (run `{src['run_id']}`, "
        f"{src['status']}), picked by rule `{src['pick']}`"
        + (f" with {src['limits']}" if src.get("limits") and src["limits"] != "no limits" else "") + ".",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| validation top-1 | {num('val_top1', '{:.2f} %')} |",
        f"| validation top-5 | {num('val_top5', '{:.2f} %')} |",
        f"| validation loss | {num('val_loss', '{:.4f}')} |",
        f"| MACs per image | {num('macs')} |",
        f"| parameters | {num('params')} |",
        f"| measured throughput | {num('throughput', '{:,.1f}')} images/s on the trial's device ({src.get('throughput_device') or 'n/a'}) |",
        "",
        f"Weights: {weights}.",
        "",
        "## Architecture",
        "",
        "| parameter | value |",
        "| --- | --- |",
        *[f"| `{k}` | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in arch.items()],
        "",
        "## Data and preprocessing",
        "",
        f"Trained on `{src.get('data_train') or 'n/a'}`, validated on `{src.get('data_val') or 'n/a'}`; "
        f"{len(names)} classes: {shown}.",
        "",
        f"Input: float32 NCHW RGB, {pre['img_size']}x{pre['img_size']}: centre crop of "
        f"{pre['center_crop_ratio']:g} of the shorter side (resize the shorter side to {pre['resize_shorter_side']}, "
        f"crop {pre['img_size']}), scale to [0, 1], subtract mean {pre['mean']}, divide by std {pre['std']}. "
        "Output: logits over the classes of `config.json`.",
        "",
        "## Files",
        "",
        "- `config.json`: architecture, preprocessing, class names, metrics, provenance",
        "- `model.safetensors`: weights; `tntsearch.load_model(DIR)` rebuilds the model",
        "- `model.pt2`: `torch.export.load(path).module()`",
        "- `model.torchscript.pt`: `torch.jit.load(path)`",
        "- `model.onnx`: `onnxruntime.InferenceSession(path)`, input `images`, output `logits`, dynamic batch",
    ]
    if registry:
        lines += ["", "## MLflow", "",
                  f"Registered model `{registry['name']}` version {registry['version']}, alias `{ALIAS}`: "
                  f"`mlflow.pytorch.load_model(\"models:/{registry['name']}@{ALIAS}\")`."]
    notes = config.get("notes") or []
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
