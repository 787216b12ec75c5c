"""tntsearch.export against real trained models, a real MLflow store and real runtimes.

Two tiny architectures (a TNT hybrid and a DeiT) are trained for one epoch on the digits
.beton with ``tntsearch.train.fit``; their states are saved where a search keeps them (Ray
Train's ``checkpoint_*`` folders under ``<storage>/<name>/train/train-<trial_id>``, or
anywhere, named by the child run's ``tntsearch.checkpoint_uri`` tag). The search's MLflow
records are written by the real ``MlflowTracker`` driven through its Tune hooks, with each
trial's true metrics. Exports are reloaded with safetensors, TorchScript, torch.export, onnxruntime and the MLflow
registry, and compared with the model rebuilt from the checkpoint. Pick rules are checked
on fronts whose answers are worked out by hand in the comments.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tntsearch.tracking import TAG_CHECKPOINT_URI, TAG_STATUS, MlflowTracker, prepare_store  # first: MLflow telemetry off

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import tntsearch  # noqa: E402
from tntsearch import export as ex  # noqa: E402
from tntsearch.cost import count_macs, count_params  # noqa: E402
from tntsearch.model import TNTConfig, create_model, get_config  # noqa: E402
from tntsearch.spec import SearchSpec  # noqa: E402
from tntsearch.train import CHECKPOINT_FILE, TRAIN_METRICS, fit, load_state  # noqa: E402

OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 1e9)]
SMALL = dict(img_size=32, patch_size=8, num_classes=10, outer_dim=32, depth=2, outer_heads=2, mlp_ratio=2,
             inner_dim=8, words=4, inner_heads=2, inner_mlp_ratio=2, drop_path=0.0)
ARCHS = {
    "t_tnt": get_config("tnt_s", **SMALL, se="outer", tnt_blocks=[1]),
    "t_deit": get_config("tnt_s", **SMALL, tnt_blocks=[]),
}


# ---------------------------------------------------------------------------------------
# Pick rules on hand-computed fronts (no model, no store)


def _row(name, acc, macs, **more):
    return {"run_id": name, "trial_id": name, "name": name, "status": "completed",
            "metrics": {"val_top1": acc, "macs": macs, **more}}


# acc (max) vs macs (min). Front: a, b, c, d; e is dominated by b (same macs, lower acc).
# Normalised (z_acc = (90 - acc)/20, z_macs = (macs - 1)/9 over the front):
#   a (70, 1): (1, 0)       -> (1 - 1 - 0)/sqrt2      = 0
#   b (85, 2): (0.25, 1/9)  -> (1 - 0.3611)/sqrt2     = 0.4518  <- knee
#   c (88, 5): (0.1, 4/9)   -> (1 - 0.5444)/sqrt2     = 0.3221
#   d (90, 10): (0, 1)      -> 0
FRONT = [_row("a", 70.0, 1e6), _row("b", 85.0, 2e6), _row("c", 88.0, 5e6), _row("d", 90.0, 10e6),
         _row("e", 80.0, 2e6)]


def test_knee_scores_are_distances_below_the_line_through_the_extremes():
    front = FRONT[:4]
    scores = ex.knee_scores(front, OBJECTIVES)
    expected = np.array([0.0, 1 - (0.25 + 1 / 9), 1 - (0.1 + 4 / 9), 0.0]) / math.sqrt(2)
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    objs = [("val_top1", "max", 0.0), ("macs", "min", 1e9), ("params", "min", 1e9)]
    # Three objectives. Normalised (z_acc = (10 - acc)/10, z_macs = macs/10, z_params =
    # params/10) the extremes are (0,1,1), (1,0,1), (1,1,0): the plane through them is
    # z1 + z2 + z3 = 2, normal (1,1,1)/2; (0.5,0.5,0.5) lies (1 - 0.75)/sqrt(0.75) below it.
    rows = [_row("e1", 10.0, 10.0, params=10.0), _row("e2", 0.0, 0.0, params=10.0),
            _row("e3", 0.0, 10.0, params=0.0), _row("k", 5.0, 5.0, params=5.0)]
    np.testing.assert_allclose(ex.knee_scores(rows, objs), [0, 0, 0, 0.25 / math.sqrt(0.75)], atol=1e-12)
    # Degenerate: x is the extreme of both costs, so the extremes span no plane; the
    # fallback is z1 + z2 + z3 = 1, and (0.2, 0.2, 0.2) lies 0.4/sqrt3 below it.
    rows = [_row("x", 0.0, 0.0, params=0.0), _row("y", 10.0, 10.0, params=0.0), _row("z", 10.0, 0.0, params=10.0),
            _row("k", 8.0, 2.0, params=2.0)]
    np.testing.assert_allclose(ex.knee_scores(rows, objs), [0, 0, 0, 0.4 / math.sqrt(3)], atol=1e-12)


def test_pick_rules_on_a_hand_computed_front():
    assert ex.pick(FRONT, OBJECTIVES)["name"] == "d"  # default: best accuracy
    assert ex.pick(FRONT, OBJECTIVES, "knee")["name"] == "b"
    assert ex.pick(FRONT, OBJECTIVES, "min-macs")["name"] == "a"
    # Accuracy floor: the cheapest front point with val_top1 >= 86 is c (e is not on the front).
    assert ex.pick(FRONT, OBJECTIVES, "min-macs", min_accuracy=86)["name"] == "c"
    assert ex.pick(FRONT, OBJECTIVES, "min-macs", min_accuracy=80)["name"] == "b"
    # MACs cap: the most accurate with <= 5e6 MACs is c; the knee within <= 1.5e6 is a.
    assert ex.pick(FRONT, OBJECTIVES, max_macs=5e6)["name"] == "c"
    assert ex.pick(FRONT, OBJECTIVES, "knee", max_macs=1.5e6)["name"] == "a"
    # The knee is scored over the whole front, then restricted: within acc >= 86, c beats d.
    assert ex.pick(FRONT, OBJECTIVES, "knee", min_accuracy=86)["name"] == "c"


def test_pick_tie_breaks_and_errors():
    # Equal accuracy: both on the front only if neither dominates; same acc and MACs -> a tie.
    twins = [_row("p", 80.0, 3e6), _row("q", 80.0, 3e6)]
    assert ex.pick(twins, OBJECTIVES)["name"] in ("p", "q")
    # Two-point front: both knee scores are 0; the tie goes to the more accurate.
    assert ex.pick([_row("lo", 60.0, 1e6), _row("hi", 70.0, 4e6)], OBJECTIVES, "knee")["name"] == "hi"
    with pytest.raises(ValueError, match=r"none of the 4 front point\(s\) satisfies val_top1 >= 95"):
        ex.pick(FRONT, OBJECTIVES, min_accuracy=95)
    with pytest.raises(ValueError, match="`pick` must be one of best-accuracy, knee, min-macs"):
        ex.pick(FRONT, OBJECTIVES, "fastest")
    with pytest.raises(ValueError, match="no finished trial"):
        ex.pick([], OBJECTIVES)


# ---------------------------------------------------------------------------------------
# A real search's leftovers: trained checkpoints and the tracker's MLflow records


class _Trial:
    """What MlflowTracker reads from a Tune trial: its id and its name."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


def _results(arch: TNTConfig, metrics: dict, feasible: bool = True) -> dict:
    base = {"arch": arch.to_dict(), "params": float(count_params(arch)), "macs": float(count_macs(arch)),
            "throughput": 1234.5, "baseline": ""}
    if not feasible:
        return {**base, "feasible": 0, "violation": 0.5, "epoch": 0}
    return {**base, "feasible": 1, "violation": 0.0, **metrics}


def _log_search(uri: str, spec: SearchSpec, trials: list[tuple[str, dict | None, dict]]) -> str:
    """Drive the real tracker as Tune would: one result per trial, then its completion.
    ``trials``: (trial_id, result or None for a trial that died before reporting, tags to add)."""
    tracker = MlflowTracker(uri, spec.experiment, spec.model_dump(mode="json"), None, OBJECTIVES,
                            epochs=spec.train.epochs, final_retry_s=5)
    tracker.setup()
    for tid, result, _ in trials:
        trial = _Trial(tid)
        tracker.on_trial_start(0, [], trial)
        if result is not None:
            tracker.on_trial_result(0, [], trial, result)
        tracker.on_trial_complete(0, [], trial)
    assert tracker.close() is None
    client = MlflowClient(uri)
    for tid, _, tags in trials:
        if tags:
            run = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id],
                                     filter_string=f"tags.`ray.trial_id` = '{tid}'")[0]
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, v)
    return tracker.parent_run_id


def _spec(root: Path, data: Path, experiment: str, registered: str | None = "tnt-digits") -> SearchSpec:
    return SearchSpec.model_validate({
        "name": f"search-{experiment}", "space": dict(SMALL),
        "objectives": [{"metric": m, "mode": d, "ref": r} for m, d, r in OBJECTIVES],
        "data": {"train": str(data / "digits_train.beton"), "val": str(data / "digits_val.beton"),
                 "batch_size": 64, "num_workers": 1, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                 "flip": False},
        "train": {"epochs": 1, "lr": 4e-3, "warmup_epochs": 0, "precision": "fp32"},
        "mlflow": {"experiment": experiment, "registered_model": registered},
        "storage": str(root / "ray_results"),
    })


def _save_checkpoint(state: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tntsearch.data import convert

    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    for split in ("train", "val"):
        convert("digits", data / f"digits_{split}.beton", split=split, num_workers=1)
    spec = _spec(root, data, "digits")
    states = {}
    for tid, arch in ARCHS.items():
        kept = []
        fit(arch, spec.data, spec.train, report=lambda m, s: kept.append(s))
        states[tid] = kept[-1]
    uri = prepare_store(f"sqlite:///{root / 'mlflow.db'}")
    # t_tnt: found by the Ray Train layout; t_deit: named by the checkpoint URI tag.
    train_dir = Path(spec.storage) / spec.name / "train"
    _save_checkpoint({**states["t_tnt"], "epoch": 0}, train_dir / "train-t_tnt" / "checkpoint_2026-01-01_00-00-00.000000")
    _save_checkpoint(states["t_tnt"], train_dir / "train-t_tnt" / "checkpoint_2026-01-01_00-00-09.000000")
    deit_ckpt = _save_checkpoint(states["t_deit"], root / "elsewhere" / "checkpoint_x")
    metrics = {tid: {k: s["metrics"][k] for k in TRAIN_METRICS} for tid, s in states.items()}
    lost = get_config(ARCHS["t_tnt"], inner_dim=16)  # completed, but its checkpoint is gone
    parent = _log_search(uri, spec, [
        ("t_tnt", _results(ARCHS["t_tnt"], metrics["t_tnt"]), {}),
        ("t_deit", _results(ARCHS["t_deit"], metrics["t_deit"]), {TAG_CHECKPOINT_URI: deit_ckpt.as_uri()}),
        ("t_lost", _results(lost, {**metrics["t_tnt"], "val_top1": 0.0}), {}),
        ("t_infeasible", _results(get_config(ARCHS["t_tnt"], outer_dim=64), {}, feasible=False), {}),
        ("t_crashed", None, {}),
    ])
    empty = _spec(root, data, "nothing-finished")
    _log_search(uri, empty, [("f1", None, {}), ("f2", _results(ARCHS["t_tnt"], {}, feasible=False), {})])
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    client = MlflowClient(uri)
    runs = {r.data.tags["ray.trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id], filter_string="tags.`tntsearch.role` = 'trial'")}
    return {"root": root, "uri": uri, "spec": spec, "spec_file": spec_file, "states": states, "parent": parent,
            "runs": runs, "deit_checkpoint": deit_ckpt}


def _eager(state: dict) -> torch.nn.Module:
    model = create_model(TNTConfig.from_dict(state["arch"]))
    model.load_state_dict(state["model"])
    return model.eval()


def _images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def _best(world) -> str:
    """The trial best-accuracy must pick, worked out from what training gave."""
    acc = {tid: s["metrics"]["val_top1"] for tid, s in world["states"].items()}
    return max(acc, key=lambda t: (acc[t], -count_macs(ARCHS[t])))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_export_reloads_in_every_format_and_registers_the_champion(world, tmp_path, capsys):
    out = tmp_path / "model"
    rc = ex.main(["--experiment", "digits", "--tracking-uri", world["uri"], str(out)])
    assert rc == 0, capsys.readouterr().err
    best = _best(world)
    state = world["states"][best]
    assert sorted(p.name for p in out.iterdir()) == sorted(ex.FILES.values())
    assert _leftovers(out) == []

    config = json.loads((out / "config.json").read_text())
    assert TNTConfig.from_dict(config["architecture"]) == ARCHS[best]
    assert config["class_names"] == [str(d) for d in range(10)]  # digits' own class list
    assert config["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and config["preprocessing"]["std"] == [0.25] * 3
    assert config["preprocessing"]["img_size"] == 32
    assert config["metrics"]["val_top1"] == state["metrics"]["val_top1"]
    assert config["metrics"]["macs"] == count_macs(ARCHS[best])
    assert config["source"]["run_id"] == world["runs"][best].info.run_id
    assert config["source"]["parent_run_id"] == world["parent"]
    if best == "t_tnt":  # the newest checkpoint_* folder, not the epoch-0 one
        assert config["source"]["checkpoint"].endswith("checkpoint_2026-01-01_00-00-09.000000")

    x = _images(5)  # a batch size no exporter saw
    with torch.no_grad():
        want = _eager(state)(x)
        assert torch.equal(tntsearch.load_model(out)(x), want)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
        torch.testing.assert_close(scripted(x), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.export.load(str(out / "model.pt2")).module()(x), want, atol=1e-4, rtol=0)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 5):
        got = session.run(["logits"], {"images": _images(n).numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, _eager(state)(_images(n)).numpy(), atol=1e-4, rtol=0)

    import mlflow

    mlflow.set_tracking_uri(world["uri"])
    registered = mlflow.pytorch.load_model("models:/tnt-digits@champion")
    with torch.no_grad():
        torch.testing.assert_close(registered(x), want, atol=1e-5, rtol=0)
    client = MlflowClient(world["uri"])
    version = client.get_model_version_by_alias("tnt-digits", "champion")
    assert version.tags["tntsearch.trial_id"] == best
    assert world["runs"][best].info.run_id in version.description  # the model card
    assert version.run_id == world["parent"]  # logged under the search's parent run
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == world["parent"] and logged.status.name == "READY"
    assert logged.params["inner_dim"] == str(ARCHS[best].inner_dim)
    card = (out / "README.md").read_text()
    assert f"trial `{best}`" in card and f"{state['metrics']['val_top1']:.2f} %" in card
    assert "models:/tnt-digits@champion" in card


def test_run_id_export_moves_the_alias(world, tmp_path, capsys):
    """Export the trial best-accuracy does not pick, by its child run; a second registration
    becomes the new champion. Its spec comes from the file given, not the logged copy."""
    other = next(t for t in ARCHS if t != _best(world))
    out = tmp_path / "other"
    client = MlflowClient(world["uri"])
    before = {int(v.version) for v in client.search_model_versions("name = 'tnt-digits'")}
    rc = ex.main(["--run-id", world["runs"][other].info.run_id, "--spec", str(world["spec_file"]),
                  "--tracking-uri", world["uri"], str(out)])
    assert rc == 0, capsys.readouterr().err
    with torch.no_grad():
        assert torch.equal(tntsearch.load_model(out)(_images(3)), _eager(world["states"][other])(_images(3)))
    version = client.get_model_version_by_alias("tnt-digits", "champion")
    assert int(version.version) > max(before, default=0)
    assert version.tags["tntsearch.trial_id"] == other
    config = ex.read_config(out)
    assert config["source"]["pick"] == "run id"
    if other == "t_deit":
        assert config["source"]["checkpoint"] == world["deit_checkpoint"].as_uri()


@pytest.mark.parametrize("case", ["no-finished-trials", "nothing-satisfies", "missing-checkpoint",
                                  "failed-trial", "not-empty", "unknown-experiment"])
def test_bad_input_exits_2_and_leaves_nothing(world, tmp_path, capsys, case):
    out = tmp_path / "out"
    common = ["--tracking-uri", world["uri"], str(out)]
    args, message = {
        "no-finished-trials": (["--experiment", "nothing-finished"], "has no finished feasible trial"),
        "nothing-satisfies": (["--experiment", "digits", "--pick", "knee", "--min-accuracy", "101"],
                              "none of the"),
        "missing-checkpoint": (["--run-id", world["runs"]["t_lost"].info.run_id], "checkpoint not found"),
        "failed-trial": (["--run-id", world["runs"]["t_crashed"].info.run_id], "is failed"),
        "not-empty": (["--experiment", "digits"], "is not empty"),
        "unknown-experiment": (["--experiment", "nope"], "'nope' not found"),
    }[case]
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    rc = ex.main(args + common)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert _leftovers(out) == []
    if case == "missing-checkpoint":
        assert "t_lost" in err and "train-t_lost" in err


def test_failure_after_writing_keeps_the_old_out_dir(world, tmp_path):
    """MLflow cannot store the model (its artifact folder is a file): the files were already
    written, but OUT_DIR keeps its previous content and no temporary folder is left."""
    uri = prepare_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    spec = world["spec"]
    _log_search(uri, spec, [("t_deit", _results(ARCHS["t_deit"], world["states"]["t_deit"]["metrics"]),
                             {TAG_CHECKPOINT_URI: world["deit_checkpoint"].as_uri()})])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    artifacts = Path(experiment.artifact_location.removeprefix("file://"))
    assert artifacts.is_dir() and artifacts.is_relative_to(tmp_path)  # the tracker keeps them beside the db
    shutil.rmtree(artifacts)
    artifacts.write_text("not a folder")
    run_id = client.search_runs([experiment.experiment_id], filter_string="tags.`tntsearch.role` = 'trial'")[0].info.run_id
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(OSError, match="mlartifacts"):
        ex.export(out, run_id=run_id, spec=world["spec_file"], tracking_uri=uri, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(out) == []


def test_checkpoint_uri_tag_is_read_through_pyarrow(world, tmp_path):
    """A run tagged with its checkpoint's URI is read from there (pyarrow's filesystem for
    the scheme, as Ray Train's storage uses it), not from the spec's storage; a tag naming
    nothing is an error that names the tag."""
    from tntsearch.report import load_search

    client = MlflowClient(world["uri"])
    row = next(r for r in load_search(world["uri"], experiment="digits").rows if r["trial_id"] == "t_deit")
    row = {**row, "tags": client.get_run(row["run_id"]).data.tags}
    uri = world["deit_checkpoint"].as_uri()
    assert uri.startswith("file:///") and ex.find_checkpoint(row, None) == uri
    state = ex.read_state(uri)
    for k, v in world["states"]["t_deit"]["model"].items():
        assert torch.equal(state["model"][k], v), k
    gone = {**row, "tags": {TAG_CHECKPOINT_URI: (tmp_path / "gone").as_uri()}}
    with pytest.raises(FileNotFoundError, match="tntsearch.checkpoint_uri"):
        ex.find_checkpoint(gone, world["spec"])


def test_a_failed_publish_leaves_the_champion_alias_where_it_was(world, tmp_path):
    """The alias moves last. OUT_DIR cannot be replaced here (the name its old content is
    moved aside to, ``.model.old-<pid>``, is a non-empty folder): the new version is
    registered, but ``champion`` still names the version it named before and OUT_DIR keeps
    its content."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(world["uri"])

    def champion() -> str | None:
        try:
            return client.get_model_version_by_alias("tnt-digits", "champion").version
        except MlflowException:  # no alias (or no model) yet: this test ran alone
            return None

    def versions() -> set[str]:
        try:
            return {v.version for v in client.search_model_versions("name = 'tnt-digits'")}
        except MlflowException:
            return set()

    before, known = champion(), versions()
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    blocker = out.with_name(f".{out.name}.old-{os.getpid()}")
    blocker.mkdir()
    (blocker / "x").write_text("in the way")
    with pytest.raises(OSError):
        ex.export(out, experiment="digits", tracking_uri=world["uri"], overwrite=True)
    assert len(versions() - known) == 1  # registered before publishing...
    assert champion() == before  # ...but not promoted
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(out) == [blocker.name]


def test_a_class_list_beside_another_beton_is_refused(world, tmp_path, capsys):
    """A ``.beton`` replaced while its class list stayed (a convert that died between its two
    renames): the stale list is refused, by ``read_classes`` and by export (exit 2), instead
    of naming the new file's classes with the old names or with label indices."""
    from tntsearch.data import convert, read_classes

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        beton = Path(getattr(world["spec"].data, split))
        for f in (beton, beton.with_suffix(".classes.json")):
            shutil.copy(f, data / f.name)  # a copy (new mtime) keeps its class list valid
    val = data / "digits_val.beton"
    assert read_classes(val) == [str(d) for d in range(10)]
    convert("synthetic", tmp_path / "other.beton", split="val", num_samples=20, num_classes=10, img_size=16,
            num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other.beton", "other.classes.json"]  # no temp left
    os.replace(tmp_path / "other.beton", val)
    with pytest.raises(ValueError, match="written with another version"):
        read_classes(val)
    spec = world["spec"].model_copy(update={"data": world["spec"].data.model_copy(
        update={"train": str(data / "digits_train.beton"), "val": str(val)})})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    rc = ex.main(["--run-id", world["runs"]["t_tnt"].info.run_id, "--spec", str(spec_file), "--no-mlflow",
                  "--tracking-uri", world["uri"], str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "digits_val.classes.json: written with another version" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_retrain_epochs_trains_again_with_ray_train(world, tmp_path, capsys):
    import ray

    out = tmp_path / "retrained"
    try:
        rc = ex.main(["--experiment", "digits", "--pick", "min-macs", "--retrain-epochs", "1", "--no-mlflow",
                      "--tracking-uri", world["uri"], str(out)])
    finally:
        ray.shutdown()
    assert rc == 0, capsys.readouterr().err
    config = ex.read_config(out)
    cheapest = min(ARCHS, key=lambda t: count_macs(ARCHS[t]))
    assert TNTConfig.from_dict(config["architecture"]) == ARCHS[cheapest]
    assert config["source"]["retrain_epochs"] == 1
    checkpoint = Path(config["source"]["checkpoint"])
    assert checkpoint.is_relative_to(Path(world["spec"].storage) / world["spec"].name / "export")
    state = load_state(checkpoint)
    assert state["epoch"] == 1 and config["metrics"]["val_top1"] == state["metrics"]["val_top1"]
    with torch.no_grad():
        assert torch.equal(tntsearch.load_model(out)(_images(2)), _eager(state)(_images(2)))
    assert config["source"]["registered_model"] is None
