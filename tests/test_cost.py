"""tntsearch.cost: closed forms against the built model, FlopCounterMode and the paper."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tntsearch.cost import count_macs, count_params, counted_macs, main, measure_throughput
from tntsearch.model import SE_MODES, TNTConfig, create_model, get_config


def _random_configs(count: int, seed: int) -> list[TNTConfig]:
    """Valid small configs covering words, dims, heads, ratios, SE and block mixes."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        patch = rng.choice([4, 8, 16])
        inner_heads, outer_heads = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
        depth = rng.randint(1, 4)
        try:
            out.append(TNTConfig(
                img_size=patch * rng.choice([1, 2, 3]), patch_size=patch,
                outer_dim=outer_heads * rng.choice([4, 8, 12]), outer_heads=outer_heads,
                inner_dim=inner_heads * rng.choice([2, 4, 6]), inner_heads=inner_heads,
                words=rng.choice([k * k for k in range(1, patch + 1) if patch % k == 0]), depth=depth,
                mlp_ratio=rng.choice([1.5, 2.0, 4.0]), inner_mlp_ratio=rng.choice([1.0, 2.0, 3.3, 4.0]),
                se=rng.choice(SE_MODES), se_ratio=rng.choice([0.25, 0.5, 1.0]),
                tnt_blocks=[b for b in range(1, depth + 1) if rng.random() < 0.6],
                num_classes=rng.randint(1, 20), drop_path=rng.choice([0.0, 0.1])))
        except ValueError:  # e.g. an SE hidden size of 0 at a tiny dim
            continue
    return out


@pytest.mark.parametrize("cfg", _random_configs(40, seed=0), ids=lambda c: f"d{c.outer_dim}c{c.inner_dim}m{c.words}")
def test_params_exact_and_macs_match_flop_counter(cfg):
    model = create_model(cfg).eval()
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, cfg.img_size, cfg.img_size))
    # the math SDPA backend runs plain bmm, which torch counts itself: an independent count
    reference = counter.get_total_flops() / 2
    assert abs(count_macs(cfg) - reference) <= 0.02 * reference


@pytest.mark.parametrize("cfg", _random_configs(8, seed=2), ids=lambda c: f"d{c.outer_dim}c{c.inner_dim}m{c.words}")
def test_counted_macs_cpu_and_meta_agree(cfg):
    assert counted_macs(cfg, device="cpu") == counted_macs(cfg) == count_macs(cfg)


def test_batch_does_not_change_per_image_macs():
    cfg = _random_configs(1, seed=3)[0]
    model = create_model(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(4, 3, cfg.img_size, cfg.img_size))
    assert counter.get_total_flops() / 2 == 4 * count_macs(cfg)


def test_fused_cpu_attention_is_counted():
    # FlopCounterMode alone counts torch's fused CPU SDPA kernel as 0 FLOPs.
    q = torch.randn(2, 3, 5, 4)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0
    cfg = get_config("tnt_s", **dict(img_size=16, patch_size=8, outer_dim=8, outer_heads=2, inner_dim=4,
                                      inner_heads=2, words=4, depth=1))
    assert counted_macs(cfg, device="cpu") == count_macs(cfg)


def test_hand_computed_tnt_s_block():
    # Paper Eq. 14-18 for TNT-S (n = 196, d = 384, c = 24, m = 16), with the class token making
    # the outer sequence n + 1 long: vanilla block 2(n+1)d(6d + n+1), a TNT block adds
    # 2nmc(6c + m) + nmcd.
    n, d, c, m, p = 196, 384, 24, 16, 16
    vanilla, tnt = get_config("deit_s", depth=1), get_config("tnt_s", depth=1)
    deit_stem, word_stem, head = n * 3 * p * p * d, n * m * c * 3 * 49 + n * m * c * d, d * 1000
    assert count_macs(vanilla) - deit_stem - head == 2 * (n + 1) * d * (6 * d + n + 1)
    tnt_extra = count_macs(tnt) - word_stem - (count_macs(vanilla) - deit_stem)
    assert tnt_extra == 2 * n * m * c * (6 * c + m) + n * m * c * d
    # the paper's per-block figures (computed with n = 196 outer tokens): 376M and 429M
    assert round(2 * n * d * (6 * d + n) / 1e6) == 376
    assert round((2 * n * d * (6 * d + n) + tnt_extra) / 1e6) == 429


@pytest.mark.parametrize("name, params_m, macs_g", [
    ("tnt_ti", 6.1, 1.4), ("tnt_s", 23.8, 5.2), ("tnt_b", 65.6, 14.1),  # Table 1
])
def test_paper_table1(name, params_m, macs_g):
    assert abs(count_params(name) / 1e6 - params_m) <= 0.015 * params_m
    assert abs(count_macs(name) / 1e9 - macs_g) <= 0.015 * macs_g


@pytest.mark.parametrize("name, macs_g", [
    ("deit_s", 4.6), ("tnt_s", 5.2), ("tnt_s_1", 4.8), ("tnt_s_2", 4.7), ("tnt_s_3", 4.7), ("tnt_s_4", 4.6),
])
def test_paper_table5(name, macs_g):
    assert abs(count_macs(name) / 1e9 - macs_g) <= 0.1


def test_timm_reference_figures():
    # docs/design.md: timm's tnt_s_patch16_224 has 23.77M params and 5.22 GMACs (FlopCounterMode / 2)
    assert round(count_params("tnt_s") / 1e6, 2) == 23.77
    assert round(counted_macs("tnt_s") / 1e9, 2) == 5.22


def test_analytic_is_fast():
    cfgs = _random_configs(20, seed=1) + [get_config("tnt_b")]
    start = time.perf_counter()
    for cfg in cfgs:
        count_params(cfg), count_macs(cfg)
    assert (time.perf_counter() - start) / len(cfgs) < 1e-3


def test_measure_throughput_inference_and_train():
    cfg = get_config("tnt_s", **dict(img_size=32, patch_size=8, outer_dim=32, outer_heads=2, inner_dim=8,
                                      inner_heads=2, words=4, depth=2, num_classes=10))
    threads = torch.get_num_threads()
    for mode, precision in (("inference", "fp32"), ("train", "fp32"), ("inference", "bf16")):
        assert measure_throughput(cfg, batch_size=4, mode=mode, warmup=1, repeats=3, precision=precision) > 0
    assert torch.get_num_threads() == threads
    model = create_model(cfg)
    before = model.head.weight.detach().clone()
    measure_throughput(model, batch_size=2, mode="train", warmup=0, repeats=1)
    assert not torch.equal(before, model.head.weight)  # a train step really steps
    with pytest.raises(ValueError, match="mode"):
        measure_throughput(cfg, mode="eval")
    with pytest.raises(ValueError, match="img_size"):
        measure_throughput(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="precision"):
        measure_throughput(cfg, precision="int8")


# --- CLI ---------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntsearch.cost", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_json_with_overrides():
    res = _cli("tnt_s", "--set", "words=4", "inner_dim=96", "tnt_blocks=[1,6]", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = get_config("tnt_s", words=4, inner_dim=96, tnt_blocks=[1, 6])
    assert report["params"] == count_params(cfg) and report["macs"] == count_macs(cfg)
    assert report["config"]["tnt_blocks"] == [1, 6]
    assert "params: " in res.stdout


@pytest.mark.parametrize("args, message", [
    (("tnt_s", "--set", "words=9"), "words must be a square"),
    (("tnt_s", "--set", "wrods=4"), "unknown architecture parameter"),
    (("tnt_s", "--set", "words"), "key=value"),
    (("tnt_xl",), "preset must be one of"),
])
def test_cli_bad_input_exit_2(args, message, capsys):
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_subprocess_bad_value():
    res = _cli("deit_s", "--set", "outer_heads=7")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: outer_heads must divide outer_dim=384; got 7"


def test_cli_measure(capsys):
    assert main(["tnt_s", "--set", "img_size=32", "patch_size=8", "words=4", "depth=1", "--measure",
                 "--batch-size", "2", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["throughput"] > 0 and report["latency_ms"] > 0 and report["batch_size"] == 2
    assert "latency: " in out
