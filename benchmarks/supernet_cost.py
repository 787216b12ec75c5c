"""What weight sharing costs a training step: the supernet running a sub-network against the
same architecture built standalone (``Supernet.extract``), in one process.

For the smallest, a median (by MACs, among ``--samples`` random sub-networks) and the largest
sub-network of the spec's space, both sides do the same step (``tntsearch.cost.make_step``:
forward, cross-entropy, backward, AdamW over all of the model's parameters -- for the
supernet, all of its weights, as in ``tntsearch.supernet.train``) on the same batch, timed
interleaved (A B A B, ``tntsearch.cost.timed_rounds``) so that load drifts hit both.
Prints median images/s and the median over rounds of the paired ratio standalone time /
supernet time: 1.0 means the supernet trains a sub-network as fast as the model alone; the
target of docs/supernet.md is >= 0.8.

    python benchmarks/supernet_cost.py                          # the demo space at 32 x 32
    python benchmarks/supernet_cost.py --threads 1 --rounds 9   # one core, as a Ray worker
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from tntsearch.cost import count_macs, make_step, timed_rounds
from tntsearch.model import TNTConfig
from tntsearch.spec import load_spec
from tntsearch.supernet import Supernet

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


class _SubNet(nn.Module):
    """The supernet fixed to one sub-network, so that ``make_step`` can drive it like a model."""

    def __init__(self, net: Supernet, arch: TNTConfig) -> None:
        super().__init__()
        self.net, self.arch = net, arch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, self.arch)


def subnets(net: Supernet, samples: int, seed: int = 0) -> dict[str, TNTConfig]:
    """The smallest, the median by MACs of ``samples`` random draws, and the largest."""
    g = torch.Generator().manual_seed(seed)
    drawn = sorted((net.sample(g) for _ in range(samples)), key=count_macs)
    return {"smallest": net.smallest(), "median": drawn[len(drawn) // 2], "largest": net.largest()}


def compare(spec_path: str | os.PathLike, batch_size: int, rounds: int, warmup: int, samples: int,
            device: str) -> list[dict]:
    """One row per sub-network: its config, MACs, median images/s of each side and the ratio."""
    torch.manual_seed(0)
    net = Supernet(load_spec(spec_path).space)
    b = net.space.bounds
    rows = []
    for name, arch in subnets(net, samples).items():
        models = {"supernet": _SubNet(net, arch), "standalone": net.extract(arch)}
        steps = {k: make_step(m, device, batch_size, b.img_size, "train", num_classes=b.num_classes)
                 for k, m in models.items()}
        times = timed_rounds(steps, device, warmup=warmup, rounds=rounds)
        rows.append({
            "name": name, "arch": arch, "macs": count_macs(arch),
            **{f"{k}_img_s": batch_size / statistics.median(v) for k, v in times.items()},
            "ratio": statistics.median(a / s for a, s in zip(times["standalone"], times["supernet"])),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(DEMO), help="a spec whose space the supernet holds (default: the demo)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=101, help="random sub-networks the median is taken from")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.spec}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    print(f"{'sub-network':11s} {'MACs':>9s}  {'supernet img/s':>14s}  {'standalone img/s':>16s}  standalone/supernet time")
    for r in compare(args.spec, args.batch_size, args.rounds, args.warmup, args.samples, args.device):
        print(f"{r['name']:11s} {r['macs'] / 1e6:8.2f}M  {r['supernet_img_s']:14.1f}  {r['standalone_img_s']:16.1f}"
              f"  {r['ratio']:6.3f}")
        a = r["arch"]
        print(f"    d={a.outer_dim} c={a.inner_dim} m={a.words} inner_heads={a.inner_heads} se={a.se}"
              f" tnt_blocks={list(a.tnt_blocks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
