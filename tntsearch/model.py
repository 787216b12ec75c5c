"""Configurable Transformer in Transformer (TNT) in PyTorch.

Han et al., "Transformer in Transformer", NeurIPS 2021 (arXiv 2103.00112).
Official code: https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/tnt_pytorch;
reference implementation: timm ``timm/models/tnt.py``.

One model family covers everything the search proposes: TNT blocks and vanilla (ViT/DeiT)
blocks mixed at any indices (paper Table 5), any number of visual words ``m`` and word
dim ``c``, and the SE module of appendix A.2 on sentences, words or both. The layers are
timm's (``Attention``, ``Mlp``, ``DropPath``, ``PatchEmbed``); ``from_timm``
converts timm's ``tnt_s_patch16_224`` / ``tnt_b_patch16_224`` weights (its
``checkpoint_filter_fn`` counterpart is :func:`checkpoint_filter_fn`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    Attention, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_, use_fused_attn,
)

__all__ = [
    "SE_MODES",
    "TNTConfig",
    "PRESETS",
    "get_config",
    "parse_overrides",
    "SE",
    "Block",
    "TNTBlock",
    "WordEmbed",
    "TNT",
    "create_model",
    "config_from_timm",
    "checkpoint_filter_fn",
    "from_timm",
]

SE_MODES = ("none", "outer", "inner", "both")
_WORD_PARAMS = ("inner_dim", "words", "inner_heads", "inner_mlp_ratio")  # build nothing without a TNT block


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def _as_float(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number; got {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or math.isnan(value):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {lo}{low:g}, {high:g}{hi}; got {value:g}")
    return value


def _allowed_words(patch_size: int) -> list[int]:
    """Word counts m = k*k with k dividing the patch: each word is (p/k) x (p/k) pixels."""
    return [k * k for k in range(1, patch_size + 1) if patch_size % k == 0]


@dataclasses.dataclass(frozen=True)
class TNTConfig:
    """Architecture of one TNT/DeiT model; the paper's symbols in comments (Sec. 2, Table 1).

    Defaults are TNT-S at 224 x 224. ``tnt_blocks`` holds the 1-based indices of the blocks
    that are TNT blocks (the rest are vanilla ViT blocks, Table 5); any iterable is
    normalised to a sorted tuple, ``None`` or ``"all"`` means every block, ``()`` none
    (DeiT). ``se`` puts the SE module (appendix A.2) on the sentence embeddings
    (``outer``), the word embeddings (``inner``) or both; ``se_ratio`` is its hidden size
    as a fraction of the embedding dim (0.25 in the official code).
    """

    img_size: int = 224
    patch_size: int = 16  # p
    outer_dim: int = 384  # d
    depth: int = 12
    outer_heads: int = 6
    mlp_ratio: float = 4.0  # r
    inner_dim: int = 24  # c
    words: int = 16  # m
    inner_heads: int = 4
    inner_mlp_ratio: float = 4.0
    se: str = "none"
    se_ratio: float = 0.25
    tnt_blocks: tuple[int, ...] | Iterable[int] | str | None = None  # normalised to tuple[int, ...]
    drop_path: float = 0.1
    num_classes: int = 1000

    def __post_init__(self) -> None:
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        s("img_size", _as_int("img_size", self.img_size, 1))
        s("patch_size", _as_int("patch_size", self.patch_size, 1))
        if self.img_size % self.patch_size:
            raise ValueError(
                f"patch_size must divide img_size={self.img_size}; got {self.patch_size}")
        s("outer_dim", _as_int("outer_dim", self.outer_dim, 1))
        s("depth", _as_int("depth", self.depth, 1))
        s("outer_heads", _as_int("outer_heads", self.outer_heads, 1))
        if self.outer_dim % self.outer_heads:
            raise ValueError(
                f"outer_heads must divide outer_dim={self.outer_dim}; got {self.outer_heads}")
        s("inner_dim", _as_int("inner_dim", self.inner_dim, 1))
        s("inner_heads", _as_int("inner_heads", self.inner_heads, 1))
        if self.inner_dim % self.inner_heads:
            raise ValueError(
                f"inner_heads must divide inner_dim={self.inner_dim}; got {self.inner_heads}")
        s("words", _as_int("words", self.words, 1))
        allowed = _allowed_words(self.patch_size)
        if self.words not in allowed:
            raise ValueError(
                f"words must be a square number k*k with k dividing patch_size={self.patch_size} "
                f"(allowed: {', '.join(map(str, allowed))}); got {self.words}")
        s("mlp_ratio", _as_float("mlp_ratio", self.mlp_ratio, 0.0, math.inf, low_open=True, high_open=True))
        s("inner_mlp_ratio",
          _as_float("inner_mlp_ratio", self.inner_mlp_ratio, 0.0, math.inf, low_open=True, high_open=True))
        if int(self.outer_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio gives an empty MLP at outer_dim={self.outer_dim}; got {self.mlp_ratio:g}")
        if int(self.inner_dim * self.inner_mlp_ratio) < 1:
            raise ValueError(
                f"inner_mlp_ratio gives an empty MLP at inner_dim={self.inner_dim}; got {self.inner_mlp_ratio:g}")
        if self.se not in SE_MODES:
            raise ValueError(f"se must be one of {', '.join(SE_MODES)}; got {self.se!r}")
        s("se_ratio", _as_float("se_ratio", self.se_ratio, 0.0, 1.0, low_open=True, high_open=False))
        for mode, dim_name in (("outer", "outer_dim"), ("inner", "inner_dim")):
            if self.se in (mode, "both") and int(getattr(self, dim_name) * self.se_ratio) < 1:
                raise ValueError(
                    f"se_ratio gives an empty SE hidden layer at {dim_name}={getattr(self, dim_name)}; "
                    f"got {self.se_ratio:g}")
        s("drop_path", _as_float("drop_path", self.drop_path, 0.0, 1.0, low_open=False, high_open=True))
        s("num_classes", _as_int("num_classes", self.num_classes, 1))
        s("tnt_blocks", self._normalise_blocks(self.tnt_blocks))

    def _normalise_blocks(self, blocks: Any) -> tuple[int, ...]:
        if blocks is None or blocks == "all":
            return tuple(range(1, self.depth + 1))
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
            raise ValueError(
                f"tnt_blocks must be a list of 1-based block indices, 'all' or []; got {blocks!r}")
        out = set()
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= self.depth:
                raise ValueError(
                    f"tnt_blocks must hold block indices in 1..{self.depth} (depth); got {b!r}")
            out.add(operator.index(b))
        return tuple(sorted(out))

    @property
    def num_patches(self) -> int:
        """n, the number of visual sentences."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def word_stride(self) -> int:
        """Stride of the 7x7 word conv: p / sqrt(m) (timm's ``first_stride``)."""
        return self.patch_size // math.isqrt(self.words)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``tnt_blocks`` as a list)."""
        d = dataclasses.asdict(self)
        d["tnt_blocks"] = list(self.tnt_blocks)
        return d

    def network_key(self) -> str:
        """The network this config builds, as a JSON string: configs with one key build the
        same layers, so they cost the same and inherit the same supernet weights. Without a
        TNT block the word parameters build nothing and SE on the words is no SE; without SE
        its ratio builds nothing. A search counts and caches architectures by this key."""
        d = self.to_dict()
        if not self.tnt_blocks:
            for name in _WORD_PARAMS:
                del d[name]
            d["se"] = {"inner": "none", "both": "outer"}.get(self.se, self.se)
        if d["se"] == "none":
            del d["se_ratio"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TNTConfig:
        """Inverse of :meth:`to_dict`; missing fields take the TNT-S defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown architecture parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        return cls(**d)


_TNT_S = TNTConfig()
PRESETS: dict[str, TNTConfig] = {
    # Table 1
    "tnt_ti": dataclasses.replace(_TNT_S, outer_dim=192, outer_heads=3, inner_dim=12, inner_heads=2),
    "tnt_s": _TNT_S,
    "tnt_b": dataclasses.replace(_TNT_S, outer_dim=640, outer_heads=10, inner_dim=40, inner_heads=4),
    # Table 5: TNT blocks only at some indices, the others vanilla
    "tnt_s_1": dataclasses.replace(_TNT_S, tnt_blocks=(1, 4, 8, 12)),
    "tnt_s_2": dataclasses.replace(_TNT_S, tnt_blocks=(1, 6, 12)),
    "tnt_s_3": dataclasses.replace(_TNT_S, tnt_blocks=(1, 6)),
    "tnt_s_4": dataclasses.replace(_TNT_S, tnt_blocks=(1,)),
    "deit_s": dataclasses.replace(_TNT_S, tnt_blocks=()),
}


def get_config(name_or_cfg: str | TNTConfig | Mapping[str, Any], **overrides: Any) -> TNTConfig:
    """A preset (by name), a config or a dict, with ``overrides`` applied and validated.

    When the base has every block TNT and ``depth`` is overridden without ``tnt_blocks``,
    the result again has every block TNT (so ``get_config("tnt_s", depth=6)`` works).
    """
    if isinstance(name_or_cfg, TNTConfig):
        base = name_or_cfg
    elif isinstance(name_or_cfg, str):
        if name_or_cfg not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name_or_cfg!r}")
        base = PRESETS[name_or_cfg]
    elif isinstance(name_or_cfg, Mapping):
        base = TNTConfig.from_dict(name_or_cfg)
    else:
        raise ValueError(f"config must be a preset name, a TNTConfig or a dict; got {type(name_or_cfg).__name__}")
    names = {f.name for f in dataclasses.fields(TNTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown architecture parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    if ("depth" in overrides and "tnt_blocks" not in overrides
            and base.tnt_blocks == tuple(range(1, base.depth + 1))):
        overrides = {**overrides, "tnt_blocks": None}
    return dataclasses.replace(base, **overrides) if overrides else base


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["depth=4", "tnt_blocks=[1,2]"]`` -> ``{"depth": 4, "tnt_blocks": [1, 2]}``: the
    ``--set key=value`` arguments of the command lines, values parsed as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value; got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {key}: cannot parse value {value!r} ({str(exc).splitlines()[0]})") from None
    return out


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

class SE(nn.Module):
    """Squeeze-and-excitation over tokens (paper appendix A.2, official ``tnt_pytorch`` SE).

    Mean over the tokens -> LayerNorm -> Linear -> ReLU -> Linear -> Tanh gives one weight per
    channel, which multiplies every token.
    """

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1, keepdim=True))


class Block(nn.Module):
    """Pre-norm transformer block (MSA + MLP, Eq. 1-2); the vanilla ViT/DeiT block.

    Used on sentences (a vanilla block, or the outer transformer of a TNT block) and on
    the words of every sentence (the inner transformer). With SE the MLP branch becomes
    ``y + SE(y)``, as in the official code.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, se_ratio: float | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.se = SE(dim, se_ratio) if se_ratio else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.mlp(self.norm2(x))
        if self.se is not None:
            y = y + self.se(y)
        return x + self.drop_path(y)


class TNTBlock(nn.Module):
    """TNT block (Eq. 3-5): inner transformer on words, words -> sentence, outer transformer.

    The word-to-sentence projection is timm's non-legacy one:
    LayerNorm(m*c) -> Linear(m*c, d, no bias) -> LayerNorm(d), added to every sentence
    but the class token.
    """

    def __init__(self, cfg: TNTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        se_in = cfg.se_ratio if cfg.se in ("inner", "both") else None
        se_out = cfg.se_ratio if cfg.se in ("outer", "both") else None
        self.inner = Block(cfg.inner_dim, cfg.inner_heads, cfg.inner_mlp_ratio, se_in, drop_path)
        flat = cfg.words * cfg.inner_dim
        self.norm1_proj = nn.LayerNorm(flat)
        self.proj = nn.Linear(flat, cfg.outer_dim, bias=False)
        self.norm2_proj = nn.LayerNorm(cfg.outer_dim)
        self.outer = Block(cfg.outer_dim, cfg.outer_heads, cfg.mlp_ratio, se_out, drop_path)

    def forward(self, words: torch.Tensor, sentences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.inner(words)  # (B*n, m, c)
        B, N, _ = sentences.shape
        delta = self.norm2_proj(self.proj(self.norm1_proj(words.reshape(B, N - 1, -1))))
        # NOTE: pad the class-token row with zeros instead of slicing and concatenating.
        sentences = sentences + F.pad(delta, (0, 0, 1, 0))
        return words, self.outer(sentences)


class WordEmbed(nn.Module):
    """Image -> visual words (Sec. 2): cut p x p sentences, a 7x7 conv of stride p/sqrt(m) each.

    Same as timm's non-legacy ``PixelEmbed`` (the conv pads inside each sentence, never
    across sentence borders), with one permute instead of ``Unfold`` + transpose.
    """

    def __init__(self, cfg: TNTConfig, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(in_chans, cfg.inner_dim, kernel_size=7, stride=cfg.word_stride, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        x = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C, p, p)
        x = self.proj(x)  # (B*n, c, sqrt(m), sqrt(m))
        return x.flatten(2).transpose(1, 2)  # (B*n, m, c)


class TNT(nn.Module):
    """TNT with TNT blocks at ``cfg.tnt_blocks`` and vanilla blocks elsewhere.

    Without any TNT block the word stem is not built at all: the model is DeiT (a p x p
    patch-embedding conv), so ``deit_s`` costs what DeiT-S costs (Table 5, 4.6B).
    """

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.config = cfg
        d, n = cfg.outer_dim, cfg.num_patches
        self.num_patches = n
        if cfg.tnt_blocks:
            self.word_embed = WordEmbed(cfg)
            self.word_pos = nn.Parameter(torch.zeros(1, cfg.words, cfg.inner_dim))
            self.norm1_proj = nn.LayerNorm(cfg.words * cfg.inner_dim)
            self.proj = nn.Linear(cfg.words * cfg.inner_dim, d)
            self.norm2_proj = nn.LayerNorm(d)
            self.patch_embed = None
        else:
            self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.sentence_pos = nn.Parameter(torch.zeros(1, n + 1, d))

        se_out = cfg.se_ratio if cfg.se in ("outer", "both") else None
        dpr = calculate_drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList([
            TNTBlock(cfg, dpr[i]) if i + 1 in cfg.tnt_blocks
            else Block(d, cfg.outer_heads, cfg.mlp_ratio, se_out, dpr[i])
            for i in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.num_classes)

        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.sentence_pos, std=0.02)
        if cfg.tnt_blocks:
            trunc_normal_(self.word_pos, std=0.02)
        self.apply(_init_weights)
        self._attn_device: str | None = None
        self._pick_attention(self.head.weight.device)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``cpu`` end here: a move to another kind of device re-picks the attention kernel."""
        super()._apply(fn, recurse)
        self._pick_attention(self.head.weight.device)
        return self

    def _pick_attention(self, device: torch.device) -> None:
        """Fused SDPA on accelerators, timm's matmul-softmax-matmul on CPU, where torch 2.14's
        fused kernel does not pay at TNT's sizes (TNT-S training steps 1-11% slower with it,
        ``benchmarks/model_speed.py``). Only a change of device type re-picks, so a choice set
        by hand on ``fused_attn`` stays."""
        if device.type == self._attn_device:
            return
        self._attn_device = device.type
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = device.type != "cpu" and use_fused_attn()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and the class token: no weight decay (as timm/DeiT)."""
        return {name for name in ("sentence_pos", "word_pos", "cls_token") if hasattr(self, name)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        words = None
        if self.patch_embed is None:
            words = self.word_embed(x) + self.word_pos
            sentences = self.norm2_proj(self.proj(self.norm1_proj(words.reshape(B, self.num_patches, -1))))
        else:
            sentences = self.patch_embed(x)
        sentences = torch.cat((self.cls_token.expand(B, -1, -1), sentences), dim=1) + self.sentence_pos
        for blk in self.blocks:
            if isinstance(blk, TNTBlock):
                words, sentences = blk(words, sentences)
            else:
                sentences = blk(sentences)
        return self.norm(sentences)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """timm's TNT init: truncated-normal Linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(cfg: str | TNTConfig | Mapping[str, Any], **overrides: Any) -> TNT:
    """Build a randomly initialised model from a preset name, config or dict (+ overrides)."""
    return TNT(get_config(cfg, **overrides))


# ---------------------------------------------------------------------------------------
# timm compatibility
# ---------------------------------------------------------------------------------------

def config_from_timm(model: nn.Module) -> TNTConfig:
    """The :class:`TNTConfig` of a timm ``TNT`` instance.

    Only timm's non-legacy TNT is representable: ``legacy=True`` (``tnt_s_legacy_patch16_224``)
    runs the 7x7 conv over the whole image (padding crosses sentence borders), projects words
    with a per-word LayerNorm(c) and a biased Linear, and has no LayerNorm after it.
    """
    from timm.models.tnt import TNT as TimmTNT

    if not isinstance(model, TimmTNT):
        raise ValueError(f"model must be a timm TNT; got {type(model).__name__}")
    pe = model.pixel_embed
    if pe.legacy:
        raise ValueError("timm TNT with legacy=True is not supported (whole-image word conv, "
                         "per-word projection norm); use tnt_s_patch16_224 or tnt_b_patch16_224")
    blk = model.blocks[0]
    if blk.attn_in.qk.bias is not None or blk.attn_out.qk.bias is not None:
        raise ValueError("timm TNT with qkv_bias=True is not supported")
    if model.global_pool != "token" or not isinstance(model.head, nn.Linear):
        raise ValueError("timm TNT must use the class token and a Linear head")
    if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise ValueError("timm TNT must have square images and patches")
    k = pe.new_patch_size[0]
    return TNTConfig(
        img_size=pe.img_size[0], patch_size=pe.patch_size[0],
        outer_dim=model.embed_dim, depth=len(model.blocks), outer_heads=blk.attn_out.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        inner_dim=pe.in_dim, words=k * k, inner_heads=blk.attn_in.num_heads,
        inner_mlp_ratio=blk.mlp_in.fc1.out_features / pe.in_dim,
        se="none", tnt_blocks=None, drop_path=0.0, num_classes=model.num_classes,
    )


# timm TNT block names -> ours (the qk/v pair of each attention is fused into one qkv).
_BLOCK_RENAMES = (
    ("norm_in.", "inner.norm1."), ("attn_in.proj.", "inner.attn.proj."),
    ("norm_mlp_in.", "inner.norm2."), ("mlp_in.", "inner.mlp."),
    ("norm_out.", "outer.norm1."), ("attn_out.proj.", "outer.attn.proj."),
    ("norm_mlp.", "outer.norm2."), ("mlp.", "outer.mlp."),
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: TNT | None = None) -> dict[str, torch.Tensor]:
    """Convert a timm (non-legacy) TNT state dict to this module's names.

    ``attn_*.qk`` and ``attn_*.v`` become one ``qkv`` (q, k then v rows, the order timm's
    fused ``Attention`` splits them in); ``pixel_pos`` (1, c, k, k) becomes ``word_pos``
    (1, m, c); ``patch_pos`` becomes ``sentence_pos``. ``model`` is accepted for
    signature compatibility with timm and unused.
    """
    out: dict[str, torch.Tensor] = {}
    for key, v in state_dict.items():
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            prefix = f"blocks.{idx}."
            if rest.startswith(("attn_in.qk.", "attn_out.qk.")):
                side = "inner" if rest.startswith("attn_in") else "outer"
                name = rest.rsplit(".", 1)[1]
                v_key = prefix + rest.replace(".qk.", ".v.")
                out[f"{prefix}{side}.attn.qkv.{name}"] = torch.cat([v, state_dict[v_key]], dim=0)
                continue
            if rest.startswith(("attn_in.v.", "attn_out.v.")):
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[prefix + rest] = v
        elif key == "pixel_pos":
            out["word_pos"] = v.flatten(2).transpose(1, 2)
        elif key == "patch_pos":
            out["sentence_pos"] = v
        elif key.startswith("pixel_embed."):
            out["word_embed." + key[len("pixel_embed."):]] = v
        else:
            out[key] = v
    return out


def from_timm(name_or_model: str | nn.Module) -> TNT:
    """The tntsearch TNT equal to a timm TNT, carrying its weights.

    ``name_or_model`` is a timm model name (built with ``pretrained=False``: random init, no
    download) or a timm ``TNT`` instance. Both give the same logits.
    """
    if isinstance(name_or_model, str):
        import timm

        try:
            name_or_model = timm.create_model(name_or_model, pretrained=False)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ValueError(f"name must be a timm TNT model name; {exc}") from exc
    cfg = config_from_timm(name_or_model)
    with torch.device("meta"):  # NOTE: no random init of weights that are overwritten next
        model = TNT(cfg)
    state = checkpoint_filter_fn(name_or_model.state_dict(), model)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return model.train(name_or_model.training)
