"""Measurement as a search takes it (``constraints.measure``): the machine's CPUs to itself
(training steps yield), the load correction against a reference, the spec section, and a
real trial in a real Ray measuring at its training precision, holding a worker's CPUs and
the named deployment resource."""
from __future__ import annotations

import fcntl
import math
import os
import threading
import time

import pytest
import ray
import torch
import yaml

from search_utils import ROOT
from tntsearch import exclusive
from tntsearch.cost import measure_speed, measure_throughput, speed_figures, speed_steps
from tntsearch.search import _measure_on_trial_device, constraint_values, make_tuner
from tntsearch.space import arch_from_params, baseline_points
from tntsearch.spec import SearchSpec, SpecError, TrainSpec, load_spec
from tntsearch.train import Training, evaluate, make_loss, make_optimizer, make_schedule, train_epoch


class _Sleeper(torch.nn.Module):
    """A model whose forward takes a known time whatever the batch: a clock to check against."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.head = torch.nn.Linear(1, 10)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.head(x.new_zeros(len(x), 1))


def _gate_closed() -> bool:
    """Whether a measurement holds (or waits at) the gate: a shared lock cannot be had."""
    fd = os.open(exclusive._path("gate"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_measurement_waits_for_the_running_step_and_no_step_starts_meanwhile():
    log, lock = [], threading.Lock()
    go = {name: threading.Event() for name in ("step1 in", "step1 out", "measure in", "measure out")}

    def note(event: str) -> None:
        with lock:
            log.append(event)
        if event in go:
            go[event].set()

    def step(name: str, release: threading.Event | None = None) -> None:
        with exclusive.training_step("cpu"):
            note(f"{name} in")
            if release:
                release.wait(10)
            note(f"{name} out")

    def measure(release: threading.Event) -> None:
        with exclusive.measuring("cpu"):
            note("measure in")
            release.wait(10)
            note("measure out")

    release1, release_m = threading.Event(), threading.Event()
    threads = [threading.Thread(target=step, args=("step1", release1))]
    threads[0].start()
    go["step1 in"].wait(10)
    threads.append(threading.Thread(target=measure, args=(release_m,)))
    threads[1].start()
    while not _gate_closed():  # the measurement has asked
        time.sleep(0.01)
    threads.append(threading.Thread(target=step, args=("step2",)))
    threads[2].start()
    with exclusive.measuring("cuda"), exclusive.training_step("cuda"):  # a GPU is Ray's to hold: no wait
        note("gpu")
    time.sleep(0.2)
    assert log == ["step1 in", "gpu"]  # the measurement waits for step 1; step 2 waits at the gate
    release1.set()
    go["measure in"].wait(10)
    time.sleep(0.2)
    assert log == ["step1 in", "gpu", "step1 out", "measure in"]  # step 2 still waits
    release_m.set()
    for t in threads:
        t.join(10)
    assert log == ["step1 in", "gpu", "step1 out", "measure in", "measure out", "step2 in", "step2 out"]


def test_training_and_validation_steps_wait_while_a_measurement_holds_the_cpus():
    spec = SearchSpec.model_validate(_raw_demo())
    torch.manual_seed(0)
    from tntsearch.model import create_model
    net = create_model(arch_from_params(dict(baseline_points(spec))["tiny_vit"], spec.space))
    recipe = TrainSpec(epochs=1, warmup_epochs=0)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))] * 2
    optimizer = make_optimizer(net, recipe, 4)
    t = Training(model=net, net=net, optimizer=optimizer, scheduler=make_schedule(optimizer, recipe, 2),
                 scaler=torch.amp.GradScaler("cpu", enabled=False), loss_fn=make_loss(recipe),
                 device=torch.device("cpu"), amp=None, clip_grad=None, global_batch=4, oom_context="")
    out = {}
    for name, run in (("train", lambda: train_epoch(t, batches, 1)),
                      ("val", lambda: evaluate(net, batches, torch.device("cpu"), None, 10))):
        with exclusive.measuring("cpu"):
            worker = threading.Thread(target=lambda: out.update({name: run()}))
            worker.start()
            worker.join(0.5)  # a step of this model takes milliseconds
            assert worker.is_alive() and name not in out, name
        worker.join(30)
        assert name in out
    assert out["train"]["seen"] == 8 and out["val"][0] > 0


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


def test_figures_keep_the_fastest_round():
    times = {"candidate batch": [0.5, 0.25, 1.0], "candidate one": [0.004, 0.002, 0.003],
             "reference batch": [0.2, 0.1, 0.4], "reference one": [0.001, 0.0015, 0.0005]}
    assert speed_figures(times, 8) == {"throughput": 32.0, "latency_ms": 2.0}
    assert speed_figures(times, 8, (1000.0, 3.0)) == pytest.approx({
        "throughput": 1000.0 * 0.1 / 0.25, "latency_ms": 3.0 * 0.002 / 0.0005, "throughput_raw": 32.0,
        "latency_ms_raw": 2.0, "reference_throughput_raw": 80.0, "reference_latency_ms_raw": 0.5})


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
    ({"measure": {"runtime": "onnxruntime"}}, "runtime: onnxruntime measures the exported ONNX model on the CPU"),
    ({"measure": {"runtime": "tensorrt"}}, "constraints.measure.runtime"),
])
def test_bad_measure_section_names_the_field(tmp_path, constraints, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_raw_demo(**constraints)))
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_onnxruntime_times_the_exported_model():
    """``runtime: onnxruntime`` times an ONNX Runtime session of the model as export writes
    it: its steps return the session's logits, equal to torch's for the same weights and
    images, and the figures come from those steps."""
    from tntsearch.model import create_model

    spec = SearchSpec.model_validate(_raw_demo(measure={"runtime": "onnxruntime", "device": "cpu"}))
    assert spec.constraints.measure.runtime == "onnxruntime"
    torch.manual_seed(0)
    net = create_model(arch_from_params(dict(baseline_points(spec))["tiny_vit"], spec.space)).eval()
    steps = speed_steps(net, "cpu", batch_size=4, runtime="onnxruntime")
    (logits,) = steps["candidate batch"]()
    assert logits.shape == (4, 10) and steps["candidate one"]()[0].shape == (1, 10)
    # Each step feeds its own fixed images (its default argument); torch on them gives the same logits.
    feed = steps["candidate batch"].__defaults__[0]["images"]
    with torch.inference_mode():
        expected = net(torch.from_numpy(feed)).numpy()
    assert abs(logits - expected).max() < 1e-4
    figures = measure_speed(net, "cpu", batch_size=4, rounds=2, warmup=1, runtime="onnxruntime")
    assert figures["throughput"] > 0 and figures["latency_ms"] > 0
    with pytest.raises(ValueError, match="onnxruntime measures on the CPU, in fp32"):
        speed_steps(net, "cpu", batch_size=4, precision="bf16", runtime="onnxruntime")


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
