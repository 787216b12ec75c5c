"""The spec: shipped files load, and bad specs name the field that is wrong."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tntsearch.space import check_space
from tntsearch.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"


def _write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    edit(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["demo", "tnt_s", "tnt_ti"])
def test_shipped_specs_load_and_their_spaces_can_run(name):
    spec = load_spec(ROOT / "search_spaces" / f"{name}.yaml")
    cheapest = check_space(spec)
    assert cheapest["macs"] < (spec.constraints.max_macs or float("inf"))
    assert Path(spec.data.train).is_absolute() and Path(spec.storage).is_absolute()


def test_tnt_s_space_reaches_deit_s_cost():
    # All-vanilla is DeiT-S: the paper's Table 5 puts it at 4.6 G MACs.
    cheapest = check_space(load_spec(ROOT / "search_spaces" / "tnt_s.yaml"))
    assert cheapest["macs"] == pytest.approx(4.6e9, abs=0.1e9)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(bogus=1), "bogus"),
        (lambda r: r["train"].update(epochs="many"), "train.epochs"),
        (lambda r: r["search"].update(algorithm="grid"), "search.algorithm"),
        (lambda r: r["space"].update(width=3), "space"),
        (lambda r: r["objectives"].append({"metric": "val_top1", "mode": "max", "ref": 0}), "objectives"),
        (lambda r: r["resources"].update(gpus_per_worker=1), "resources"),
        (lambda r: r["space"].update(inner_dim={"int": [16, 8]}), "space.inner_dim"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, edit, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_spec(_write(tmp_path, edit))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["space"].update(inner_heads=3, inner_dim=16), "no architecture in the space is valid"),
        (lambda r: r["constraints"].update(max_macs=1e5), "constraints.max_macs"),
        (lambda r: r["constraints"].update(max_params=1e3), "constraints.max_params"),
        (lambda r: r["search"].update(baselines=["tnt_s"]), r"search.baselines\[0\]"),
        (lambda r: r["search"].update(baselines=[{"name": "x", "inner_dim": 7}]), r"search.baselines\[0\] \(x\)"),
    ],
)
def test_space_errors_name_the_field(tmp_path, edit, message):
    with pytest.raises(SpecError, match=message):
        check_space(load_spec(_write(tmp_path, edit)))


def test_cli_bad_spec_exits_2_and_starts_nothing(tmp_path):
    path = _write(tmp_path, lambda r: r["space"].update(outer_heads=5))
    proc = subprocess.run(
        [sys.executable, "-m", "tntsearch.run", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "outer_heads" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_missing_data_exits_2_naming_the_path(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tntsearch.run", str(DEMO)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "data.train" in proc.stderr and "digits_train.beton" in proc.stderr
