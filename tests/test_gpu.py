"""The GPU code paths, on a real CUDA device: bf16 training fed by FFCV loaders that put the
batches on the GPU, CUDA throughput and latency measurement, a search with ``use_gpu``, its
export loaded on the GPU, Ray Train on NCCL, and the out-of-memory path.

Marked ``gpu`` and skipped without CUDA; ``make gpu-check`` (benchmarks/gpu_check.sh) runs
them on a lent GPU, then the CUDA speed benchmark.
"""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from search_utils import demo_spec, mlflow_runs, run_cli
from tntsearch.cost import measure_speed
from tntsearch.model import get_config
from tntsearch.spec import DataSpec, SearchSpec, TrainSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL_TNT = dict(depth=2, num_classes=10)  # TNT-S blocks at 224 x 224, two of them


@pytest.fixture(scope="module")
def synthetic224(tmp_path_factory):
    """Synthetic 224 x 224 JPEG images, 10 classes: 256 to train, 64 to validate."""
    from tntsearch.data import convert

    out = tmp_path_factory.mktemp("synthetic224")
    for split, n in (("train", 256), ("val", 64)):
        convert("synthetic", out / f"{split}.beton", split=split, img_size=224, num_samples=n, num_classes=10,
                write_mode="jpg", num_workers=4)
    return out


def _data(root, batch_size: int) -> DataSpec:
    return DataSpec(train=str(root / "train.beton"), val=str(root / "val.beton"), batch_size=batch_size, num_workers=4)


def test_bf16_training_on_gpu_with_ffcv(synthetic224):
    from tntsearch.data import make_loaders
    from tntsearch.train import fit

    data = _data(synthetic224, 32)
    train_loader, _ = make_loaders(data, 224, device=torch.device("cuda"))
    batches = [(images.device.type, labels.device.type, tuple(images.shape)) for images, labels in train_loader]
    assert batches == [("cuda", "cuda", (32, 3, 224, 224))] * 8

    dtypes = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        history = fit(get_config("tnt_s", **SMALL_TNT), data,
                      TrainSpec(epochs=1, warmup_epochs=0, precision="bf16", lr=5e-4), device="cuda")
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}  # every linear layer ran under bf16 autocast
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]) and history[0]["images_per_s"] > 0


def test_compiled_bf16_training_on_gpu(synthetic224):
    from tntsearch.train import fit

    history = fit(get_config("tnt_s", **SMALL_TNT), _data(synthetic224, 32),
                  TrainSpec(epochs=1, warmup_epochs=0, precision="bf16", compile=True), device="cuda")
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["val_loss"])


def test_cuda_throughput_and_latency():
    cfg = get_config("tnt_s")
    fp32 = measure_speed(cfg, device="cuda", batch_size=64, precision="fp32", rounds=5)
    bf16 = measure_speed(cfg, device="cuda", batch_size=64, precision="bf16", rounds=5)
    compiled = measure_speed(cfg, device="cuda", batch_size=64, precision="bf16", rounds=5, compile=True)
    assert bf16["throughput"] > fp32["throughput"]  # tensor cores
    assert all(r["latency_ms"] > 0 and r["throughput"] > 0 for r in (fp32, bf16, compiled))
    print(f"TNT-S batch 64 images/s: fp32 {fp32['throughput']:.0f}, bf16 {bf16['throughput']:.0f}, "
          f"bf16 compiled {compiled['throughput']:.0f}; latency ms {bf16['latency_ms']:.2f} / {compiled['latency_ms']:.2f}")


@pytest.fixture(scope="module")
def gpu_search(tmp_path_factory, digits):
    """The demo search, 2 trials of 1 epoch, each trial training and measured on the GPU."""
    cwd = tmp_path_factory.mktemp("gpu_search")
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    path = demo_spec(cwd, digits, "gpu2", num_samples=2, epochs=1, tracking_uri=uri)
    raw = yaml.safe_load(path.read_text())
    raw["resources"] = {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 2}
    path.write_text(yaml.safe_dump(raw))
    rc, out = run_cli(path, cwd, timeout=420)
    return {"cwd": cwd, "uri": uri, "rc": rc, "out": out}


def test_two_trial_search_on_gpu(gpu_search):
    assert gpu_search["rc"] == 0, gpu_search["out"][-3000:]
    _, children = mlflow_runs(gpu_search["uri"], "gpu2")
    assert len(children) == 2
    for child in children:
        assert {"throughput", "latency_ms", "val_top1"} <= set(child.data.metrics)


def test_export_on_gpu(gpu_search, tmp_path):
    from tntsearch.export import load_model, main

    assert gpu_search["rc"] == 0
    out = tmp_path / "export"
    assert main(["--experiment", "gpu2", "--tracking-uri", gpu_search["uri"], "--no-mlflow", str(out)]) == 0
    cpu, gpu = load_model(out), load_model(out, device="cuda")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # cuDNN may run the word stem's conv in TF32: close, not equal
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=2e-2, rtol=1e-2)


def test_one_worker_nccl_ray_train(synthetic224, tmp_path):
    import ray

    from tntsearch.trainer import make_trainer

    raw = {"name": "nccl", "space": {}, "objectives": [{"metric": "val_top1", "mode": "max", "ref": 0}],
           "data": _data(synthetic224, 32).model_dump(), "train": {"epochs": 1, "warmup_epochs": 0},
           "resources": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4}, "storage": str(tmp_path)}
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        result = make_trainer(get_config("tnt_s", **SMALL_TNT), SearchSpec.model_validate(raw), name="nccl").fit()
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["epoch"] == 1 and math.isfinite(result.metrics["train_loss"])


def test_out_of_memory_gives_training_oom_error(synthetic224):
    from tntsearch.train import TrainingOOMError, fit

    limit = 2 * 2**30  # 2 GiB: TNT-S at batch 256 needs many times that
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        with pytest.raises(TrainingOOMError, match=r"lower data\.batch_size or constrain the architecture"):
            fit("tnt_s", _data(synthetic224, 256), TrainSpec(epochs=1, warmup_epochs=0, precision="bf16"),
                device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
