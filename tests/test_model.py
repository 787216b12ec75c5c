"""tntsearch.model: config validation, presets, tiny forward/backward, timm equivalence."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.tnt import TNT as TimmTNT

from tntsearch.model import (
    PRESETS, SE, Block, TNTBlock, TNTConfig, checkpoint_filter_fn, config_from_timm, create_model, from_timm,
    get_config)

TINY = dict(img_size=32, patch_size=8, outer_dim=48, outer_heads=2, inner_dim=12, inner_heads=2,
            words=4, depth=3, num_classes=10)


def _tiny(**overrides) -> TNTConfig:
    return get_config("tnt_s", **{**TINY, **overrides})


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(words=9), "words"),  # 3 does not divide patch 8
    (dict(words=8), "words"),  # not a square
    (dict(words=0), "words"),
    (dict(outer_heads=5), "outer_heads"),
    (dict(inner_heads=5), "inner_heads"),
    (dict(tnt_blocks=[0]), "tnt_blocks"),
    (dict(tnt_blocks=[4]), "tnt_blocks"),  # depth 3
    (dict(tnt_blocks="1,2"), "tnt_blocks"),
    (dict(tnt_blocks=[True]), "tnt_blocks"),
    (dict(se="sentence"), "se"),
    (dict(se_ratio=0.0), "se_ratio"),
    (dict(se="inner", se_ratio=0.05), "se_ratio"),  # int(12 * 0.05) == 0
    (dict(patch_size=12), "patch_size"),  # does not divide 32
    (dict(depth=0), "depth"),
    (dict(outer_dim=48.0), "outer_dim"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(num_classes=True), "num_classes"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        _tiny(**overrides)


def test_unknown_parameter_and_preset_are_rejected():
    with pytest.raises(ValueError, match="unknown architecture parameter.*embed_dim"):
        get_config("tnt_s", embed_dim=10)
    with pytest.raises(ValueError, match="preset must be one of"):
        get_config("tnt_xl")


def test_words_allowed_for_patch():
    for words in (1, 4, 16, 64):
        assert _tiny(words=words).word_stride == 8 // int(words ** 0.5)


def test_tnt_blocks_normalised():
    assert _tiny(tnt_blocks={3, 1}).tnt_blocks == (1, 3)
    assert _tiny(tnt_blocks=(b for b in [2, 2, 1])).tnt_blocks == (1, 2)
    assert _tiny(tnt_blocks="all").tnt_blocks == (1, 2, 3)
    assert _tiny(tnt_blocks=[]).tnt_blocks == ()
    # every block TNT follows a depth change; an explicit subset does not
    assert get_config("tnt_s", depth=4).tnt_blocks == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="tnt_blocks"):
        get_config("tnt_s_1", depth=6)


def test_dict_round_trip_is_json():
    cfg = _tiny(se="both", tnt_blocks=[2])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["tnt_blocks"] == [2]
    assert TNTConfig.from_dict(d) == cfg
    assert get_config(d) == cfg
    with pytest.raises(ValueError, match="unknown architecture parameter.*bogus"):
        TNTConfig.from_dict({**d, "bogus": 1})


def test_presets_match_paper_tables():
    # Table 1 (d, c, heads) and Table 5 (TNT block indices)
    assert [(PRESETS[n].outer_dim, PRESETS[n].inner_dim, PRESETS[n].outer_heads, PRESETS[n].inner_heads)
            for n in ("tnt_ti", "tnt_s", "tnt_b")] == [(192, 12, 3, 2), (384, 24, 6, 4), (640, 40, 10, 4)]
    assert PRESETS["tnt_s"].tnt_blocks == tuple(range(1, 13))
    assert PRESETS["tnt_s_1"].tnt_blocks == (1, 4, 8, 12)
    assert PRESETS["tnt_s_2"].tnt_blocks == (1, 6, 12)
    assert PRESETS["tnt_s_3"].tnt_blocks == (1, 6)
    assert PRESETS["tnt_s_4"].tnt_blocks == (1,)
    assert PRESETS["deit_s"].tnt_blocks == ()


# --- model -------------------------------------------------------------------------------

@pytest.mark.parametrize("words", [4, 16])
@pytest.mark.parametrize("se", ["none", "outer", "inner", "both"])
def test_tiny_forward_backward(words, se):
    torch.manual_seed(0)
    model = create_model(_tiny(words=words, se=se, tnt_blocks=[1, 3], drop_path=0.1))
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    # every parameter takes part in the forward pass
    assert all(p.grad is not None for p in model.parameters())


def test_block_kinds_follow_tnt_blocks():
    model = create_model(_tiny(tnt_blocks=[2]))
    assert [type(b) for b in model.blocks] == [Block, TNTBlock, Block]
    assert model.blocks[1].inner.attn.qkv.in_features == 12
    assert model.blocks[1].proj.in_features == 4 * 12


def _fused_flags(model) -> set[bool]:
    return {m.fused_attn for m in model.modules() if isinstance(m, timm.layers.Attention)}


def test_attention_kernel_follows_device():
    """CPU runs matmul-softmax-matmul, other devices fused SDPA; both give the same logits."""
    torch.manual_seed(0)
    model = create_model(_tiny(tnt_blocks=[1, 3])).eval()
    assert _fused_flags(model) == {False}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        math_out = model(x)
        model.blocks[0].inner.attn.fused_attn = True  # by hand: kept by a move to the same kind
        model.to("cpu", torch.float32)
        assert model.blocks[0].inner.attn.fused_attn and model.blocks[0].outer.attn.fused_attn is False
        for m in model.modules():
            if isinstance(m, timm.layers.Attention):
                m.fused_attn = True
        torch.testing.assert_close(model(x), math_out, atol=1e-5, rtol=1e-5)
    assert _fused_flags(model.to("meta")) == {True}
    assert _fused_flags(model.to_empty(device="cpu")) == {False}


def test_vanilla_model_builds_no_word_stem():
    model = create_model(_tiny(tnt_blocks=[]))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("word_", "proj", "norm1_proj", "norm2_proj")) for n in names)
    assert model.patch_embed.proj.kernel_size == (8, 8)
    assert model.no_weight_decay() == {"sentence_pos", "cls_token"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("a, b", [
    (dict(tnt_blocks=[]), dict(tnt_blocks=[], inner_dim=24, words=16, inner_heads=4, inner_mlp_ratio=2)),
    (dict(tnt_blocks=[], se="inner"), dict(tnt_blocks=[], se="none", se_ratio=0.5)),
    (dict(tnt_blocks=[], se="both"), dict(tnt_blocks=[], se="outer")),
])
def test_configs_with_one_network_key_build_one_network(a, b):
    ca, cb = _tiny(**a), _tiny(**b)
    assert ca != cb and ca.network_key() == cb.network_key()
    ma, mb = create_model(ca).eval(), create_model(cb).eval()
    mb.load_state_dict(ma.state_dict())  # strict: the same parameters with the same shapes
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ma(x), mb(x))


def test_a_word_parameter_of_a_tnt_block_changes_the_network_key():
    ca, cb = _tiny(tnt_blocks=[2]), _tiny(tnt_blocks=[2], inner_heads=1)
    assert ca.network_key() != cb.network_key()
    ma, mb = create_model(ca).eval(), create_model(cb).eval()
    mb.load_state_dict(ma.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(ma(x), mb(x))
    assert _tiny(tnt_blocks=[], se="outer").network_key() != _tiny(tnt_blocks=[]).network_key()


def test_no_weight_decay_names_exist():
    model = create_model(_tiny())
    params = dict(model.named_parameters())
    assert model.no_weight_decay() == {"sentence_pos", "word_pos", "cls_token"}
    assert model.no_weight_decay() <= params.keys()


def test_se_matches_official_formula():
    torch.manual_seed(0)
    se = SE(8, 0.25)
    x = torch.randn(3, 5, 8)
    ln, fc1, _, fc2, _ = se.fc
    a = torch.tanh(fc2(torch.relu(fc1(ln(x.mean(1, keepdim=True))))))
    torch.testing.assert_close(se(x), x * a)
    assert fc1.out_features == 2


def test_init_like_timm():
    # timm's TNT: trunc_normal_(std=.02) Linear weights, zero biases, unit LayerNorms,
    # trunc_normal_(std=.02) position embeddings and class token
    torch.manual_seed(0)
    model = create_model(_tiny(outer_dim=96))
    w = model.blocks[0].outer.mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert model.blocks[0].outer.mlp.fc1.bias.abs().max() == 0
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert 0.01 < model.sentence_pos.std().item() < 0.03


# --- timm equivalence --------------------------------------------------------------------

def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorms and biases (initialised to 1 and 0), so that swapped ones cannot hide."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "tnt_b_patch16_224"])
def test_from_timm_name_same_logits(name):
    torch.manual_seed(0)
    reference = _perturb(timm.create_model(name, pretrained=False))
    ours = from_timm(reference).eval()
    assert ours.config == get_config("tnt_s" if "_s_" in name else "tnt_b", drop_path=0.0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 0.1
    assert (expected - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("first_stride, words", [(4, 4), (2, 16)])
def test_from_timm_instance_small(first_stride, words):
    torch.manual_seed(0)
    reference = _perturb(TimmTNT(img_size=32, patch_size=8, embed_dim=48, inner_dim=12, depth=2, num_heads_inner=2,
                                 num_heads_outer=4, num_classes=7, first_stride=first_stride))
    ours = from_timm(reference)
    assert not ours.training
    assert ours.config.words == words and ours.config.outer_heads == 4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max().item() < 1e-5


def test_from_timm_by_name_is_random_init():
    model = from_timm("tnt_s_patch16_224")
    assert isinstance(model, torch.nn.Module) and model.training
    assert model.config.tnt_blocks == tuple(range(1, 13))


def test_from_timm_rejects_legacy_and_others():
    legacy = TimmTNT(img_size=32, patch_size=8, embed_dim=16, inner_dim=4, depth=1, num_heads_inner=1,
                     num_heads_outer=2, num_classes=3, legacy=True)
    with pytest.raises(ValueError, match="legacy"):
        config_from_timm(legacy)
    with pytest.raises(ValueError, match="timm TNT"):
        from_timm(torch.nn.Linear(2, 2))


def test_checkpoint_filter_fuses_qk_and_v():
    reference = TimmTNT(img_size=32, patch_size=8, embed_dim=16, inner_dim=6, depth=1, num_heads_inner=1,
                        num_heads_outer=2, num_classes=3)
    sd = reference.state_dict()
    out = checkpoint_filter_fn(sd)
    qkv = out["blocks.0.inner.attn.qkv.weight"]
    torch.testing.assert_close(qkv[:12], sd["blocks.0.attn_in.qk.weight"])
    torch.testing.assert_close(qkv[12:], sd["blocks.0.attn_in.v.weight"])
    # pixel_pos (1, c, 2, 2) -> word_pos (1, m, c), word (i, j) at row 2 i + j
    assert out["word_pos"].shape == (1, 4, 6)
    torch.testing.assert_close(out["word_pos"][0, 2 * 1 + 0], sd["pixel_pos"][0, :, 1, 0])
    assert not any(".qk." in k or ".v." in k for k in out)


def test_from_timm_copies_weights():
    reference = TimmTNT(img_size=32, patch_size=8, embed_dim=16, inner_dim=4, depth=1, num_heads_inner=1,
                        num_heads_outer=2, num_classes=3)
    ours = from_timm(reference)
    assert all(p.device.type == "cpu" and p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        ours.head.weight.zero_()
    assert reference.head.weight.abs().sum() > 0  # no shared storage
