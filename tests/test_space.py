"""The space round-trips through a real Optuna study: what is suggested is what is built."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tntsearch.model import PRESETS
from tntsearch.space import arch_from_params, baseline_points, define_by_run, searched_params
from tntsearch.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tnt_s_spec():
    return load_spec(ROOT / "search_spaces" / "tnt_s.yaml")


def test_searched_params_are_the_choices(tnt_s_spec):
    assert searched_params(tnt_s_spec.space) == ["inner_dim", "words", "inner_heads", "se", "tnt_blocks"]


def test_baselines_enqueued_in_optuna_rebuild_the_presets(tnt_s_spec):
    # Table 5: every TNT-S-k variant and DeiT-S is a point of the per-block space.
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    points = baseline_points(tnt_s_spec)
    for _, point in points:
        study.enqueue_trial(point)
    suggest = define_by_run(tnt_s_spec.space)
    for name, _ in points:
        trial = study.ask()
        suggest(trial)
        arch = arch_from_params(trial.params, tnt_s_spec.space)
        assert arch == PRESETS[name], name
        study.tell(trial, [0.0, 0.0])
    assert [n for n, _ in points] == ["tnt_s", "tnt_s_1", "tnt_s_2", "tnt_s_3", "tnt_s_4", "deit_s"]


def test_sampled_points_stay_in_the_space(tnt_s_spec):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    suggest = define_by_run(tnt_s_spec.space)
    seen_blocks = set()
    for _ in range(40):
        trial = study.ask()
        suggest(trial)
        try:
            arch = arch_from_params(trial.params, tnt_s_spec.space)
        except ValueError as e:  # e.g. 8 inner heads on c = 12: reported infeasible by the search
            assert "inner_heads" in str(e)
            study.tell(trial, 0.0)
            continue
        assert arch.inner_dim in (12, 24, 48) and arch.words in (4, 16, 64)
        assert arch.outer_dim == 384 and arch.depth == 12 and arch.img_size == 224
        seen_blocks.add(len(arch.tnt_blocks))
        study.tell(trial, 0.0)
    assert len(seen_blocks) > 3  # per-block switches give varied mixes


def test_choice_of_block_lists_round_trips(tmp_path):
    spec_text = (ROOT / "search_spaces" / "demo.yaml").read_text().replace(
        "tnt_blocks: {per_block: true}", "tnt_blocks: {choice: [[1, 2, 3, 4], [1], []]}"
    )
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text)
    spec = load_spec(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found = set()
    for _ in range(20):
        trial = study.ask()
        define_by_run(spec.space)(trial)
        assert trial.params["tnt_blocks"] in ("1,2,3,4", "1", "")
        found.add(arch_from_params(trial.params, spec.space).tnt_blocks)
        study.tell(trial, 0.0)
    assert found == {(1, 2, 3, 4), (1,), ()}
