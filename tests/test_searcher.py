"""The searcher and the schedulers the spec names, in real Ray Tune runs that train nothing
(docs/faults.md, "The searcher across runs and resumes").

The searches run the real trainable (``search.run_trial`` through ``search.make_tuner``) on
the demo space with ``max_macs`` below every architecture: each trial is costed and reported
infeasible at once, so a search of ten trials takes seconds, yet the sampler gets the real
results and constraint values, and Tune pickles, snapshots and restores the real searcher.
ASHA gets a trainable of this module that reports fixed accuracies epoch by epoch, so which
trial it stops is worked out by hand.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from search_utils import ROOT, demo_spec

from tntsearch.search import ConstrainedOptunaSearch, experiment_path, make_scheduler, make_tuner
from tntsearch.spec import load_spec

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # not importable on Ray workers

MAX_MACS = 1.0e5  # the demo space's cheapest architecture has 2.57 M MACs: every trial is infeasible
DEMO = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())


def _spec(tmp_path: Path, digits: Path, name: str, num_samples: int, **search):
    path = demo_spec(tmp_path, digits, name, num_samples=num_samples, epochs=1, max_concurrent=1,
                     constraints={"max_macs": MAX_MACS}, **search)
    return load_spec(path, tmp_path)


def _trials(spec) -> list:
    """Tune's trials of a search, in the order they were created (their tag's counter)."""
    trials = ExperimentAnalysis(experiment_path(spec)).trials
    return sorted(trials, key=lambda t: int(t.experiment_tag.split("_")[0]))


def _saved_searcher(spec) -> ConstrainedOptunaSearch:
    """The searcher as Tune saved it with the experiment state (what a resume starts from)."""
    searcher = ConstrainedOptunaSearch()
    searcher.restore_from_dir(experiment_path(spec))
    return searcher


class _InterruptAfter(tune.Callback):
    """Ctrl-C for an in-process search: SIGINT once ``n`` trials have finished. Tune's own
    handler takes it, saves the experiment state and returns, as for a user's Ctrl-C. After
    a restore the count is past ``n``: it does not fire again."""

    def __init__(self, n: int):
        self.n = n

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = {t.trial_id for t in trials if t.status == Trial.TERMINATED} | {trial.trial_id}
        if len(done) == self.n:
            signal.raise_signal(signal.SIGINT)


def _assert_valid_proposals(spec, trials) -> None:
    """Every trial finished, reported no error, and its parameters are the demo space's
    (names and values read from search_spaces/demo.yaml, not through tntsearch.space)."""
    space = DEMO["space"]
    choices = {k: v["choice"] for k, v in space.items() if isinstance(v, dict) and "choice" in v}
    blocks = {f"tnt_block_{i}" for i in range(1, space["depth"] + 1)}
    assert len(trials) == spec.search.num_samples
    for t in trials:
        assert t.status == Trial.TERMINATED, (t.trial_id, t.status)
        assert set(t.config) == set(choices) | blocks, t.config
        assert all(t.config[k] in v for k, v in choices.items()), t.config
        assert all(isinstance(t.config[b], bool) for b in blocks)
        result = t.last_result
        assert "error" not in result and result["feasible"] == 0, result
        arch = result["arch"]  # the architecture run_trial built from the config
        assert {k: arch[k] for k in choices} == {k: t.config[k] for k in choices}
        assert arch["tnt_blocks"] == [i for i in range(1, space["depth"] + 1) if t.config[f"tnt_block_{i}"]]
        assert result["macs"] > MAX_MACS and result["constraint_max_macs"] == pytest.approx((result["macs"] - MAX_MACS) / MAX_MACS)


@pytest.fixture(scope="module")
def nsga2_searches(tmp_path_factory, digits, ray_session):
    """The demo's NSGA-II search (seed 0, population 4) of 9 trials twice: once straight
    through, once interrupted after 6 finished trials (the two baselines and NSGA-II's
    random first generation) and resumed with ``make_tuner(resume=True)``, as ``--resume``
    does: the last 3 trials are the second generation, bred from the first."""
    tmp = tmp_path_factory.mktemp("nsga2")
    straight = _spec(tmp, digits, "straight", 9)
    make_tuner(straight).fit()
    resumed = _spec(tmp, digits, "resumed", 9)
    make_tuner(resumed, callbacks=[_InterruptAfter(6)]).fit()
    interrupted_at = len(_trials(resumed))
    make_tuner(resumed, resume=True).fit()
    return straight, resumed, interrupted_at


def test_nsga2_search_proposes_valid_architectures(nsga2_searches):
    straight, _, _ = nsga2_searches
    _assert_valid_proposals(straight, _trials(straight))


def test_the_constraint_values_reach_optuna(nsga2_searches):
    """ConstrainedOptunaSearch hands each reported ``constraint_<name>`` to Optuna's
    ``Trial.set_constraint``: Optuna 5.1 keeps it as the system attribute
    ``constraints:<name>``, which NSGA-II's constrained domination reads (``FrozenTrial.constraints``)."""
    straight, _, _ = nsga2_searches
    searcher = _saved_searcher(straight)
    optuna_trials = {tid: searcher._ot_study.trials[ot.number] for tid, ot in searcher._ot_trials.items()}
    trials = _trials(straight)
    assert set(optuna_trials) == {t.trial_id for t in trials}
    for t in trials:
        frozen = optuna_trials[t.trial_id]
        assert frozen.system_attrs["constraints:max_macs"] == t.last_result["constraint_max_macs"]
        assert frozen.constraints == {"max_macs": t.last_result["constraint_max_macs"]}
        assert frozen.values == [t.last_result["val_top1"], t.last_result["macs"]]


def test_the_sampler_keeps_its_history_across_a_resume(nsga2_searches):
    """The resumed search proposes exactly what the uninterrupted one did: after the
    restore NSGA-II breeds its second generation from the first, evaluated before it."""
    straight, resumed, interrupted_at = nsga2_searches
    assert 6 <= interrupted_at < 9, "the first run was not interrupted mid-search"
    expected, got = _trials(straight), _trials(resumed)
    assert [t.config for t in got] == [t.config for t in expected]
    _assert_valid_proposals(resumed, got)
    searcher = _saved_searcher(resumed)
    key = searcher._sampler._get_generation_key()
    # The baselines are enqueued (no generation), then populations of 4.
    assert [t.system_attrs.get(key) for t in searcher._ot_study.trials] == [None] * 2 + [0] * 4 + [1] * 3


def _infeasible_after_first_generation(spec, *, feedback: bool) -> int:
    """How many of NSGA-II's proposals after its first generation break ``max_macs``, the
    searcher driven as Tune drives it (``suggest``, then ``on_trial_complete`` with the
    trial's result) on the demo space's real MACs. The accuracy rises with MACs, so the
    infeasible large architectures look best unless the constraint values say otherwise;
    ``feedback=False`` leaves them out of the results."""
    from tntsearch.cost import count_macs
    from tntsearch.search import make_searcher
    from tntsearch.space import arch_from_params

    searcher, infeasible = make_searcher(spec), []
    for i in range(spec.search.num_samples):
        macs = count_macs(arch_from_params(searcher.suggest(str(i)), spec.space))
        violation = (macs - spec.constraints.max_macs) / spec.constraints.max_macs
        result = {"val_top1": macs / 1e5, "macs": macs, **({"constraint_max_macs": violation} if feedback else {})}
        searcher.on_trial_complete(str(i), result)
        infeasible.append(violation > 0)
    return sum(infeasible[2 + spec.search.population_size:])  # after the baselines and generation 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsga2_samples_the_infeasible_region_less_once_it_knows_the_constraint(seed, tmp_path, digits):
    """26 trials, max_macs 3.5 M (about half the space): measured here, 0 to 5 of the 20
    proposals after generation 0 were infeasible with the constraint values and 10 to 15
    without them."""
    path = demo_spec(tmp_path, digits, "feedback", num_samples=26, epochs=1, max_concurrent=1,
                     constraints={"max_macs": 3.5e6}, seed=seed)
    spec = load_spec(path, tmp_path)
    told, untold = (_infeasible_after_first_generation(spec, feedback=f) for f in (True, False))
    assert told <= untold / 2, (told, untold)


@pytest.mark.parametrize("algorithm, num_samples", [
    ("random", 4),
    ("tpe", 12),  # TPESampler's model proposes after its 10 start-up trials
])
def test_tpe_and_random_searches_finish_with_valid_architectures(algorithm, num_samples, tmp_path, digits, ray_session):
    spec = _spec(tmp_path, digits, algorithm, num_samples, algorithm=algorithm)
    make_tuner(spec).fit()
    trials = _trials(spec)
    _assert_valid_proposals(spec, trials)
    assert [t.last_result["baseline"] for t in trials[:2]] == [b["name"] for b in DEMO["search"]["baselines"]]
    proposed = {tuple(sorted(t.config.items())) for t in trials[2:]}
    assert len(proposed) > 1, "the sampler proposed one architecture only"


def _fixed_accuracy(config):
    """Reports ``config["acc"]`` as ``val_top1`` at every epoch, as many epochs as the spec trains."""
    for epoch in range(1, config["epochs"] + 1):
        tune.report({"epoch": epoch, "val_top1": config["acc"]})


def test_asha_from_the_spec_stops_trials_below_a_rung_cutoff(tmp_path, digits, ray_session):
    """``scheduler: {type: asha, grace_period: 1, reduction_factor: 2}`` over 4 epochs: rungs
    at epochs 1, 2 and 4, a trial stops when its accuracy is below the median of the earlier
    ones at that rung (Ray's ASHA: percentile 1 - 1/2). One trial at a time, accuracies
    0.5, 0.3, 0.7, 0.55:

    - 0.5 is alone at every rung: 4 epochs;
    - 0.3 at epoch 1 is below 0.5: stopped after 1;
    - 0.7 at epoch 1 beats the median of 0.5, 0.3 (0.4), at 2 it beats 0.5: 4 epochs;
    - 0.55 at epoch 1 beats the median of 0.5, 0.3, 0.7 (0.5), at 2 it is below the
      median of 0.5, 0.7 (0.6): stopped after 2.
    """
    path = demo_spec(tmp_path, digits, "asha", num_samples=4, epochs=4)
    raw = yaml.safe_load(path.read_text())
    raw["search"]["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path, tmp_path)
    scheduler = make_scheduler(spec)
    assert isinstance(scheduler, tune.schedulers.ASHAScheduler)
    accuracies = [0.5, 0.3, 0.7, 0.55]
    tuner = tune.Tuner(
        _fixed_accuracy,
        param_space={"acc": tune.grid_search(accuracies), "epochs": spec.train.epochs},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path / "ray_results"), verbose=0),
    )
    results = tuner.fit()
    last_epoch = {r.config["acc"]: r.metrics["epoch"] for r in results}
    assert [last_epoch[a] for a in accuracies] == [4, 1, 4, 2]
