"""tntsearch TNT-S against timm's ``tnt_s_patch16_224``, side by side in one process.

Both models carry the same weights (``from_timm``), see the same batch, run at the same
precision (float32 unless ``--precision``) on the same device, and are timed interleaved
(A B A B ...) so drifts in machine load hit both.
Prints the median images/s over rounds and the median over rounds of the paired ratio
tntsearch / timm, for inference and for one training step (forward, loss, backward, AdamW),
by the wall clock and by the process's CPU time (images per CPU-second: on a CPU shared
with other jobs, time spent waiting for a core does not count, so with ``--threads 1``
this ratio varies less than the wall-clock one; caches and memory bandwidth stay shared).

    python benchmarks/model_speed.py --batch-size 8 --repeats 5
    python benchmarks/model_speed.py --threads 1   # CPU-time ratio, steadier on a busy machine
    python benchmarks/model_speed.py --ablations   # also the variants in docs/model_and_cost.md
    python benchmarks/model_speed.py --compile     # also torch.compile(tntsearch)
    python benchmarks/model_speed.py --profile     # where the CPU time goes, per model
    python benchmarks/model_speed.py --device cuda --batch-size 256 --precision bf16 --compile --deit
                                                   # the GPU comparison of benchmarks/gpu_check.sh
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import types

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tntsearch.cost import make_step, time_step
from tntsearch.model import TNT, Block, TNTBlock, WordEmbed, from_timm

__all__ = ["contenders", "compare", "profile", "main"]


# --- ablations: tntsearch with one speed-up undone at a time -------------------------------

def _attention(model: TNT, which: str, fused: bool) -> TNT:
    """Force fused SDPA on or off in the inner ('inner') or every ('all') attention of a model
    already on its device (a move to another kind of device would pick again)."""
    for blk in model.blocks:
        if isinstance(blk, TNTBlock):
            blk.inner.attn.fused_attn = fused
            if which == "all":
                blk.outer.attn.fused_attn = fused
        elif isinstance(blk, Block) and which == "all":
            blk.attn.fused_attn = fused
    return model


def _unfold_stem_forward(self: WordEmbed, x: torch.Tensor) -> torch.Tensor:
    """timm's PixelEmbed layout: nn.Unfold, transpose, reshape (two copies instead of one)."""
    B, C, H, W = x.shape
    p = self.patch_size
    x = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, C, p, p)
    return self.proj(x).flatten(2).transpose(1, 2)


def _cat_block_forward(self: TNTBlock, words, sentences):
    """timm's sentence update: slice, add, concatenate with the class token."""
    words = self.inner(words)
    B, N, _ = sentences.shape
    delta = self.norm2_proj(self.proj(self.norm1_proj(words.reshape(B, N - 1, -1))))
    sentences = torch.cat([sentences[:, :1], sentences[:, 1:] + delta], dim=1)
    return words, self.outer(sentences)


def _timm_layout(model: TNT) -> TNT:
    model.word_embed.forward = types.MethodType(_unfold_stem_forward, model.word_embed)
    for blk in model.blocks:
        if isinstance(blk, TNTBlock):
            blk.forward = types.MethodType(_cat_block_forward, blk)
    return model


def contenders(reference: nn.Module, device: str = "cpu", ablations: bool = False,
               compile_model: bool = False, deit: bool = False) -> dict[str, nn.Module]:
    """timm, tntsearch, and optionally tntsearch variants, all with the same weights, and
    timm's DeiT-S (the paper's Table 5 yardstick: 13% fewer FLOPs, twice the throughput)."""
    ours = from_timm(reference).to(device)
    out = {"timm": copy.deepcopy(reference), "tntsearch": copy.deepcopy(ours)}
    if ablations:
        # tntsearch picks per device (TNT._pick_attention); the variants force the other kernel
        fused = ours.head.weight.device.type != "cpu"
        out[f"{'un' if fused else ''}fused inner attn"] = _attention(copy.deepcopy(ours), "inner", not fused)
        out[f"{'un' if fused else ''}fused all attn"] = _attention(copy.deepcopy(ours), "all", not fused)
        out["timm reshapes"] = _timm_layout(copy.deepcopy(ours))
    if compile_model:
        out["torch.compile"] = torch.compile(copy.deepcopy(ours))
    if deit:
        out["deit_s"] = timm.create_model("deit_small_patch16_224", pretrained=False).to(device)
        if compile_model:
            out["deit_s compiled"] = torch.compile(copy.deepcopy(out["deit_s"]))
    return out


def compare(batch_size: int = 8, repeats: int = 5, warmup: int = 1, device: str = "cpu",
            modes: tuple[str, ...] = ("inference", "train"), ablations: bool = False,
            compile_model: bool = False, model_name: str = "tnt_s_patch16_224", precision: str = "fp32",
            deit: bool = False) -> list[dict]:
    """Images/s of every contender per mode, timed interleaved; one dict per mode, with the
    paired ratios of compiled to eager tntsearch and of tntsearch to DeiT-S when timed."""
    torch.manual_seed(0)
    reference = timm.create_model(model_name, pretrained=False)
    rows = []
    for mode in modes:
        models = contenders(reference, device, ablations, compile_model, deit)
        steps = {name: make_step(m, device, batch_size, 224, mode, precision) for name, m in models.items()}
        for name, step in steps.items():
            for _ in range(warmup + (2 if "compile" in name else 0)):
                step()
        wall: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for r in range(repeats):
            # interleaved and rotated (A B C, B C A, C A B, ...): load drifts and order effects hit all alike
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.process_time()
                wall[name].append(time_step(steps[name], device))
                cpu[name].append(time.process_time() - start)
        pairs = [(a, b) for a, b in (("torch.compile", "tntsearch"), ("tntsearch", "deit_s"),
                                     ("torch.compile", "deit_s compiled")) if a in wall and b in wall]
        rows.append({"mode": mode, **{name: _summary(batch_size, wall[name], cpu[name], wall["timm"], cpu["timm"])
                                      for name in names},
                     "pairs": {f"{a} / {b}": statistics.median(tb / ta for ta, tb in zip(wall[a], wall[b]))
                               for a, b in pairs}})
    return rows


def _summary(batch_size: int, wall: list[float], cpu: list[float], ref_wall: list[float],
             ref_cpu: list[float]) -> dict[str, float]:
    """Median images/s, and the median over rounds of the paired ratio (timm time / this time):
    the two runs of a round are back to back, so a load change between rounds cancels out."""
    return {
        "img_s": batch_size / statistics.median(wall),
        "ratio": statistics.median(r / t for r, t in zip(ref_wall, wall)),
        "img_cpu_s": batch_size / statistics.median(cpu),
        "cpu_ratio": statistics.median(r / t for r, t in zip(ref_cpu, cpu)),
    }


def profile(batch_size: int = 8, device: str = "cpu", mode: str = "train", steps: int = 2,
            model_name: str = "tnt_s_patch16_224") -> dict[str, tuple[float, float]]:
    """Per model, the self CPU seconds of ``steps`` steps (``torch.profiler``) and the share
    of them spent in matrix products (``mm``, ``addmm``, ``bmm``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    out = {}
    for name, model in contenders(timm.create_model(model_name, pretrained=False), device).items():
        step = make_step(model, device, batch_size, 224, mode)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        out[name] = (total / 1e6, matmul / total)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--ablations", action="store_true", help="also time tntsearch with each speed-up undone")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(tntsearch) (and of DeiT-S)")
    parser.add_argument("--deit", action="store_true", help="also time timm's DeiT-S (deit_small_patch16_224)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: self CPU time of 2 steps per mode and its share in matrix products")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); with 1, CPU time measures the work alone")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.precision}, {args.repeats} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.profile:
        for mode in args.modes:
            for name, (seconds, share) in profile(args.batch_size, args.device, mode).items():
                print(f"{mode:10s} {name:10s} self CPU {seconds:6.2f} s for 2 steps, {share:.1%} in mm/addmm/bmm")
        return 0
    for row in compare(args.batch_size, args.repeats, args.warmup, args.device, tuple(args.modes),
                       args.ablations, args.compile, precision=args.precision, deit=args.deit):
        print(f"{row['mode']:22s}   img/s  ratio to timm   img/CPU-s  ratio to timm")
        for name, v in row.items():
            if name not in ("mode", "pairs"):
                print(f"  {name:20s} {v['img_s']:7.2f}  {v['ratio']:13.3f}   {v['img_cpu_s']:9.2f}  {v['cpu_ratio']:13.3f}")
        for pair, ratio in row["pairs"].items():
            print(f"  {row['mode']} throughput ratio {pair}: {ratio:.3f} (median of paired rounds)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
