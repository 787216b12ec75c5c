"""Export in supernet mode: the sub-network's weights come out of a real supernet checkpoint
(``run_supernet`` through Ray Train on digits at 16 x 16) and equal the supernet's own
forward for that sub-network; fine-tuning starts from those weights through the real
trainer (``make_trainer(initial_weights=...)``)."""
from __future__ import annotations

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
