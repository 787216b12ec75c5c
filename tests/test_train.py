"""Training through real Ray Train on the digits set (32x32, patch 8): DDP over two CPU
workers learns, matches one worker, resumes from its checkpoint, and fails with its reason.

Ray starts once for this module; the digits .beton files are written once. Everything else
that needs no Ray calls `fit` directly.
"""
from __future__ import annotations

import math

import pytest
import torch
from ray.util.queue import Queue

from tntsearch.model import get_config
from tntsearch.spec import SearchSpec
from tntsearch.train import NONFINITE_CHECK_STEPS, TRAIN_METRICS, NonFiniteLossError, fit, load_state, resolve_precision
from tntsearch.trainer import ForwardReports, main, make_trainer, resolve_arch

pytestmark = pytest.mark.slow

# A tiny TNT: 16 sentences of 4 words; ~0.1M parameters.
ARCH = get_config(
    "tnt_ti", img_size=32, patch_size=8, num_classes=10, outer_dim=64, depth=2, outer_heads=4, mlp_ratio=2,
    inner_dim=16, words=4, inner_heads=2, inner_mlp_ratio=2, drop_path=0.0,
)
EPOCHS = 12
STOP = 5  # the first run stops after this epoch; the second resumes
GLOBAL_BATCH = 16
# lr 2e-3 at a global batch of 16, written per 512 images as the spec wants it. At 4e-3 some
# runs stall near chance for several epochs: 4 of 17 single-process runs ended below 70%.
LR_PER_512 = 2e-3 * 512 / GLOBAL_BATCH


def _spec(digits, storage, *, num_workers: int, lr: float = LR_PER_512, warmup_epochs: int = 1) -> SearchSpec:
    return SearchSpec.model_validate({
        "name": "train-test",
        "space": {k: v for k, v in ARCH.to_dict().items()},
        "objectives": [{"metric": "val_top1", "mode": "max", "ref": 0.0}],
        # The val crop keeps the central 224/256 of the side: training crops of a similar
        # area (0.75-0.8) keep the digits at the size validation shows them.
        "data": {"train": str(digits / "train.beton"), "val": str(digits / "val.beton"),
                 "batch_size": GLOBAL_BATCH // num_workers, "num_workers": 1, "crop_scale": [0.75, 0.8],
                 # A mirrored digit is not the same digit: with flips on, 12 epochs ended
                 # anywhere between 44% and 80%; without, 82-93% (9 single-process runs).
                 "flip": False},
        "train": {"epochs": EPOCHS, "lr": lr, "min_lr": 1e-5, "warmup_epochs": warmup_epochs,
                  "label_smoothing": 0.1, "clip_grad": 1.0, "seed": 0},
        "resources": {"num_workers": num_workers, "cpus_per_worker": 1, "max_failures": 0},
        "storage": str(storage),
    })


def _fit_collecting(trainer, queue) -> tuple[object, list[dict]]:
    result = trainer.fit()
    reports = []
    while not queue.empty():
        reports.append(queue.get())
    return result, reports


@pytest.fixture(scope="module")
def two_workers(ray_session, digits, tmp_path_factory):
    """Two CPU workers (gloo DDP): stopped after epoch STOP, then the same run name resumed."""
    spec = _spec(digits, tmp_path_factory.mktemp("ray"), num_workers=2)
    extra = {"params": 123, "arch": ARCH.to_dict(), "feasible": 1}
    queue = Queue()
    first, first_reports = _fit_collecting(
        make_trainer(ARCH, spec, name="digits2", extra_metrics=extra, callbacks=[ForwardReports(queue)],
                     stop_epoch=STOP), queue)
    # Saved now: the second run's checkpoint retention (2 kept) deletes the first run's.
    first_state = load_state(first.checkpoint.path)
    second, second_reports = _fit_collecting(
        make_trainer(ARCH, spec, name="digits2", extra_metrics=extra, callbacks=[ForwardReports(queue)]), queue)
    return {"first": first, "first_state": first_state, "first_reports": first_reports,
            "second": second, "second_reports": second_reports}


def _steps(state) -> list[int]:
    return sorted({int(s["step"]) for s in state["optimizer"]["state"].values()})


def test_two_workers_learn_digits(two_workers):
    reports = two_workers["first_reports"] + two_workers["second_reports"]
    assert [r["epoch"] for r in reports] == list(range(1, EPOCHS + 1))
    for r in reports:
        assert set(TRAIN_METRICS) <= set(r)
        assert r["params"] == 123 and r["feasible"] == 1 and r["arch"]["words"] == 4  # extra metrics merged
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["images_per_s"] > 0
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
    final = reports[-1]
    assert final["val_top1"] >= 70.0, reports  # chance is 10%
    assert final["lr"] < reports[1]["lr"]  # cosine decay after the warm-up epoch
    assert two_workers["second"].metrics["val_top1"] == final["val_top1"]


def test_resume_continues_with_the_saved_optimizer(two_workers):
    first = two_workers["first_state"]
    assert first["epoch"] == STOP
    (steps_at_stop,) = _steps(first)
    assert steps_at_stop % STOP == 0
    per_epoch = steps_at_stop // STOP
    # The restarted run reports from STOP + 1 on, and its AdamW step counts carry on from the
    # checkpoint's: a fresh optimizer would end at (EPOCHS - STOP) * per_epoch.
    assert [r["epoch"] for r in two_workers["second_reports"]] == list(range(STOP + 1, EPOCHS + 1))
    last = load_state(two_workers["second"].checkpoint.path)
    assert last["epoch"] == EPOCHS
    assert _steps(last) == [EPOCHS * per_epoch]
    assert last["scheduler"]["base_values"] == first["scheduler"]["base_values"]


def test_one_worker_matches_two_workers(two_workers, digits, tmp_path):
    """The same global batch on one process: accuracy within noise of the DDP run."""
    spec = _spec(digits, tmp_path, num_workers=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a Ray worker with one CPU gets
    try:
        history = fit(ARCH, spec.data, spec.train, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    one, two = history[-1]["val_top1"], two_workers["second_reports"][-1]["val_top1"]
    assert one >= 70.0 and two >= 70.0, (one, two)  # chance is 10%
    # NOTE: CPU training is not bit-for-bit deterministic and FFCV's crops are not seeded, so
    # two runs of one setting differ too: single-process runs ended at 82-93%.
    assert abs(one - two) <= 15.0, (one, two)
    # lr scales with the global batch, which is the same for both runs.
    assert history[-1]["lr"] == pytest.approx(two_workers["second_reports"][-1]["lr"])


def test_nan_loss_fails_with_its_reason(digits, tmp_path):
    """An absurd lr: the step that produces NaN raises, naming epoch, step and lr. Under Ray
    Train the same exception is the run's ``WorkerGroupError.worker_failures[rank]``."""
    spec = _spec(digits, tmp_path, num_workers=1, lr=1e6, warmup_epochs=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at epoch 1 step \d+ \(lr=3.12e\+04"):
            fit(ARCH, spec.data, spec.train, report=lambda metrics, state: pytest.fail("reported an epoch"))
    finally:
        torch.set_num_threads(threads)


class _NanFromStep(torch.nn.Module):
    """The model, whose training logits turn NaN from the given (1-based) forward pass on."""

    def __init__(self, net: torch.nn.Module, step: int) -> None:
        super().__init__()
        self.net, self.step, self.calls = net, step, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(images)
        if not self.training:
            return logits
        self.calls += 1
        return logits * float("nan") if self.calls >= self.step else logits


@pytest.mark.parametrize("bad_step", [3, "last"])
def test_nan_loss_is_found_without_a_check_every_step(digits, tmp_path, bad_step):
    """The loop reads its non-finite flag every NONFINITE_CHECK_STEPS steps and at the end of
    the epoch, not every step (each read waits for the GPU): the error still names the first
    bad step, comes within NONFINITE_CHECK_STEPS steps of it, and no epoch is reported."""
    spec = _spec(digits, tmp_path, num_workers=1, warmup_epochs=0)
    steps = 1437 // GLOBAL_BATCH  # the digits train split, last partial batch dropped
    step = steps if bad_step == "last" else bad_step
    assert steps % NONFINITE_CHECK_STEPS, "the last step must fall between two checks"
    model = None

    def prepare(net):
        nonlocal model
        model = _NanFromStep(net, step)
        return model

    with pytest.raises(NonFiniteLossError, match=rf"^loss became nan at epoch 1 step {step} \(lr=\d"):
        fit(ARCH, spec.data, spec.train, prepare_model=prepare,
            report=lambda metrics, state: pytest.fail("reported an epoch"))
    checked_at = min(steps, -(-step // NONFINITE_CHECK_STEPS) * NONFINITE_CHECK_STEPS)
    assert model.calls == checked_at, (model.calls, step)


# --- no Ray, no training ----------------------------------------------------------------

def test_extra_metrics_may_not_shadow_training_metrics(digits, tmp_path):
    spec = _spec(digits, tmp_path, num_workers=1)
    with pytest.raises(ValueError, match="val_top1"):
        fit(ARCH, spec.data, spec.train, extra_metrics={"val_top1": 99.0})
    with pytest.raises(ValueError, match="epoch"):
        make_trainer(ARCH, spec, name="x", extra_metrics={"epoch": 3})


def test_checkpoint_of_another_architecture_is_refused(digits, tmp_path):
    spec = _spec(digits, tmp_path, num_workers=1)
    state = {"arch": get_config(ARCH, depth=3).to_dict(), "epoch": 1}
    with pytest.raises(ValueError, match="architecture"):
        fit(ARCH, spec.data, spec.train, start_state=state)


def test_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp16", cpu) is torch.float16


def test_resolve_arch_applies_spec_then_overrides(digits, tmp_path):
    spec = _spec(digits, tmp_path, num_workers=1)
    arch = resolve_arch("tnt_ti", spec, ["depth=3", "tnt_blocks=[1, 3]", "se=outer"])
    assert (arch.img_size, arch.patch_size, arch.num_classes) == (32, 8, 10)  # from the spec
    assert (arch.outer_dim, arch.inner_dim) == (192, 12)  # from the preset
    assert (arch.depth, arch.tnt_blocks, arch.se) == (3, (1, 3), "outer")


@pytest.mark.parametrize("argv, message", [
    (["missing.yaml", "--arch", "tnt_s"], "spec file not found"),
    (["{spec}", "--arch", "tnt_xl"], "preset must be one of"),
    (["{spec}", "--arch", "tnt_ti", "--set", "depth"], "--set expects key=value"),
    (["{spec}", "--arch", "tnt_ti", "--set", "outer_heads=5"], "outer_heads"),
    (["{spec}", "--arch", "tnt_ti", "--epochs", "0"], "epochs"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, digits, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(_spec(digits, tmp_path, num_workers=1).model_dump_json())  # JSON is YAML
    code = main([a.format(spec=spec_file) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
