"""The supernet without Ray: every sub-network's forward equals its extracted standalone
model, the extracted model costs what tntsearch.cost says, one step through the supernet
is the same step on the extracted model, the spec refuses what cannot be shared, and the
sampler draws the same sub-networks again after a resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from torch.utils.flop_counter import FlopCounterMode

from tntsearch.cost import count_macs, count_params
from tntsearch.model import TNTConfig
from tntsearch.spec import SearchSpec, SpecError, TrainSpec, load_spec
from tntsearch.supernet import Supernet, SubnetSampler, SubnetSpace
from tntsearch.train import make_loss, make_optimizer

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
# Every elastic parameter searched, at 16 x 16 (patch 4: m = 1, 4 or 16).
WIDE = {
    "img_size": 16, "patch_size": 4, "num_classes": 5, "outer_dim": {"choice": [24, 48]}, "depth": {"int": [1, 3]},
    "outer_heads": {"choice": [2, 3, 4]}, "mlp_ratio": {"float": [1.0, 2.5]}, "inner_dim": {"choice": [4, 8, 12]},
    "words": {"choice": [1, 4, 16]}, "inner_heads": {"choice": [1, 2]}, "inner_mlp_ratio": {"choice": [1, 2]},
    "se": {"choice": ["none", "outer", "inner", "both"]}, "tnt_blocks": {"per_block": True}, "drop_path": 0.1,
}


def _spec(space, **extra) -> SearchSpec:
    return SearchSpec.model_validate({"name": "t", "space": space, "data": {"train": "t.beton", "val": "v.beton"},
                                      "objectives": [{"metric": "val_top1", "mode": "max", "ref": 0.0}], **extra})


@pytest.fixture(scope="module")
def demo_space():
    return _spec(yaml.safe_load(DEMO.read_text())["space"]).space


@pytest.fixture(scope="module")
def demo_net(demo_space):
    torch.manual_seed(0)
    return Supernet(demo_space).eval()


def _corners(net: Supernet) -> list[TNTConfig]:
    big, small = net.largest(), net.smallest()
    rep = lambda a, **kw: TNTConfig(**{**a.to_dict(), **kw})  # noqa: E731
    return [big, small, rep(big, tnt_blocks=()), rep(small, tnt_blocks=(1, 2, 3, 4)),
            rep(big, words=4, inner_dim=8, inner_heads=1), rep(small, words=16, inner_dim=32, tnt_blocks=(2,))]


def _sampled(net: Supernet, n: int, seed: int) -> list[TNTConfig]:
    g = torch.Generator().manual_seed(seed)
    return [net.sample(g) for _ in range(n)]


def _macs(forward) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


def test_corners_of_the_demo_space(demo_net):
    big, small = demo_net.largest(), demo_net.smallest()
    assert (big.inner_dim, big.words, big.inner_heads, big.se, big.tnt_blocks) == (32, 16, 4, "outer", (1, 2, 3, 4))
    assert (small.inner_dim, small.words, small.inner_heads, small.se, small.tnt_blocks) == (8, 4, 1, "none", ())
    b = demo_net.space.bounds
    assert (b.words, b.tnt_blocks, b.patch_stem, b.se_outer, b.se_inner) == ((4, 16), (1, 2, 3, 4), True, True, False)


def test_extract_equals_supernet_forward_demo(demo_net):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    archs = _corners(demo_net) + _sampled(demo_net, 20, seed=0)
    assert len(set(archs)) >= 20
    with torch.no_grad():
        for arch in archs:
            diff = (demo_net(x, arch) - demo_net.extract(arch).eval()(x)).abs().max().item()
            assert diff <= 1e-5, (arch, diff)


def test_extract_equals_supernet_forward_every_elastic_parameter():
    torch.manual_seed(0)
    net = Supernet(_spec(WIDE).space).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    archs = [net.largest(), net.smallest()] + _sampled(net, 14, seed=1)
    seen = {name: {getattr(a, name) for a in archs} for name in ("outer_dim", "depth", "outer_heads", "words", "se")}
    assert seen["outer_dim"] == {24, 48} and seen["depth"] == {1, 2, 3} and seen["words"] == {1, 4, 16}
    assert seen["se"] == {"none", "outer", "inner", "both"} and len(seen["outer_heads"]) == 3
    with torch.no_grad():
        for arch in archs:
            diff = (net(x, arch) - net.extract(arch).eval()(x)).abs().max().item()
            assert diff <= 1e-5, (arch, diff)


def test_extracted_model_and_supernet_forward_cost_what_the_cost_model_says(demo_net):
    """The extracted model has the parameters and MACs tntsearch.cost gives for its config, and
    the supernet's forward does that many MACs too: slices, not the largest layers."""
    for arch in _corners(demo_net)[:2] + _sampled(demo_net, 4, seed=5):
        model = demo_net.extract(arch)
        assert sum(p.numel() for p in model.parameters()) == count_params(arch)
        assert _macs(model) == count_macs(arch)
        assert _macs(lambda x: demo_net(x, arch)) == count_macs(arch)


def test_one_step_through_the_supernet_is_the_step_of_the_extracted_model(demo_space):
    torch.manual_seed(0)
    net = Supernet(demo_space)
    arch = TNTConfig(**{**net.smallest().to_dict(), "inner_dim": 16, "words": 16, "inner_heads": 2,
                        "se": "outer", "tnt_blocks": (1, 3)})
    alone = net.extract(arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    initial = {k: v.clone() for k, v in alone.state_dict().items()}
    recipe = TrainSpec(lr=1e-3 * 512 / 8, weight_decay=0.05, label_smoothing=0.1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    optimizers = {}
    for model, forward in ((net, lambda: net(x, arch)), (alone, lambda: alone(x))):
        optimizers[model] = make_optimizer(model, recipe, global_batch=8)
        make_loss(recipe)(forward(), y).backward()
    # The supernet's gradients, sliced the way extract slices its weights, are the sub-network's.
    grads = Supernet(demo_space)
    grads.load_state_dict({n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in net.named_parameters()})
    sliced = grads.extract(arch).state_dict()
    for k, p in alone.named_parameters():
        torch.testing.assert_close(sliced[k], p.grad, atol=1e-7, rtol=1e-4, msg=k)
    for optimizer in optimizers.values():
        optimizer.step()
    stepped, expected = net.extract(arch).state_dict(), alone.state_dict()
    for k, v in expected.items():
        # NOTE: AdamW's first step is lr * grad / (|grad| + eps): where a gradient is rounding
        # noise (~1e-9) the two steps differ, so the bound is 10% of the lr, not float32 epsilon.
        assert (stepped[k] - v).abs().max().item() <= 1e-4, k
        assert not torch.equal(v, initial[k]), k  # every weight of the sub-network trained
    # Parameters the sub-network does not use got no gradient and did not move.
    assert net.patch_embed.weight.grad is None and torch.equal(net.patch_embed.weight, before["patch_embed.weight"])
    assert net.word_pos["4"].grad is None and net.blocks[1].inner.attn.qkv.weight.grad is None


def test_outside_the_space_is_a_value_error_naming_the_parameter(demo_net):
    with pytest.raises(ValueError, match="inner_dim=24"):
        demo_net(torch.zeros(1, 3, 32, 32), TNTConfig(**{**demo_net.largest().to_dict(), "inner_dim": 24}))
    with pytest.raises(ValueError, match="outer_dim=128"):
        demo_net.extract(TNTConfig(**{**demo_net.largest().to_dict(), "outer_dim": 128}))


@pytest.mark.parametrize("field, value", [
    ("img_size", {"choice": [16, 32]}), ("patch_size", {"choice": [4, 8]}), ("num_classes", {"int": [5, 10]}),
    ("drop_path", {"float": [0.0, 0.1]}), ("se_ratio", {"choice": [0.25, 0.5]}),
])
def test_spec_refuses_what_a_supernet_cannot_share(tmp_path, field, value):
    raw = yaml.safe_load(DEMO.read_text())
    raw["space"][field] = value
    raw["supernet"] = {"epochs": 2}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=f"space.{field} is searched"):
        load_spec(tmp_path / "s.yaml")
    del raw["supernet"]  # the same space is fine for a search that trains each architecture
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert load_spec(tmp_path / "s.yaml").supernet is None


def test_supernet_section_defaults_and_checks():
    assert _spec({}, supernet={}).supernet.model_dump() == {"epochs": 100, "sampling": "sandwich", "k": 2, "distill": True}
    assert _spec({}, supernet={"sampling": "uniform"}).supernet.distill is False
    for bad, message in (({"sampling": "uniform", "k": 0}, "supernet.k"),
                         ({"sampling": "uniform", "distill": True}, "supernet.distill"),
                         ({"sampling": "random"}, "sampling")):
        with pytest.raises(ValueError, match=message):
            _spec({}, supernet=bad)


def test_sampler_resumes_where_it_stopped(demo_space):
    space = SubnetSpace(demo_space)
    unbroken = SubnetSampler(space, "sandwich", k=2, seed=7)
    draws = [unbroken.draw() for _ in range(6)]
    assert all(d[0] == space.largest() and d[1] == space.smallest() and len(d) == 4 for d in draws)
    assert len({a for d in draws for a in d[2:]}) > 6  # random ones differ step to step
    first = SubnetSampler(space, "sandwich", k=2, seed=7)
    for _ in range(4):
        first.draw()
    resumed = SubnetSampler(space, "sandwich", k=2, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.draw() for _ in range(2)] == draws[4:]
