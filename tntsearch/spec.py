"""The search spec: one YAML file, validated once, passed down whole.

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error naming the
field, not a silently ignored key. Relative paths are resolved against the directory the
command runs in (like any CLI) and made absolute here, because Ray Tune changes each
trial's working directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ARCH_PARAMS",
    "Choice",
    "IntRange",
    "FloatRange",
    "PerBlock",
    "Objective",
    "Reference",
    "Measure",
    "Constraints",
    "Scheduler",
    "SearchSettings",
    "DataSpec",
    "TrainSpec",
    "ResourcesSpec",
    "MlflowSpec",
    "SearchSpec",
    "SpecError",
    "SUPERNET_FIXED",
    "SupernetSpec",
    "load_spec",
]

# The architecture parameters of docs/design.md, in the order the sampler suggests them.
ARCH_PARAMS = (
    "img_size", "patch_size", "outer_dim", "depth", "outer_heads", "mlp_ratio",
    "inner_dim", "words", "inner_heads", "inner_mlp_ratio", "se", "se_ratio",
    "tnt_blocks", "drop_path", "num_classes",
)
OBJECTIVE_METRICS = ("val_top1", "val_top5", "val_loss", "macs", "params", "throughput", "latency_ms")


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Strict):
    """``{choice: [a, b, c]}``: a categorical parameter."""

    choice: list[Any] = Field(min_length=1)


class IntRange(_Strict):
    """``{int: [low, high], step: 1, log: false}``: an integer range, both ends included."""

    int: tuple[int, int]
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.int[0] > self.int[1]:
            raise ValueError(f"int range [{self.int[0]}, {self.int[1]}] must have low <= high")
        return self


class FloatRange(_Strict):
    """``{float: [low, high], log: false}``: a real range."""

    float: tuple[float, float]
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.float[0] > self.float[1]:
            raise ValueError(f"float range [{self.float[0]}, {self.float[1]}] must have low <= high")
        return self


class PerBlock(_Strict):
    """``tnt_blocks: {per_block: true}``: every block is independently TNT or vanilla.

    This expresses every Table 5 variant (TNT-S-1..4), all-TNT and all-vanilla (DeiT).
    """

    per_block: Literal[True]


Param = Union[Choice, IntRange, FloatRange, PerBlock, int, float, str, list[int], None]


class Objective(_Strict):
    """One objective; ``ref`` is its hypervolume reference value, fixed here so that runs
    stay comparable (a reference taken from the data would move with every trial)."""

    metric: Literal["val_top1", "val_top5", "val_loss", "macs", "params", "throughput", "latency_ms"]
    mode: Literal["max", "min"]
    ref: float


class Reference(_Strict):
    """A baseline (by its ``search.baselines`` name) timed between the candidate's rounds,
    with its images/s and one-image ms on the quiet measuring device (e.g. from
    ``python -m tntsearch.cost --measure``): the recorded figures are corrected for load."""

    baseline: str
    throughput: float = Field(gt=0)
    latency_ms: float = Field(gt=0)


class Measure(_Strict):
    """How and where ``throughput`` and ``latency_ms`` are measured (docs/model_and_cost.md,
    "Measuring"): inference at the precision and compilation the model will run with, on
    the trial's device class or on a Ray ``resource`` that names the deployment machines."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None  # None: train.precision
    batch_size: int = Field(default=32, ge=1)
    compile: bool | None = None  # None: train.compile
    rounds: int = Field(default=5, ge=1)  # timed rounds, the fastest is kept (docs/model_and_cost.md)
    warmup: int = Field(default=2, ge=0)
    device: Literal["cpu", "cuda"] | None = None  # None: the device the trial trains on
    resource: str | None = Field(default=None, min_length=1)  # e.g. deploy_target: the task asks {deploy_target: 1}
    reference: Reference | None = None
    runtime: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: the exported model.onnx, CPU, fp32

    @model_validator(mode="after")
    def _onnxruntime_on_cpu(self) -> Measure:
        if self.runtime == "onnxruntime" and (self.device != "cpu" or self.precision in ("bf16", "fp16") or self.compile):
            raise ValueError("constraints.measure.runtime: onnxruntime measures the exported ONNX model on the CPU in "
                             "fp32: set device: cpu, and neither precision bf16/fp16 nor compile: true")
        return self


class Constraints(_Strict):
    """Hard limits; infeasible architectures are costed and reported but never trained."""

    max_macs: float | None = Field(default=None, gt=0)
    max_params: float | None = Field(default=None, gt=0)
    min_throughput: float | None = Field(default=None, gt=0)
    max_latency_ms: float | None = Field(default=None, gt=0)
    measure: Measure = Measure()


class Scheduler(_Strict):
    """Early stopping on ``epoch``: ``asha`` judges on ``val_top1`` alone and can stop a cheap
    architecture that belongs on the accuracy-cost front; ``moasha`` ranks each rung over all
    the objectives (docs/early_stopping.md). ``none`` by default (README, ``scheduler``)."""

    type: Literal["asha", "moasha", "none"] = "none"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)
    brackets: int = Field(default=1, ge=1)


class SearchSettings(_Strict):
    """How candidates are proposed and scored. ``mode: train_each`` trains every candidate
    (one Ray Train run per trial); ``mode: supernet`` trains the spec's ``supernet:`` once and
    scores each candidate with inherited weights (docs/supernet.md, "Searching over the supernet")."""

    mode: Literal["train_each", "supernet"] = "train_each"
    algorithm: Literal["nsga2", "tpe", "random"] = "nsga2"
    num_samples: int = Field(default=16, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = 0
    population_size: int = Field(default=8, ge=2)
    baselines: list[Union[str, dict[str, Any]]] = Field(default_factory=list)
    scheduler: Scheduler = Scheduler()


class DataSpec(_Strict):
    """FFCV files and loader settings. ``mean``/``std`` are 0-1 floats per channel;
    validation takes a centre crop of ``val_crop_ratio`` of the image, resized."""

    train: str
    val: str
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=1, ge=1)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True  # off for data where a mirror image is another class (digits, text)
    val_crop_ratio: float = Field(default=224 / 256, gt=0, le=1)  # DeiT's evaluation crop
    in_memory: bool = True
    # Supernet mode's selection data (docs/supernet.md, "Searching over the supernet"):
    # candidates are scored on a .beton of their own, or on a fraction of `train` split off
    # deterministically (seeded by train.seed) that the supernet then never trains on.
    search: str | None = None
    search_fraction: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_search_source(self) -> DataSpec:
        if self.search is not None and self.search_fraction is not None:
            raise ValueError("data.search and data.search_fraction both name the selection data: keep one")
        return self


class TrainSpec(_Strict):
    """The paper's recipe (Table 3), scaled down by the spec. ``lr`` is per 512 images and
    scales linearly with the global batch (batch_size x workers), as in DeiT."""

    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    min_lr: float = Field(default=1e-5, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: int = Field(default=5, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    clip_grad: float | None = Field(default=None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model (docs/model_and_cost.md, "torch.compile")
    seed: int = 0


class ResourcesSpec(_Strict):
    """Per trial: Ray Train workers (DDP ranks) and what each one holds."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    max_failures: int = Field(default=2, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _gpu(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("use_gpu") and "gpus_per_worker" not in data:
            data = {**data, "gpus_per_worker": 1}
        return data

    @model_validator(mode="after")
    def _gpu_consistent(self) -> ResourcesSpec:
        if self.gpus_per_worker > 0 and not self.use_gpu:
            raise ValueError("gpus_per_worker > 0 needs use_gpu: true")
        return self


# Architecture parameters a weight-sharing supernet cannot make elastic (docs/supernet.md):
# the data fixes the first three, and drop path and the SE ratio are not widths to slice.
SUPERNET_FIXED = ("img_size", "patch_size", "num_classes", "drop_path", "se_ratio")


class SupernetSpec(_Strict):
    """One-shot training of a weight-sharing supernet (docs/supernet.md). ``k`` random
    sub-networks train every step: alone with ``uniform`` (AutoFormer), after the largest and
    the smallest with ``sandwich`` (BigNAS, NASViT), where ``distill`` (default on) trains
    the smaller ones on the largest's predictions. The recipe is ``train``'s, run for
    ``epochs``."""

    epochs: int = Field(default=100, ge=1)
    sampling: Literal["uniform", "sandwich"] = "sandwich"
    k: int = Field(default=2, ge=0)
    distill: bool = True  # sandwich only: left out with uniform, it is off

    @model_validator(mode="before")
    @classmethod
    def _distill_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sampling") == "uniform" and "distill" not in data:
            data = {**data, "distill": False}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SupernetSpec:
        if self.sampling == "uniform" and self.k < 1:
            raise ValueError("supernet.k must be >= 1 with sampling: uniform (sub-networks per step)")
        if self.sampling == "uniform" and self.distill:
            raise ValueError("supernet.distill needs sampling: sandwich (the largest sub-network is the teacher)")
        return self


class MlflowSpec(_Strict):
    tracking_uri: str | None = None
    experiment: str | None = None
    registered_model: str | None = None


class SearchSpec(_Strict):
    """The whole file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    space: dict[str, Param]
    objectives: list[Objective] = Field(min_length=1)
    constraints: Constraints = Constraints()
    search: SearchSettings = SearchSettings()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    resources: ResourcesSpec = ResourcesSpec()
    mlflow: MlflowSpec = MlflowSpec()
    storage: str = "ray_results"
    supernet: SupernetSpec | None = None

    @field_validator("space")
    @classmethod
    def _known_params(cls, space: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(space) - set(ARCH_PARAMS))
        if unknown:
            raise ValueError(f"unknown architecture parameter(s) {unknown}; allowed: {list(ARCH_PARAMS)}")
        return space

    @model_validator(mode="after")
    def _objectives_unique(self) -> SearchSpec:
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objectives name a metric twice: {metrics}")
        return self

    @model_validator(mode="after")
    def _reference_is_a_baseline(self) -> SearchSpec:
        ref = self.constraints.measure.reference
        names = [b if isinstance(b, str) else str(b.get("name", f"baseline_{i}"))
                 for i, b in enumerate(self.search.baselines)]
        if ref is not None and ref.baseline not in names:
            raise ValueError(f"constraints.measure.reference.baseline {ref.baseline!r} is not one of "
                             f"search.baselines {names}")
        return self

    @model_validator(mode="after")
    def _supernet_elastic(self) -> SearchSpec:
        if self.supernet is None:
            return self
        for name in SUPERNET_FIXED:
            if isinstance(self.space.get(name), (Choice, IntRange, FloatRange, PerBlock)):
                raise ValueError(
                    f"space.{name} is searched, but a supernet shares one set of weights across "
                    f"sub-networks and cannot vary {name}: fix it to one value or drop the supernet section")
        return self

    @model_validator(mode="after")
    def _supernet_mode(self) -> SearchSpec:
        if self.search.mode == "supernet" and self.supernet is None:
            raise ValueError("search.mode: supernet needs a supernet: section (epochs, sampling, k, distill)")
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p[0].isupper()))
        lines.append(f"{loc or '<top>'}: {e['msg']}")
    return "; ".join(dict.fromkeys(lines))


def _absolute(path: str, base: Path) -> str:
    return str((base / path).resolve()) if "://" not in path else path


def load_spec(path: str | Path, base_dir: str | Path | None = None) -> SearchSpec:
    """Read, validate and return the spec; raise ``SpecError`` naming the bad field.

    Relative data and storage paths become absolute against ``base_dir`` (default: the
    current directory). Architecture checks that need the model (heads dividing dims,
    constraints nobody can meet) live in ``tntsearch.space.check_space``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections, got {type(raw).__name__}")
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_format_errors(e)}") from None
    base = Path(base_dir or Path.cwd())
    data = spec.data.model_copy(update={"train": _absolute(spec.data.train, base), "val": _absolute(spec.data.val, base),
                                        "search": spec.data.search and _absolute(spec.data.search, base)})
    return spec.model_copy(update={"data": data, "storage": _absolute(spec.storage, base)})
