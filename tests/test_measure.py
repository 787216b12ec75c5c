"""Measurement as a search takes it (``constraints.measure``): the load correction against a
reference, the spec section, and a real trial in a real Ray measuring at its training
precision, holding a worker's CPUs and the named deployment resource."""
from __future__ import annotations

import math
import threading
import time

import pytest
import ray
import torch
import yaml

from search_utils import ROOT
from tntsearch.cost import measure_speed, measure_throughput
from tntsearch.search import _measure_on_trial_device, constraint_values, make_tuner
from tntsearch.space import arch_from_params, baseline_points
from tntsearch.spec import SearchSpec, SpecError, load_spec


class _Sleeper(torch.nn.Module):
    """A model whose forward takes a known time whatever the batch: a clock to check against."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.head = torch.nn.Linear(1, 10)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.head(x.new_zeros(len(x), 1))


def test_reference_correction_follows_the_documented_formula():
    # candidate 40 ms per call, reference 20 ms: paired ratios 0.5 (time) and 2 (latency)
    out = measure_speed(_Sleeper(0.04), batch_size=8, img_size=4, rounds=3, warmup=1,
                        reference=_Sleeper(0.02), reference_speed=(1000.0, 3.0))
    assert out["throughput"] == pytest.approx(1000.0 * 0.5, rel=0.15)
    assert out["latency_ms"] == pytest.approx(3.0 * 2, rel=0.15)
    assert out["throughput_raw"] == pytest.approx(8 / 0.04, rel=0.15)
    assert out["latency_ms_raw"] == pytest.approx(40, rel=0.15)
    assert out["reference_throughput_raw"] == pytest.approx(8 / 0.02, rel=0.15)
    assert out["reference_latency_ms_raw"] == pytest.approx(20, rel=0.15)
    plain = measure_speed(_Sleeper(0.01), batch_size=4, img_size=4, rounds=2, warmup=0)
    assert set(plain) == {"throughput", "latency_ms"} and plain["latency_ms"] == pytest.approx(10, rel=0.3)
    with pytest.raises(ValueError, match="go together"):
        measure_speed(_Sleeper(0.0), img_size=4, reference=_Sleeper(0.0))
    with pytest.raises(ValueError, match="rounds"):
        measure_speed(_Sleeper(0.0), img_size=4, rounds=0)


def _raw_demo(**constraints) -> dict:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["constraints"].update(constraints)
    return raw


def test_measure_section_and_latency_constraint():
    spec = SearchSpec.model_validate(_raw_demo())
    m = spec.constraints.measure
    assert (m.batch_size, m.precision, m.compile, m.rounds, m.resource, m.reference) == (64, None, None, 5, None, None)
    spec = SearchSpec.model_validate({**_raw_demo(max_latency_ms=4.0, min_throughput=None, max_macs=None),
                                      "objectives": [{"metric": "latency_ms", "mode": "min", "ref": 50.0}]})
    assert constraint_values(spec, params=1, macs=1, throughput=900.0, latency_ms=5.0) == {"max_latency_ms": 0.25}
    assert constraint_values(spec, params=1, macs=1) == {}  # not measured yet


@pytest.mark.parametrize("constraints, message", [
    ({"throughput_batch_size": 64}, "throughput_batch_size"),
    ({"measure": {"reference": {"baseline": "nope", "throughput": 1, "latency_ms": 1}}}, "not one of search.baselines"),
    ({"measure": {"precision": "int8"}}, "constraints.measure.precision"),
])
def test_bad_measure_section_names_the_field(tmp_path, constraints, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_raw_demo(**constraints)))
    with pytest.raises(SpecError, match=message):
        load_spec(path)


# --- in a real Ray ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def deploy_ray():
    """A 2-CPU Ray whose one node also offers the custom resource ``deploy_target``."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, resources={"deploy_target": 1},
             runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield
    ray.shutdown()


def _spec(tmp_path, **measure) -> SearchSpec:
    """The demo with one baseline (tiny_tnt) as the only trial, and a throughput floor no
    architecture meets: the trial is measured, reported infeasible and never trains."""
    raw = _raw_demo(min_throughput=1e9, max_macs=None, measure={"batch_size": 16, "rounds": 5, **measure})
    raw["search"].update(num_samples=1, max_concurrent=1)
    raw["search"]["baselines"] = raw["search"]["baselines"][1:]
    raw["train"]["precision"] = "fp16"
    raw.update(name="measure", storage=str(tmp_path / "ray_results"))
    return SearchSpec.model_validate(raw)


@pytest.mark.slow
def test_trial_measures_at_its_training_precision(deploy_ray, tmp_path):
    # fp16 autocast on this CPU runs ~5x slower than fp32: a figure taken at fp32 (as the
    # measurement did before constraints.measure) is far from the one the trial must record.
    spec = _spec(tmp_path)
    grid = make_tuner(spec).fit()
    recorded = grid[0].metrics
    assert recorded["feasible"] == 0 and recorded["constraint_min_throughput"] > 0
    assert recorded["latency_ms"] > 0
    arch = arch_from_params(dict(baseline_points(spec))["tiny_tnt"], spec.space)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the measuring task, which holds one worker's one CPU
    try:
        fp16, fp32 = (measure_throughput(arch, batch_size=16, precision=p, repeats=5) for p in ("fp16", "fp32"))
    finally:
        torch.set_num_threads(threads)
    assert fp32 > 2.5 * fp16
    assert abs(math.log(recorded["throughput"] / fp16)) < math.log(1.6), (recorded["throughput"], fp16, fp32)


@pytest.mark.slow
def test_measuring_task_holds_a_worker_cpus_and_the_deploy_resource(deploy_ray, tmp_path):
    spec = _spec(tmp_path, resource="deploy_target", precision="fp32",
                 reference={"baseline": "tiny_tnt", "throughput": 1000.0, "latency_ms": 2.0})
    arch = arch_from_params(dict(baseline_points(spec))["tiny_tnt"], spec.space)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(_measure_on_trial_device(arch, spec)))
    runner.start()
    held = set()
    while runner.is_alive():
        free = ray.available_resources()
        held.add((2 - free.get("CPU", 0), 1 - free.get("deploy_target", 0)))
        time.sleep(0.02)
    runner.join()
    assert (1, 1) in held and all(cpus <= 1 and target <= 1 for cpus, target in held)  # one worker's CPU
    # candidate and reference are the same architecture: the paired ratio is 1 within the noise
    assert out["throughput"] == pytest.approx(1000.0, rel=0.3) and out["latency_ms"] == pytest.approx(2.0, rel=0.3)
    assert out["throughput_raw"] > 0 and out["reference_throughput_raw"] > 0
