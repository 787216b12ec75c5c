"""Cost of a TNT architecture: parameters, MACs and measured throughput.

Three views of the same model, cheapest first:

- :func:`count_params` / :func:`count_macs`: closed forms straight from a :class:`TNTConfig`
  (no model is built; microseconds), used to cost every proposal before training.
  MACs are multiply-accumulates of the matrix products and convolutions, the way the
  paper counts "FLOPs" (Eq. 14-18, Table 1): LayerNorm, softmax, GELU and additions are
  left out, attention counts Q K^T and A V (``n^2 d`` each).
- :func:`counted_macs`: ``torch.utils.flop_counter.FlopCounterMode`` on a real forward
  pass, divided by 2 -- the independent check of the closed forms.
- :func:`measure_throughput`: images/s on a device, the cost that FLOPs misrank for TNT
  (paper Table 5: TNT-S has 13% more FLOPs than DeiT-S but half its throughput);
  :func:`measure_speed`: inference images/s and one-image latency as a search measures
  them, optionally corrected for load by a reference model timed in between.

CLI: ``python -m tntsearch.cost tnt_s --set words=4 inner_dim=96 --json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tntsearch.exclusive import measuring
from tntsearch.model import PRESETS, TNTConfig, create_model, get_config, parse_overrides

__all__ = [
    "count_params",
    "count_macs",
    "counted_macs",
    "make_step",
    "time_step",
    "timed_rounds",
    "measure_throughput",
    "speed_steps",
    "speed_figures",
    "measure_speed",
    "cost_report",
    "main",
]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MODES = ("inference", "train")
# measure_speed times at least this long per step and round (docs/model_and_cost.md, "Measuring in a search").
_MIN_UNIT_S = 0.05


# ---------------------------------------------------------------------------------------
# Analytic parameters and MACs
# ---------------------------------------------------------------------------------------

def _linear_params(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _se_params(dim: int, ratio: float) -> int:
    hidden = int(dim * ratio)
    return 2 * dim + _linear_params(dim, hidden) + _linear_params(hidden, dim)


def _block_params(dim: int, mlp_ratio: float, se_ratio: float | None) -> int:
    """Pre-norm block: 2 LayerNorms, qkv (no bias), proj, MLP (Eq. 17: ~12 d^2 at r = 4)."""
    hidden = int(dim * mlp_ratio)
    p = 4 * dim + _linear_params(dim, 3 * dim, bias=False) + _linear_params(dim, dim)
    p += _linear_params(dim, hidden) + _linear_params(hidden, dim)
    return p + (_se_params(dim, se_ratio) if se_ratio else 0)


def _block_macs(tokens: int, dim: int, mlp_ratio: float, se_ratio: float | None) -> int:
    """MACs of one block on ``tokens`` tokens: 4 N d^2 + 2 N^2 d + 2 N d h (Eq. 14-16)."""
    hidden = int(dim * mlp_ratio)
    macs = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * hidden
    return macs + (2 * dim * int(dim * se_ratio) if se_ratio else 0)  # SE MLP on the mean token


def _se_ratios(cfg: TNTConfig) -> tuple[float | None, float | None]:
    inner = cfg.se_ratio if cfg.se in ("inner", "both") else None
    outer = cfg.se_ratio if cfg.se in ("outer", "both") else None
    return inner, outer


def count_params(cfg: TNTConfig | str) -> int:
    """Exact number of parameters of ``create_model(cfg)`` (Eq. 17-18 plus norms and biases)."""
    cfg = get_config(cfg)
    d, c, m, n = cfg.outer_dim, cfg.inner_dim, cfg.words, cfg.num_patches
    se_in, se_out = _se_ratios(cfg)
    if cfg.tnt_blocks:  # word stem: 7x7 conv, word position, words -> sentence projection
        p = _linear_params(3 * 49, c) + m * c + 2 * m * c + _linear_params(m * c, d) + 2 * d
    else:  # DeiT patch embedding
        p = _linear_params(3 * cfg.patch_size ** 2, d)
    p += d + (n + 1) * d  # class token, sentence position
    n_tnt = len(cfg.tnt_blocks)
    p += cfg.depth * _block_params(d, cfg.mlp_ratio, se_out)
    p += n_tnt * (_block_params(c, cfg.inner_mlp_ratio, se_in) + 2 * m * c + m * c * d + 2 * d)
    return p + 2 * d + _linear_params(d, cfg.num_classes)


def count_macs(cfg: TNTConfig | str) -> int:
    """Multiply-accumulates of the forward pass of one image (paper Eq. 14-18).

    Per TNT block: n inner blocks on m words of dim c, the m*c -> d projection of the n
    sentences, the outer block on n + 1 sentences (the paper writes n; the class token makes
    it n + 1). Stem: a 7x7 conv per word (or the p x p DeiT conv) and the stem projection.
    """
    cfg = get_config(cfg)
    d, c, m, n = cfg.outer_dim, cfg.inner_dim, cfg.words, cfg.num_patches
    se_in, se_out = _se_ratios(cfg)
    if cfg.tnt_blocks:
        macs = n * m * c * 3 * 49 + n * m * c * d
    else:
        macs = n * 3 * cfg.patch_size ** 2 * d
    macs += cfg.depth * _block_macs(n + 1, d, cfg.mlp_ratio, se_out)
    inner = n * _block_macs(m, c, cfg.inner_mlp_ratio, None)
    if se_in:  # SE on each sentence's mean word
        inner += n * 2 * c * int(c * se_in)
    macs += len(cfg.tnt_blocks) * (inner + n * m * c * d)
    return macs + d * cfg.num_classes


# ---------------------------------------------------------------------------------------
# Counted MACs
# ---------------------------------------------------------------------------------------

def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of fused SDPA on CPU: 2 (Q K^T) + 2 (A V), as torch counts the CUDA kernels."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d_q + d_v)


# NOTE: torch 2.14's FlopCounterMode has formulas for the CUDA SDPA kernels only; the CPU
# kernel (``_scaled_dot_product_flash_attention_for_cpu``) counts as 0, which would drop
# every attention matmul. Register it here instead of falling back to the math path.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


def counted_macs(cfg: TNTConfig | str, device: str | torch.device = "meta") -> int:
    """MACs of one image's forward pass counted by ``FlopCounterMode`` (FLOPs / 2).

    On the default ``meta`` device nothing is computed or allocated (only shapes), so even
    TNT-B at 224 counts in well under a second.
    """
    cfg = get_config(cfg)
    device = torch.device(device)
    with torch.device(device):
        model = create_model(cfg).eval()
        x = torch.zeros(1, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        model(x)
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------------------------------
# Measured throughput and latency
# ---------------------------------------------------------------------------------------

def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be a torch device such as cpu or cuda:0; got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available here (no CUDA GPU)")
    return device


def _check_step_args(mode: str, precision: str, batch_size: int) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")


def _check_counts(**counts: tuple[int, int]) -> None:
    for name, (value, low) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 32,
              img_size: int = 224, mode: str = "inference", precision: str = "fp32",
              num_classes: int = 1000, seed: int = 0, compile: bool = False) -> Callable[[], None]:
    """One timed unit of work on ``model``, moved to ``device``: a closure doing one step.

    ``inference``: eval mode, ``torch.inference_mode``, forward only. ``train``: train mode,
    forward, cross-entropy, backward and an AdamW step (the paper's optimiser, Table 3) --
    this updates ``model``'s weights. ``precision`` bf16/fp16 runs under ``torch.autocast``.
    ``compile`` runs the model through ``torch.compile`` (static shapes: one graph per batch
    size; the first call compiles, so warm up before timing). The closure does not
    synchronise; the caller does.
    """
    _check_step_args(mode, precision, batch_size)
    device = _device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    model = model.to(device)
    forward = torch.compile(model, dynamic=False) if compile else model
    dtype = _PRECISIONS[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    if mode == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                forward(images)
        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
    return step


def time_step(step: Callable[[], None], device: str | torch.device = "cpu") -> float:
    """Seconds taken by one call of ``step``, synchronised on CUDA before and after."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def timed_rounds(steps: Mapping[str, Callable[[], None]], device: str | torch.device = "cpu",
                 warmup: int = 2, rounds: int = 5, min_time_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each step over ``rounds`` rounds, after ``warmup`` untimed calls of
    each (allocator, kernel selection, compilation).

    The steps are interleaved within a round, in alternating order (A B, B A, ...), so that a
    change of machine load hits all of them alike and none is always first. A timed unit
    repeats a step as many calls as it takes to last ``min_time_s`` (counted from one more
    untimed call), so that one scheduler tick on a busy CPU cannot dominate a short step.
    """
    _check_counts(warmup=(warmup, 0), rounds=(rounds, 1))
    device = torch.device(device)
    calls = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        calls[name] = max(1, math.ceil(min_time_s / time_step(step, device))) if min_time_s > 0 else 1
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            step, n = steps[name], calls[name]
            times[name].append(time_step(lambda: [step() for _ in range(n)], device) / n)
    return times


def _model(cfg: TNTConfig | str | nn.Module, img_size: int | None) -> tuple[nn.Module, int, int]:
    """``(model, img_size, num_classes)``: a fresh model for a config, or the module as is."""
    if not isinstance(cfg, nn.Module):
        conf = get_config(cfg)
        return create_model(conf), img_size or conf.img_size, conf.num_classes
    conf = getattr(cfg, "config", None)
    img_size = img_size or (conf.img_size if isinstance(conf, TNTConfig) else None)
    if img_size is None:
        raise ValueError("img_size is required for a model without a TNTConfig")
    num_classes = conf.num_classes if isinstance(conf, TNTConfig) else getattr(cfg, "num_classes", 1000)
    return cfg, img_size, num_classes


def measure_throughput(cfg: TNTConfig | str | nn.Module, device: str | torch.device = "cpu",
                       batch_size: int = 32, mode: str = "inference", warmup: int = 2, repeats: int = 5,
                       precision: str = "fp32", img_size: int | None = None, compile: bool = False) -> float:
    """Measured images/s of a model: the median of ``repeats`` timed steps after ``warmup``.

    ``cfg`` is a preset name or config (a fresh randomly initialised model is built) or a
    ready ``nn.Module`` (then ``img_size`` is needed unless it has a ``config``; in train mode
    its weights change). Each timed step is one batch of ``batch_size`` images
    (see :func:`make_step` for what a step does), bracketed by ``torch.cuda.synchronize`` on
    GPU. Warm-up steps (allocator, kernel selection, lazy init) are not timed. Touches no
    process-wide setting (threads, cudnn flags, seeds), so a Ray trial can call it as is.
    """
    _check_counts(warmup=(warmup, 0), repeats=(repeats, 1))
    _check_step_args(mode, precision, batch_size)
    model, img_size, num_classes = _model(cfg, img_size)
    step = make_step(model, device, batch_size, img_size, mode, precision, num_classes, compile=compile)
    times = timed_rounds({"model": step}, device, warmup, repeats)["model"]
    return batch_size / statistics.median(times)


RUNTIMES = ("torch", "onnxruntime")


def _onnx_steps(model: nn.Module, img_size: int, batches: Sequence[int]) -> list[Callable[[], None]]:
    """Inference steps of ``model`` exported to ONNX (as ``tntsearch export`` writes it) and
    run by an ONNX Runtime CPU session on torch's thread count: what a user who deploys
    ``model.onnx`` gets. One step per batch size, on one session."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from tntsearch.export.formats import save_onnx

    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        save_onnx(model, torch.zeros(1, 3, img_size, img_size), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [{"images": torch.randn(b, 3, img_size, img_size).numpy()} for b in batches]
    return [lambda feed=feed: session.run(["logits"], feed) for feed in inputs]


def speed_steps(cfg: TNTConfig | str | nn.Module, device: str | torch.device = "cpu", batch_size: int = 32,
                precision: str = "fp32", compile: bool = False, img_size: int | None = None,
                reference: TNTConfig | str | nn.Module | None = None,
                runtime: str = "torch") -> dict[str, Callable[[], None]]:
    """The inference steps :func:`measure_speed` times: ``candidate batch`` (``batch_size``
    images) and ``candidate one`` (one image), and the same for a ``reference`` model; in
    torch, or with ``runtime="onnxruntime"`` through the exported ONNX file (CPU, fp32)."""
    _check_step_args("inference", precision, batch_size)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if runtime == "onnxruntime" and (torch.device(device).type != "cpu" or precision != "fp32" or compile):
        raise ValueError("runtime onnxruntime measures on the CPU, in fp32, not compiled")
    models = {"candidate": _model(cfg, img_size)}
    if reference is not None:
        models["reference"] = _model(reference, img_size)
    steps: dict[str, Callable[[], None]] = {}
    for name, (model, size, classes) in models.items():
        if runtime == "onnxruntime":
            steps[f"{name} batch"], steps[f"{name} one"] = _onnx_steps(model, size, (batch_size, 1))
            continue
        for unit, batch in (("batch", batch_size), ("one", 1)):
            steps[f"{name} {unit}"] = make_step(model, device, batch, size, "inference", precision, classes,
                                                compile=compile)
    return steps


def speed_figures(times: Mapping[str, Sequence[float]], batch_size: int,
                  reference_speed: tuple[float, float] | None = None) -> dict[str, float]:
    """``throughput`` and ``latency_ms`` from the seconds per call of :func:`speed_steps`'
    steps over the rounds: the fastest round of each (the least disturbed one, timeit's
    reasoning), or, with ``reference_speed``, the reference's quiet figures times the ratio
    of the two fastest rounds (the raw figures beside them)."""
    fast = {name: min(t) for name, t in times.items()}
    out = {"throughput": batch_size / fast["candidate batch"], "latency_ms": 1e3 * fast["candidate one"]}
    if reference_speed is None:
        return out
    ref_throughput, ref_latency_ms = reference_speed
    return {
        "throughput": ref_throughput * fast["reference batch"] / fast["candidate batch"],
        "latency_ms": ref_latency_ms * fast["candidate one"] / fast["reference one"],
        "throughput_raw": out["throughput"],
        "latency_ms_raw": out["latency_ms"],
        "reference_throughput_raw": batch_size / fast["reference batch"],
        "reference_latency_ms_raw": 1e3 * fast["reference one"],
    }


def measure_speed(cfg: TNTConfig | str | nn.Module, device: str | torch.device = "cpu", batch_size: int = 32,
                  precision: str = "fp32", compile: bool = False, rounds: int = 5, warmup: int = 2,
                  img_size: int | None = None, reference: TNTConfig | str | nn.Module | None = None,
                  reference_speed: tuple[float, float] | None = None, runtime: str = "torch") -> dict[str, float]:
    """Inference ``throughput`` (images/s at ``batch_size``) and ``latency_ms`` (one image)
    over ``rounds`` interleaved rounds of at least 50 ms per step (:func:`timed_rounds`;
    docs/model_and_cost.md, "Measuring in a search").

    The warm-up (compilation included) runs first; the rounds run with the machine's CPUs to
    themselves when ``device`` is a CPU (:func:`tntsearch.exclusive.measuring`: training
    steps on this machine wait meanwhile). ``runtime="onnxruntime"`` times the model as
    exported to ONNX in an ONNX Runtime CPU session instead of torch.

    Each figure is the fastest round's. With a ``reference`` model and its ``reference_speed``
    = (images/s, ms) measured on the same device when it was quiet, every round times
    candidate and reference back to back (A B A B) and the figures are corrected for load by
    the ratio of the fastest rounds::

        throughput = reference images/s * min(t_reference) / min(t_candidate)
        latency_ms = reference ms       * min(l_candidate) / min(l_reference)

    The uncorrected figures come back as ``throughput_raw`` / ``latency_ms_raw`` and the
    reference's own as ``reference_throughput_raw`` / ``reference_latency_ms_raw``.
    """
    if (reference is None) != (reference_speed is None):
        raise ValueError("reference and reference_speed go together")
    _check_counts(warmup=(warmup, 0), rounds=(rounds, 1))
    device = _device(device)
    steps = speed_steps(cfg, device, batch_size, precision, compile, img_size, reference, runtime)
    for step in steps.values():
        for _ in range(warmup):
            step()
    with measuring(device):
        times = timed_rounds(steps, device, 0, rounds, min_time_s=_MIN_UNIT_S)
    return speed_figures(times, batch_size, reference_speed)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def cost_report(cfg: TNTConfig | str, measure: bool = False, device: str = "cpu", batch_size: int = 8,
                mode: str = "inference", warmup: int = 1, repeats: int = 3, precision: str = "fp32",
                compile: bool = False) -> dict[str, Any]:
    """Everything the CLI prints, as a JSON-able dict; a measured inference adds ``latency_ms``
    (the figures a spec's ``constraints.measure.reference`` quotes)."""
    cfg = get_config(cfg)
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "params": count_params(cfg),
        "macs": count_macs(cfg),
        "counted_macs": counted_macs(cfg),
    }
    if measure and mode == "inference":
        report.update(measure_speed(cfg, device, batch_size, precision, compile, rounds=repeats, warmup=warmup))
    elif measure:
        report["throughput"] = measure_throughput(cfg, device, batch_size, mode, warmup, repeats, precision, compile=compile)
    if measure:
        report.update(device=str(device), batch_size=batch_size, mode=mode, precision=precision, compile=compile)
    return report


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tntsearch.cost",
        description="Parameters, MACs (analytic and counted) and optionally measured throughput and latency of a TNT model.")
    parser.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override architecture parameters; values are YAML (tnt_blocks=[1,6])")
    parser.add_argument("--measure", action="store_true", help="also measure throughput (images/s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=_MODES, default="inference")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=list(_PRECISIONS), default="fp32", help="autocast precision")
    parser.add_argument("--compile", action="store_true", help="measure torch.compile(model)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        cfg = get_config(args.preset, **parse_overrides(args.sets))
        report = cost_report(cfg, args.measure, args.device, args.batch_size, args.mode, args.warmup, args.repeats,
                             args.precision, args.compile)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changed = {k: v for k, v in cfg.to_dict().items() if v != PRESETS[args.preset].to_dict()[k]}
    print(f"model: {args.preset}" + (f" with {changed}" if changed else ""))
    print(f"params: {report['params']:,} ({report['params'] / 1e6:.2f} M)")
    print(f"macs (analytic): {report['macs']:,} ({report['macs'] / 1e9:.3f} G)")
    diff = (report["counted_macs"] - report["macs"]) / report["macs"]
    print(f"macs (FlopCounterMode / 2): {report['counted_macs']:,} ({diff:+.3%})")
    if args.measure:
        print(f"throughput: {report['throughput']:.2f} images/s "
              f"({args.mode}, {args.device}, {args.precision}, batch {args.batch_size}, "
              f"{'fastest' if args.mode == 'inference' else 'median'} of {args.repeats})")
        if "latency_ms" in report:
            print(f"latency: {report['latency_ms']:.3f} ms (one image, fastest of {args.repeats})")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
