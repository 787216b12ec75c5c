"""tntsearch.export against the session's real tiny search (tests/conftest.py
``demo_search``): its MLflow store as the CLI's tracker wrote it, its Ray Train checkpoints
where the search left them, and Tune's results as the references (what each trial
reported: architecture, costs, accuracy, checkpoint path). Exports are reloaded with
safetensors, TorchScript, torch.export, onnxruntime and the MLflow registry, and compared
with the model rebuilt from the checkpoint. Pick rules are checked on fronts whose answers
are worked out by hand in the comments.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from search_utils import log_replayed
from tntsearch.tracking import TAG_CHECKPOINT_URI, MlflowTracker, prepare_store  # first: MLflow telemetry off

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import tntsearch  # noqa: E402
from tntsearch import export as ex  # noqa: E402
from tntsearch.cost import count_macs  # noqa: E402
from tntsearch.model import TNTConfig, create_model  # noqa: E402
from tntsearch.spec import SearchSpec  # noqa: E402
from tntsearch.train import load_state  # noqa: E402

OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 1e9)]


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
# The demo search's leftovers: its MLflow store, Tune results and Ray Train checkpoints


def _log_search(uri: str, spec: SearchSpec, experiment: str, trials: list[tuple[str, list[dict]]]) -> None:
    """The real tracker, driven as Tune drives it, logs ``trials`` (``log_replayed``)."""
    tracker = MlflowTracker(uri, experiment, spec.model_dump(mode="json"), None, spec.objectives,
                            epochs=spec.train.epochs, final_retry_s=5)
    tracker.setup()
    log_replayed(tracker, spec, trials)
    assert tracker.pending == 0


@pytest.fixture(scope="module")
def world(demo_search, tmp_path_factory):
    """The demo search as export finds it, in a copy of its store (export registers models
    and moves aliases; other modules read the original): each trained trial's run names its
    last checkpoint (``tntsearch.checkpoint_uri``). Beside it, a search none of whose trials
    finished: one died before reporting, one is the demo's infeasible trial replayed."""
    root = tmp_path_factory.mktemp("export")
    shutil.copy(demo_search.db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = demo_search.spec
    results = {tid: demo_search.last(tid) for tid in demo_search.results}
    trained = demo_search.trained()
    # best-accuracy's answer, from what training reported to Tune: the front's most accurate
    best = max(trained, key=lambda t: (results[t]["val_top1"], -results[t]["macs"]))
    other = next(t for t in trained if t != best)
    client = MlflowClient(uri)
    runs = {r.data.tags["ray.trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name(spec.experiment).experiment_id], filter_string="tags.`tntsearch.role` = 'trial'")}
    infeasible = demo_search.infeasible()[0]
    _log_search(uri, spec, "nothing-finished", [("f1", []), ("f2", demo_search.reported(infeasible))])
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    client = MlflowClient(uri)
    crashed = client.search_runs([client.get_experiment_by_name("nothing-finished").experiment_id],
                                 filter_string="tags.`ray.trial_id` = 'f1'")[0]
    return {"root": root, "uri": uri, "spec": spec, "spec_file": spec_file, "parent": demo_search.parent_run_id,
            "demo": demo_search, "results": results, "best": best, "other": other, "infeasible": infeasible,
            "runs": runs, "crashed": crashed,
            "registered": spec.mlflow.registered_model}


def _state(world, trial_id: str) -> dict:
    """The state of the trial's last checkpoint, where Tune's last result says it is."""
    return load_state(world["results"][trial_id]["checkpoint_path"])


def _eager(state: dict) -> torch.nn.Module:
    model = create_model(TNTConfig.from_dict(state["arch"]))
    model.load_state_dict(state["model"])
    return model.eval()


def _images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_export_reloads_in_every_format_and_registers_the_champion(world, tmp_path, capsys):
    out = tmp_path / "model"
    rc = ex.main(["--experiment", world["spec"].experiment, "--tracking-uri", world["uri"], str(out)])
    assert rc == 0, capsys.readouterr().err
    best, spec = world["best"], world["spec"]
    reported = world["results"][best]
    state = _state(world, best)
    assert sorted(p.name for p in out.iterdir()) == sorted(ex.FILES.values())
    assert _leftovers(out) == []

    config = json.loads((out / "config.json").read_text())
    arch = TNTConfig.from_dict(reported["arch"])
    assert TNTConfig.from_dict(config["architecture"]) == arch
    assert config["class_names"] == [str(d) for d in range(10)]  # digits' own class list
    assert config["preprocessing"]["mean"] == list(spec.data.mean) and config["preprocessing"]["std"] == list(spec.data.std)
    assert config["preprocessing"]["img_size"] == 32
    assert config["metrics"]["val_top1"] == state["metrics"]["val_top1"] == reported["val_top1"]
    assert config["metrics"]["macs"] == count_macs(arch) == reported["macs"]
    assert config["source"]["run_id"] == world["runs"][best].info.run_id
    assert config["source"]["parent_run_id"] == world["parent"]
    # The newest of the trial's checkpoint_* folders (Ray Train keeps both epochs'), the one
    # its last result names, not epoch 1's.
    train_dir = Path(spec.storage) / spec.name / "train" / f"train-{best}"
    kept = sorted(p for p in train_dir.glob("checkpoint_*") if p.is_dir())  # beside checkpoint_manager_snapshot.json
    assert [load_state(k)["epoch"] for k in kept] == [1, 2]
    assert config["source"]["checkpoint"] == str(kept[-1]) == reported["checkpoint_path"]

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
    registered = mlflow.pytorch.load_model(f"models:/{world['registered']}@champion")
    with torch.no_grad():
        torch.testing.assert_close(registered(x), want, atol=1e-5, rtol=0)
    client = MlflowClient(world["uri"])
    version = client.get_model_version_by_alias(world["registered"], "champion")
    assert version.tags["tntsearch.trial_id"] == best
    assert world["runs"][best].info.run_id in version.description  # the model card
    assert version.run_id == world["parent"]  # logged under the search's parent run
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == world["parent"] and logged.status.name == "READY"
    assert logged.params["inner_dim"] == str(arch.inner_dim)
    card = (out / "README.md").read_text()
    assert f"trial `{best}`" in card and f"{state['metrics']['val_top1']:.2f} %" in card
    assert f"models:/{world['registered']}@champion" in card


def test_run_id_export_moves_the_alias(world, tmp_path, capsys):
    """Export a trial best-accuracy does not pick, by its child run; a second registration
    becomes the new champion. Its spec comes from the file given, not the logged copy."""
    other = world["other"]
    out = tmp_path / "other"
    client = MlflowClient(world["uri"])
    before = {int(v.version) for v in client.search_model_versions(f"name = '{world['registered']}'")}
    rc = ex.main(["--run-id", world["runs"][other].info.run_id, "--spec", str(world["spec_file"]),
                  "--tracking-uri", world["uri"], str(out)])
    assert rc == 0, capsys.readouterr().err
    with torch.no_grad():
        assert torch.equal(tntsearch.load_model(out)(_images(3)), _eager(_state(world, other))(_images(3)))
    version = client.get_model_version_by_alias(world["registered"], "champion")
    assert int(version.version) > max(before, default=0)
    assert version.tags["tntsearch.trial_id"] == other
    config = ex.read_config(out)
    assert config["source"]["pick"] == "run id"
    assert config["source"]["checkpoint"] == world["results"][other]["checkpoint_path"]


@pytest.mark.parametrize("case", ["no-finished-trials", "nothing-satisfies", "missing-checkpoint",
                                  "failed-trial", "infeasible-trial", "not-empty", "unknown-experiment"])
def test_bad_input_exits_2_and_leaves_nothing(world, tmp_path, capsys, case):
    out = tmp_path / "out"
    uri, experiment, best = world["uri"], world["spec"].experiment, world["best"]
    deleted = tmp_path / "deleted" / "checkpoint_x"
    if case == "missing-checkpoint":  # in a copy of the store, the run names a checkpoint deleted since
        shutil.copy(uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        MlflowClient(uri).set_tag(world["runs"][best].info.run_id, TAG_CHECKPOINT_URI, str(deleted))
    common = ["--tracking-uri", uri, str(out)]
    args, message = {
        "no-finished-trials": (["--experiment", "nothing-finished"], "has no finished feasible trial"),
        "nothing-satisfies": (["--experiment", experiment, "--pick", "knee", "--min-accuracy", "101"],
                              "none of the"),
        "missing-checkpoint": (["--run-id", world["runs"][best].info.run_id], "checkpoint not found"),
        "failed-trial": (["--run-id", world["crashed"].info.run_id], "is failed"),
        "infeasible-trial": (["--run-id", world["runs"][world["infeasible"]].info.run_id], "is infeasible; only completed"),
        "not-empty": (["--experiment", experiment], "is not empty"),
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
        assert best in err and f"{deleted}/checkpoint.pt" in err and TAG_CHECKPOINT_URI in err


def test_failure_after_writing_keeps_the_old_out_dir(world, tmp_path):
    """MLflow cannot store the model (its artifact folder is a file): the files were already
    written, but OUT_DIR keeps its previous content and no temporary folder is left."""
    uri = prepare_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    spec, best = world["spec"], world["best"]
    _log_search(uri, spec, spec.experiment, [(best, world["demo"].reported(best))])
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


def test_checkpoint_is_found_by_its_tag_or_in_ray_trains_layout(world, tmp_path):
    """The run's ``tntsearch.checkpoint_uri`` tag (what the search recorded) names the
    checkpoint, read through pyarrow's filesystems (a local path, or a URI such as file://
    or s3:// as Ray Train's storage uses them); a run without the tag is looked up as Ray
    Train lays runs out under the spec's storage (its newest ``checkpoint_*`` folder); a tag
    naming nothing is an error that names the tag."""
    from tntsearch.report import load_search

    client = MlflowClient(world["uri"])
    other = world["other"]
    row = next(r for r in load_search(world["uri"], experiment=world["spec"].experiment).rows if r["trial_id"] == other)
    row = {**row, "tags": client.get_run(row["run_id"]).data.tags}
    path = world["results"][other]["checkpoint_path"]
    assert ex.find_checkpoint(row, None) == path
    assert ex.find_checkpoint({**row, "tags": {}}, world["spec"]) == path
    want = _state(world, other)["model"]
    for checkpoint in (path, Path(path).as_uri()):
        state = ex.read_state(checkpoint)
        for k, v in want.items():
            assert torch.equal(state["model"][k], v), (checkpoint, k)
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
            return client.get_model_version_by_alias(world["registered"], "champion").version
        except MlflowException:  # no alias (or no model) yet: this test ran alone
            return None

    def versions() -> set[str]:
        try:
            return {v.version for v in client.search_model_versions(f"name = '{world['registered']}'")}
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
        ex.export(out, experiment=world["spec"].experiment, tracking_uri=world["uri"], overwrite=True)
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
    val = data / Path(world["spec"].data.val).name
    assert read_classes(val) == [str(d) for d in range(10)]
    convert("synthetic", tmp_path / "other.beton", split="val", num_samples=20, num_classes=10, img_size=16,
            num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other.beton", "other.classes.json"]  # no temp left
    os.replace(tmp_path / "other.beton", val)
    with pytest.raises(ValueError, match="written with another version"):
        read_classes(val)
    spec = world["spec"].model_copy(update={"data": world["spec"].data.model_copy(
        update={"train": str(data / Path(world["spec"].data.train).name), "val": str(val)})})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    rc = ex.main(["--run-id", world["runs"][world["best"]].info.run_id, "--spec", str(spec_file), "--no-mlflow",
                  "--tracking-uri", world["uri"], str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{val.stem}.classes.json: written with another version" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_retrain_epochs_trains_again_with_ray_train(world, tmp_path, capsys):
    import ray

    out = tmp_path / "retrained"
    try:
        rc = ex.main(["--experiment", world["spec"].experiment, "--pick", "min-macs", "--retrain-epochs", "1",
                      "--no-mlflow", "--tracking-uri", world["uri"], str(out)])
    finally:
        ray.shutdown()
    assert rc == 0, capsys.readouterr().err
    config = ex.read_config(out)
    cheapest = min(world["demo"].trained(), key=lambda t: world["results"][t]["macs"])  # always on the front
    assert TNTConfig.from_dict(config["architecture"]) == TNTConfig.from_dict(world["results"][cheapest]["arch"])
    assert config["source"]["retrain_epochs"] == 1
    checkpoint = Path(config["source"]["checkpoint"])
    assert checkpoint.is_relative_to(Path(world["spec"].storage) / world["spec"].name / "export")
    state = load_state(checkpoint)
    assert state["epoch"] == 1 and config["metrics"]["val_top1"] == state["metrics"]["val_top1"]
    with torch.no_grad():
        assert torch.equal(tntsearch.load_model(out)(_images(2)), _eager(state)(_images(2)))
    assert config["source"]["registered_model"] is None
