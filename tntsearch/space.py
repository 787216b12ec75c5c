"""The spec's ``space`` as an Optuna define-by-run function, and back to architectures.

A searched parameter becomes one ``trial.suggest_*`` call under its docs/design.md name, so
Optuna's history, Ray Tune's trial configs and MLflow's params all use the same names.
``tnt_blocks`` is searched either as a choice of index lists (encoded as strings such as
``"1,6"``, because Optuna's categorical values must be scalars) or per block, one boolean
``tnt_block_<i>`` per block (which can express every Table 5 variant and all-vanilla).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping
from typing import Any

from tntsearch.cost import count_macs, count_params
from tntsearch.model import PRESETS, TNTConfig
from tntsearch.spec import ARCH_PARAMS, Choice, FloatRange, IntRange, PerBlock, SearchSpec, SpecError

__all__ = [
    "define_by_run",
    "arch_from_params",
    "baseline_points",
    "check_space",
    "searched_params",
]

# Values the data set dictates: a preset used as a baseline takes them from the space.
_DATA_PARAMS = ("img_size", "patch_size", "num_classes", "drop_path")
_MAX_CORNERS = 20_000


def _encode_blocks(blocks: Any) -> str:
    if blocks == "all":
        return "all"
    return ",".join(str(int(b)) for b in sorted(blocks))


def _decode_blocks(value: Any, depth: int) -> tuple[int, ...]:
    if value == "all":
        return tuple(range(1, depth + 1))
    if isinstance(value, str):
        return tuple(int(b) for b in value.split(",") if b.strip())
    return tuple(sorted(int(b) for b in value))


def searched_params(space: Mapping[str, Any]) -> list[str]:
    """Names of the parameters the sampler chooses (the others are fixed)."""
    return [n for n in ARCH_PARAMS if isinstance(space.get(n), (Choice, IntRange, FloatRange, PerBlock))]


def _depth_bound(space: Mapping[str, Any]) -> int:
    depth = space.get("depth", TNTConfig().depth)
    if isinstance(depth, Choice):
        return max(depth.choice)
    if isinstance(depth, IntRange):
        return depth.int[1]
    return int(depth)


class define_by_run:  # noqa: N801  (used like a function; a class so Tune can pickle it)
    """``define_by_run(space)(trial)`` suggests every searched parameter (Ray's OptunaSearch
    calls it). A class rather than a closure because Tune pickles the searcher with the
    experiment state, for resume.

    Per-block switches are suggested for the largest depth the space allows, so their
    distributions never change between trials; blocks past a trial's depth are ignored.
    """

    def __init__(self, space: Mapping[str, Any]):
        self.space = dict(space)
        self.names = searched_params(space)
        self.max_depth = _depth_bound(space)

    def __call__(self, trial) -> None:
        for name in self.names:
            p = self.space[name]
            if isinstance(p, Choice):
                choices = [_encode_blocks(c) for c in p.choice] if name == "tnt_blocks" else list(p.choice)
                trial.suggest_categorical(name, choices)
            elif isinstance(p, IntRange):
                trial.suggest_int(name, p.int[0], p.int[1], step=p.step, log=p.log)
            elif isinstance(p, FloatRange):
                trial.suggest_float(name, p.float[0], p.float[1], log=p.log)
            else:  # PerBlock
                for i in range(1, self.max_depth + 1):
                    trial.suggest_categorical(f"tnt_block_{i}", [True, False])


def arch_from_params(params: Mapping[str, Any], space: Mapping[str, Any]) -> TNTConfig:
    """The architecture a trial's sampled ``params`` stand for; ValueError if it is invalid."""
    values: dict[str, Any] = {}
    for name in ARCH_PARAMS:
        p = space.get(name)
        if isinstance(p, PerBlock):
            continue
        if isinstance(p, (Choice, IntRange, FloatRange)):
            values[name] = params[name]
        elif name in space:
            values[name] = p
    depth = int(values.get("depth", TNTConfig().depth))
    if isinstance(space.get("tnt_blocks"), PerBlock):
        values["tnt_blocks"] = tuple(i for i in range(1, depth + 1) if params[f"tnt_block_{i}"])
    else:
        values["tnt_blocks"] = _decode_blocks(values.get("tnt_blocks", "all"), depth)
    return TNTConfig(**values)


def _point_for(arch: TNTConfig, space: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Optuna params that reproduce ``arch``, or SpecError if the space cannot express it."""
    point: dict[str, Any] = {}
    max_depth = _depth_bound(space)
    for name in ARCH_PARAMS:
        value = getattr(arch, name)
        p = space.get(name)
        if p is None:
            default = tuple(range(1, arch.depth + 1)) if name == "tnt_blocks" else getattr(TNTConfig(), name)
            if value != default:
                raise SpecError(f"{where}: {name}={value!r} but the space leaves {name} at its default")
            continue
        if isinstance(p, PerBlock):
            point.update({f"tnt_block_{i}": i in value for i in range(1, max_depth + 1)})
        elif isinstance(p, Choice):
            encoded = _encode_blocks(value) if name == "tnt_blocks" else value
            allowed = [_encode_blocks(c) for c in p.choice] if name == "tnt_blocks" else p.choice
            if encoded not in allowed:
                raise SpecError(f"{where}: {name}={value!r} is not among space.{name} choices {p.choice}")
            point[name] = encoded
        elif isinstance(p, (IntRange, FloatRange)):
            low, high = p.int if isinstance(p, IntRange) else p.float
            if not low <= value <= high:
                raise SpecError(f"{where}: {name}={value!r} is outside space.{name} [{low}, {high}]")
            point[name] = value
        else:
            fixed = _decode_blocks(p, arch.depth) if name == "tnt_blocks" else p
            if fixed != value:
                raise SpecError(f"{where}: {name}={value!r} but space.{name} is fixed at {p!r}")
    return point


def baseline_points(spec: SearchSpec) -> list[tuple[str, dict[str, Any]]]:
    """``(name, optuna params)`` for each ``search.baselines`` entry, evaluated first.

    A preset name takes the data-dictated values (image size, patch, classes, drop path)
    from the space; a mapping names the baseline (``name:``) and gives the searched values.
    """
    points = []
    fixed = {n: v for n, v in spec.space.items() if n not in searched_params(spec.space)}
    for i, entry in enumerate(spec.search.baselines):
        where = f"search.baselines[{i}]"
        if isinstance(entry, str):
            if entry not in PRESETS:
                raise SpecError(f"{where}: unknown preset {entry!r}; presets: {sorted(PRESETS)}")
            name = entry
            data = {n: fixed[n] for n in _DATA_PARAMS if n in fixed}
            try:
                arch = TNTConfig(**{**PRESETS[entry].to_dict(), **data})
            except ValueError as e:
                raise SpecError(f"{where}: preset {entry!r} at this space's sizes is invalid: {e}") from None
        else:
            entry = dict(entry)
            name = str(entry.pop("name", f"baseline_{i}"))
            values = {**fixed, **entry}
            depth = int(values.get("depth", TNTConfig().depth))
            values["tnt_blocks"] = _decode_blocks(values.get("tnt_blocks", "all"), depth)
            try:
                arch = TNTConfig(**values)
            except (TypeError, ValueError) as e:
                raise SpecError(f"{where} ({name}): {e}") from None
        points.append((name, _point_for(arch, spec.space, f"{where} ({name})")))
    return points


def _corner_values(name: str, p: Any) -> list[Any]:
    if isinstance(p, Choice):
        return list(p.choice)
    if isinstance(p, IntRange):
        return sorted({p.int[0], p.int[0] + (p.int[1] - p.int[0]) // p.step * p.step})
    if isinstance(p, FloatRange):
        return [p.float[0], p.float[1]]
    if isinstance(p, PerBlock):
        # NOTE: one TNT block can undercut none (the word stem replaces the patch stem),
        # and every single-block placement costs the same.
        return [(), (1,), "all"]
    return [p]


def _corners(space: Mapping[str, Any], seed: int = 0) -> Iterable[dict[str, Any]]:
    names = [n for n in ARCH_PARAMS if n in space]
    grid = [_corner_values(n, space[n]) for n in names]
    total = 1
    for values in grid:
        total *= len(values)
    if total <= _MAX_CORNERS:
        for combo in itertools.product(*grid):
            yield dict(zip(names, combo))
    else:
        rng = random.Random(seed)
        for _ in range(_MAX_CORNERS):
            yield {n: rng.choice(v) for n, v in zip(names, grid)}


def check_space(spec: SearchSpec) -> dict[str, float]:
    """Fail early on a space that cannot run: no valid architecture, a constraint that no
    architecture meets, or a baseline outside the space. Returns the cheapest costs found.

    It walks the choices, range ends (cost is monotone in each range) and the cheapest
    block placements, so the minimum it finds is the space's minimum; ``min_throughput`` needs a measurement
    and is checked per trial.
    """
    best = {"macs": float("inf"), "params": float("inf")}
    first_error = None
    for values in _corners(spec.space):
        depth = int(values.get("depth", TNTConfig().depth))
        values["tnt_blocks"] = _decode_blocks(values.get("tnt_blocks", "all"), depth)
        try:
            arch = TNTConfig(**values)
        except ValueError as e:
            first_error = first_error or e
            continue
        best["macs"] = min(best["macs"], count_macs(arch))
        best["params"] = min(best["params"], count_params(arch))
    if best["macs"] == float("inf"):
        raise SpecError(f"space: no architecture in the space is valid, e.g. {first_error}")
    c = spec.constraints
    if c.max_macs is not None and best["macs"] > c.max_macs:
        raise SpecError(
            f"constraints.max_macs={c.max_macs:.4g} is below the cheapest architecture in the space "
            f"({best['macs']:.4g} MACs): no trial could ever be feasible"
        )
    if c.max_params is not None and best["params"] > c.max_params:
        raise SpecError(
            f"constraints.max_params={c.max_params:.4g} is below the smallest architecture in the space "
            f"({best['params']:.4g} params): no trial could ever be feasible"
        )
    baseline_points(spec)
    return best
