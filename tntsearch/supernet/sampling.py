"""The sub-networks of a spec's ``space``: membership, seeded sampling, the largest and smallest.

Every architecture the space allows is a sub-network of one supernet (docs/supernet.md). This
module knows which those are and how big the supernet must be to hold them all
(:class:`Bounds`); :class:`SubnetSampler` draws each step's sub-networks from a generator
seeded by the step number, so every DDP rank draws the same ones and a resumed run draws
what an unbroken run would have drawn.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from tntsearch.model import TNTConfig, _allowed_words
from tntsearch.space import _decode_blocks
from tntsearch.spec import SUPERNET_FIXED, ARCH_PARAMS, Choice, FloatRange, IntRange, PerBlock, SpecError

__all__ = ["Bounds", "SubnetSpace", "SubnetSampler"]

_DEFAULT = TNTConfig()
# How much of the model each SE placement adds, for largest/smallest.
_SE_SIZE = {"none": 0, "outer": 1, "inner": 1, "both": 2}
_MAX_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What the supernet allocates: the largest width of every layer, and which parts exist."""

    img_size: int
    patch_size: int
    num_classes: int
    se_ratio: float
    outer_dim: int
    depth: int
    outer_hidden: int
    inner_dim: int
    inner_hidden: int
    words: tuple[int, ...]  # every word count m, each with its own word-to-sentence projection
    tnt_blocks: tuple[int, ...]  # 1-based blocks that some sub-network makes TNT blocks
    patch_stem: bool  # some sub-network has no TNT block (a DeiT patch stem)
    se_outer: bool
    se_inner: bool


class SubnetSpace:
    """The architectures a spec's ``space`` allows, as values per parameter.

    A parameter is fixed (absent: the TNT-S default), a list of values (``choice`` or an
    ``int`` range), a real interval (``float``), or per-block switches (``tnt_blocks``).
    Searching one of ``tntsearch.spec.SUPERNET_FIXED`` is a :class:`SpecError`.
    """

    def __init__(self, space: Mapping[str, Any]) -> None:
        self.space = dict(space)
        self.options: dict[str, Any] = {}
        for name in ARCH_PARAMS:
            p = self.space.get(name)
            searched = isinstance(p, (Choice, IntRange, FloatRange, PerBlock))
            if searched and name in SUPERNET_FIXED:
                raise SpecError(f"space.{name} is searched, but a supernet cannot vary {name}: fix it to one value")
            if isinstance(p, Choice):
                self.options[name] = list(p.choice)
            elif isinstance(p, IntRange):
                self.options[name] = list(range(p.int[0], p.int[1] + 1, p.step))
            elif isinstance(p, (FloatRange, PerBlock)):
                self.options[name] = p
            elif name == "tnt_blocks":
                self.options[name] = ["all" if p is None else p]
            else:
                self.options[name] = [getattr(_DEFAULT, name) if p is None else p]
        self.bounds = self._bounds()

    def _extreme(self, name: str, largest: bool) -> Any:
        opts = self.options[name]
        if isinstance(opts, FloatRange):
            return opts.float[1] if largest else opts.float[0]
        if isinstance(opts, PerBlock):
            return "all" if largest else ()
        key = {"se": _SE_SIZE.get, "tnt_blocks": lambda b: len(_decode_blocks(b, self._max("depth")))}.get(name)
        return (max if largest else min)(opts, key=key)

    def _max(self, name: str) -> Any:
        return self._extreme(name, True)

    def _corner(self, largest: bool) -> TNTConfig:
        values = {n: self._extreme(n, largest) for n in ARCH_PARAMS if n not in ("outer_heads", "inner_heads")}
        # The heads follow their dim: the most (fewest) that divide it.
        for heads, dim in (("outer_heads", "outer_dim"), ("inner_heads", "inner_dim")):
            opts = self.options[heads]
            fits = [h for h in opts if isinstance(h, int) and h >= 1 and values[dim] % h == 0] or opts
            values[heads] = max(fits) if largest else min(fits)
        values["tnt_blocks"] = _decode_blocks(values["tnt_blocks"], values["depth"])
        which = "largest" if largest else "smallest"
        try:
            return TNTConfig(**values)
        except ValueError as e:
            raise SpecError(f"space: the {which} sub-network (each parameter at its {which} value) is invalid: {e}") from None

    def largest(self) -> TNTConfig:
        """Every parameter at its largest value (SE on both sides, every block TNT if allowed)."""
        return self._corner(True)

    def smallest(self) -> TNTConfig:
        """Every parameter at its smallest value (no SE, no TNT block if allowed)."""
        return self._corner(False)

    def _bounds(self) -> Bounds:
        big = self.largest()
        depth = big.depth
        blocks = self.options["tnt_blocks"]
        if isinstance(blocks, PerBlock):
            tnt, patch_stem = tuple(range(1, depth + 1)), True
        else:
            decoded = [_decode_blocks(b, depth) for b in blocks]
            tnt = tuple(sorted({i for b in decoded for i in b}))
            patch_stem = any(not b for b in decoded)
        ses = self.options["se"]
        words = tuple(sorted(m for m in self.options["words"] if m in _allowed_words(big.patch_size)))
        return Bounds(
            img_size=big.img_size, patch_size=big.patch_size, num_classes=big.num_classes, se_ratio=big.se_ratio,
            outer_dim=big.outer_dim, depth=depth, outer_hidden=int(big.outer_dim * big.mlp_ratio),
            inner_dim=big.inner_dim, inner_hidden=int(big.inner_dim * big.inner_mlp_ratio),
            words=words, tnt_blocks=tnt, patch_stem=patch_stem,
            se_outer=any(s in ("outer", "both") for s in ses), se_inner=any(s in ("inner", "both") for s in ses),
        )

    def check(self, arch: TNTConfig) -> None:
        """ValueError naming the first parameter of ``arch`` that the space does not allow."""
        if not isinstance(arch, TNTConfig):
            raise ValueError(f"arch must be a TNTConfig; got {type(arch).__name__}")
        for name in ARCH_PARAMS:
            value, opts = getattr(arch, name), self.options[name]
            if isinstance(opts, PerBlock):
                continue
            if isinstance(opts, FloatRange):
                ok = opts.float[0] <= value <= opts.float[1]
            elif name == "tnt_blocks":
                ok = value in [_decode_blocks(b, arch.depth) for b in opts]
            else:
                ok = value in opts
            if not ok:
                allowed = list(opts.float) if isinstance(opts, FloatRange) else opts
                raise ValueError(f"{name}={value!r} is not in the supernet's space (allowed: {allowed})")

    def sample(self, generator: torch.Generator) -> TNTConfig:
        """A uniformly random sub-network: each parameter uniform over its values (per-block
        switches each on with probability 1/2), redrawn until the combination is valid."""
        max_depth = self.bounds.depth
        for _ in range(_MAX_TRIES):
            values: dict[str, Any] = {}
            for name in ARCH_PARAMS:
                opts = self.options[name]
                if isinstance(opts, FloatRange):
                    low, high = opts.float
                    values[name] = low + (high - low) * torch.rand((), generator=generator).item()
                elif isinstance(opts, PerBlock):
                    on = torch.rand(max_depth, generator=generator) < 0.5
                    values[name] = [i + 1 for i in range(max_depth) if on[i]]
                else:
                    values[name] = opts[int(torch.randint(len(opts), (), generator=generator))]
            depth = values["depth"]
            if isinstance(self.options["tnt_blocks"], PerBlock):
                values["tnt_blocks"] = [b for b in values["tnt_blocks"] if b <= depth]
            else:
                values["tnt_blocks"] = _decode_blocks(values["tnt_blocks"], depth)
            try:
                return TNTConfig(**values)
            except ValueError:
                continue
        raise SpecError(f"space: no valid sub-network in {_MAX_TRIES} random draws (heads must divide their dims)")


class SubnetSampler:
    """Each training step's sub-networks, drawn from a generator seeded by ``(seed, step)``.

    ``uniform``: ``k`` random sub-networks (AutoFormer: k = 1). ``sandwich``: the largest,
    the smallest, then ``k`` random ones (NASViT: k = 2). The state is the step count, so a
    run resumed from :meth:`state_dict` draws what the unbroken run would have drawn.
    """

    def __init__(self, space: SubnetSpace, sampling: str, k: int, seed: int = 0) -> None:
        if sampling not in ("uniform", "sandwich"):
            raise ValueError(f"sampling must be uniform or sandwich; got {sampling!r}")
        self.space, self.sampling, self.k, self.seed = space, sampling, k, seed
        self.step = 0
        self._corners = [space.largest(), space.smallest()] if sampling == "sandwich" else []
        self.per_step = len(self._corners) + k

    def draw(self) -> list[TNTConfig]:
        """The next step's sub-networks (the largest first with ``sandwich``)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        return self._corners + [self.space.sample(generator) for _ in range(self.k)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint's sampler has seed {state['seed']}, this run {self.seed}")
        self.step = int(state["step"])
