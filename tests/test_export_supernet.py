"""Export in supernet mode: the sub-network's weights come out of a real supernet checkpoint
(``run_supernet`` through Ray Train on digits at 16 x 16) and equal the supernet's own
forward for that sub-network; fine-tuning starts from those weights through the real
trainer (``make_trainer(initial_weights=...)``). End to end, the session's supernet mode
search (``demo_supernet_search``) is exported through the CLI: every format scores on
data.val what the search recorded, and ``--finetune 1`` trains and exports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tntsearch.data import make_loaders
from tntsearch.export.weights import inherited_model, retrain
from tntsearch.spec import SearchSpec
from tntsearch.supernet import Supernet
from tntsearch.train import evaluate, load_state

pytestmark = pytest.mark.slow

SPACE = {"img_size": 16, "patch_size": 4, "num_classes": 10, "outer_dim": {"choice": [32, 48]}, "depth": 2,
         "outer_heads": 2, "mlp_ratio": 2, "inner_dim": {"choice": [4, 8]}, "words": {"choice": [1, 4]},
         "inner_heads": {"choice": [1, 2]}, "inner_mlp_ratio": 2, "se": {"choice": ["none", "outer"]},
         "tnt_blocks": {"per_block": True}, "drop_path": 0.0}
EPOCHS = 2


def _spec(digits: Path, tmp: Path, space=SPACE, **train) -> SearchSpec:
    return SearchSpec.model_validate({
        "name": "export-supernet", "space": space, "objectives": [{"metric": "val_top1", "mode": "max", "ref": 0.0}],
        "data": {"train": str(digits / "train.beton"), "val": str(digits / "val.beton"), "batch_size": 16,
                 "num_workers": 1, "flip": False, "crop_scale": [0.75, 0.8]},
        # test_supernet_train's recipe (2e-3 at a global batch of 16), distillation off
        "train": {"epochs": 1, "lr": 2e-3 * 512 / 16, "min_lr": 1e-5, "warmup_epochs": 0, "clip_grad": 1.0,
                  "seed": 0, **train},
        "search": {"baselines": [{"name": "vit", "outer_dim": 32, "inner_dim": 4, "words": 1, "inner_heads": 1,
                                  "se": "none", "tnt_blocks": []}]},
        "supernet": {"epochs": EPOCHS, "sampling": "sandwich", "k": 1, "distill": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "storage": str(tmp / "ray"),
    })


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory, ray_session):
    """A supernet trained EPOCHS epochs by ``run_supernet``: its spec and Ray Train checkpoint path."""
    from tntsearch.supernet.trainer import run_supernet

    tmp = tmp_path_factory.mktemp("export_supernet")
    spec = _spec(digits, tmp)
    result, _ = run_supernet(spec, name="sn", echo=lambda line: None)
    return spec, result.checkpoint.path


@pytest.fixture(scope="module")
def val_images(trained):
    spec, _ = trained
    _, val = make_loaders(spec.data, 16, device=torch.device("cpu"), seed=0, num_classes=10)
    return torch.cat([images for images, _ in val])[:64]


def _archs(spec: SearchSpec, net: Supernet):
    """The sub-networks the training validated (largest, smallest, the baseline) and 3 random ones."""
    from tntsearch.supernet.train import eval_archs

    g = torch.Generator().manual_seed(3)
    return {**eval_archs(spec, net), **{f"random{i}": net.sample(g) for i in range(3)}}


def test_the_extracted_sub_network_equals_the_supernet_forward(trained, val_images):
    spec, checkpoint = trained
    reference = Supernet(spec.space)
    reference.load_state_dict(torch.load(Path(checkpoint) / "checkpoint.pt", weights_only=True)["model"])
    reference.eval()
    for name, arch in _archs(spec, reference).items():
        model = inherited_model(checkpoint, spec, arch)
        assert model.config == arch and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(val_images), reference(val_images, arch), rtol=0, atol=1e-5, msg=name)


def test_the_extracted_sub_networks_score_what_the_training_measured(trained):
    spec, checkpoint = trained
    state = load_state(checkpoint)
    assert state["epoch"] == EPOCHS
    _, val = make_loaders(spec.data, 16, device=torch.device("cpu"), seed=0, num_classes=10)
    net = Supernet(spec.space)
    for name in ("largest", "smallest", "vit"):
        arch = _archs(spec, net)[name]
        _, top1, _ = evaluate(inherited_model(checkpoint, spec, arch), val, torch.device("cpu"), None, 10)
        assert top1 == pytest.approx(state["metrics"][f"val_top1_{name}"], abs=1e-9), name
    assert state["metrics"]["val_top1_largest"] > 20.0  # learned something: chance is 10%


def test_a_checkpoint_of_another_space_is_refused(trained, digits, tmp_path):
    spec, checkpoint = trained
    other = _spec(digits, tmp_path, space={**SPACE, "outer_dim": {"choice": [32, 64]}})
    with pytest.raises(ValueError, match=r"another space \(space.outer_dim differ\)"):
        inherited_model(checkpoint, other, Supernet(other.space).smallest())


def test_finetuning_starts_from_the_inherited_weights(trained, digits, tmp_path):
    """One epoch at a learning rate of 1e-9 through Ray Train leaves the inherited weights
    (and so their accuracy) as they were; ignoring them would start from a random model."""
    spec, checkpoint = trained
    arch = Supernet(spec.space).smallest()
    inherited = inherited_model(checkpoint, spec, arch)
    tuned = _spec(digits, tmp_path, lr=1e-9, min_lr=0.0)
    state, path = retrain(arch, tuned, 1, "t", initial_weights=inherited.state_dict())
    assert state["epoch"] == 1 and Path(path).is_dir()
    for key, value in inherited.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=1e-6, msg=key)
    _, val = make_loaders(spec.data, 16, device=torch.device("cpu"), seed=0, num_classes=10)
    _, top1, _ = evaluate(inherited, val, torch.device("cpu"), None, 10)
    assert state["metrics"]["val_top1"] == pytest.approx(top1, abs=1e-9)



@pytest.mark.parametrize("args, message", [
    (["--finetune", "0"], "error: `finetune` must be >= 1; got 0"),
    (["--finetune", "1", "--retrain-epochs", "1"], "argument --retrain-epochs: not allowed with argument --finetune"),
])
def test_bad_finetune_arguments_exit_2(tmp_path, capsys, args, message):
    from tntsearch.export import main

    try:
        rc = main(["--experiment", "x", *args, str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# End to end: the session's supernet mode search (tests/conftest.py ``demo_supernet_search``)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "tntsearch.export", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _top1(predict, loader) -> float:
    """Top-1 (percent) of ``predict(images) -> logits`` over a loader."""
    hits = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            hits += int((torch.as_tensor(predict(images)).argmax(-1) == labels).sum())
            seen += len(labels)
    return 100.0 * hits / seen


@pytest.fixture(scope="module")
def exported(demo_supernet_search, tmp_path_factory):
    """The search's best-accuracy front point exported through the CLI into a copy of its
    store (export registers a model; other modules read the original)."""
    s = demo_supernet_search
    root = tmp_path_factory.mktemp("export_supernet_e2e")
    shutil.copy(s.db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done = _cli(root, "--experiment", s.spec.experiment, "--tracking-uri", uri, str(root / "model"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"search": s, "uri": uri, "out": root / "model", "stdout": done.stdout}


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_the_exported_choice_reproduces_the_accuracy_the_search_recorded(exported):
    """Every format, run over data.val, scores the val_top1 the search recorded for the run.
    The search scored the same weights (the supernet's slice) on the same images in float32
    with tntsearch.train.evaluate, so the safetensors model matches it exactly; the graph
    formats agree with it within 1e-4 in the logits, which can flip an argmax only on a
    near-tie: they may differ by one image (100 / len(data.val) percent)."""
    import mlflow
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    import tntsearch
    from tntsearch.tracking import TAG_ARCH, TAG_CHECKPOINT_URI, TAG_WEIGHTS

    s, out = exported["search"], exported["out"]
    config = json.loads((out / "config.json").read_text())
    run = MlflowClient(exported["uri"]).get_run(config["source"]["run_id"])
    assert run.data.tags[TAG_WEIGHTS] == "supernet" and run.data.tags["mlflow.parentRunId"] == s.parent_run_id
    assert config["architecture"] == json.loads(run.data.tags[TAG_ARCH])
    assert config["source"]["weights"] == "supernet"
    assert config["source"]["checkpoint"] == run.data.tags[TAG_CHECKPOINT_URI]
    recorded = run.data.metrics["val_top1"]
    assert config["metrics"]["val_top1"] == recorded
    # The choice is made on the selection data, as the search made its front: a front point
    # with the best search_top1 (ties: fewer MACs; equal points, e.g. one architecture
    # proposed twice, are alike), not the best on data.val.
    client = MlflowClient(exported["uri"])
    front = [c for c in client.search_runs([run.info.experiment_id], "tags.pareto = 'true'")
             if c.data.tags.get("mlflow.parentRunId") == s.parent_run_id]
    key = lambda c: (c.data.metrics["search_top1"], -c.data.metrics["macs"])  # noqa: E731
    assert run.info.run_id in {c.info.run_id for c in front} and key(run) == max(map(key, front))
    assert config["source"]["pick"] == "best-accuracy on search_top1"
    assert "inherited from the supernet" in exported["stdout"] and "inherited from the supernet" in (
        out / "README.md").read_text()

    _, val = make_loaders(s.spec.data, 32, device="cpu")
    one_image = 100.0 / len(val.indices)
    eager = tntsearch.load_model(out)
    assert _top1(eager, val) == pytest.approx(recorded, abs=1e-6)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    mlflow.set_tracking_uri(exported["uri"])
    formats = {
        "torchscript": torch.jit.load(str(out / "model.torchscript.pt")),
        "pt2": torch.export.load(str(out / "model.pt2")).module(),
        "onnx": lambda x: session.run(["logits"], {"images": x.numpy()})[0],
        "registry": mlflow.pytorch.load_model(f"models:/{s.spec.mlflow.registered_model}@champion"),
    }
    for name, predict in formats.items():
        assert abs(_top1(predict, val) - recorded) <= one_image + 1e-9, name


def test_finetune_trains_the_inherited_weights_and_exports_them(exported, tmp_path):
    import tntsearch
    from tntsearch.model import create_model, TNTConfig

    s = exported["search"]
    out = tmp_path / "tuned"
    done = _cli(tmp_path, "--experiment", s.spec.experiment, "--tracking-uri", exported["uri"], "--finetune", "1",
                "--no-mlflow", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((exported["out"] / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    src = config["source"]
    assert config["architecture"] == first["architecture"] and src["run_id"] == first["source"]["run_id"]
    assert src["finetune_epochs"] == 1 and src["weights"] == "supernet"
    assert src["finetuned_from"] == first["source"]["checkpoint"]
    assert Path(src["checkpoint"]).is_relative_to(Path(s.spec.storage) / s.spec.name / "export")
    state = load_state(src["checkpoint"])
    assert state["epoch"] == 1 and config["metrics"]["val_top1"] == state["metrics"]["val_top1"]
    model = create_model(TNTConfig.from_dict(state["arch"]))
    model.load_state_dict(state["model"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tntsearch.load_model(out)(x), model.eval()(x))
        # it trained: the exported weights are no longer the inherited ones
        assert not torch.equal(tntsearch.load_model(out)(x), tntsearch.load_model(exported["out"])(x))


def test_the_report_shows_the_front_the_search_chose(demo_supernet_search, tmp_path):
    """``tntsearch.report`` of a supernet mode search: its front is the pareto-tagged runs
    (chosen on search_top1), not one recomputed on the data.val figures; its hypervolume is
    the one the search logged on the parent (of those points' data.val figures), and the
    front the search published (pareto/front.json) is the same."""
    from mlflow.tracking import MlflowClient

    from tntsearch.report import load_search

    s = demo_supernet_search
    search = load_search(s.tracking_uri, run_id=s.parent_run_id)
    tagged = {r["trial_id"] for r in search.rows if r["pareto"]}
    assert tagged and search.front_ids == tagged
    logged = MlflowClient(s.tracking_uri).get_run(s.parent_run_id).data.metrics["hypervolume"]
    assert search.hypervolume == pytest.approx(logged, rel=1e-9)
    front_json = json.loads(Path(MlflowClient(s.tracking_uri).download_artifacts(
        s.parent_run_id, "pareto/front.json")).read_text())
    assert {r["trial_id"] for r in front_json["front"]} == tagged
    assert front_json["hypervolume"] == pytest.approx(logged, rel=1e-9)
