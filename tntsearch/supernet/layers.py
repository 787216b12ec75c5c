"""Super layers: each holds the largest weights, and a smaller width runs on their top-left slice.

Weight entanglement as in AutoFormer (``Linear_super.py``, ``qkv_super.py``,
``layernorm_super.py``): a sub-network of width ``d`` uses ``weight[:d_out, :d_in]`` and
``bias[:d_out]``, which are views, so a step through the supernet trains the shared
weights in place (docs/supernet.md). Every layer also gives the ``state`` of the matching
``tntsearch.model`` layer (names and layout of that module), which ``Supernet.extract`` copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import drop_path, use_fused_attn

__all__ = ["SuperLinear", "SuperLayerNorm", "SuperConv2d", "SuperAttention", "SuperMlp", "SuperSE", "SuperBlock",
           "SuperWordProj"]

State = dict[str, torch.Tensor]


def _prefixed(prefix: str, state: State) -> State:
    return {f"{prefix}.{k}": v for k, v in state.items()}


class SuperLinear(nn.Linear):
    """``nn.Linear(in_max, out_max)`` that runs as ``Linear(inp, out)`` on its top-left slice."""

    def sliced(self, out: int, inp: int) -> State:
        state = {"weight": self.weight[:out, :inp]}
        if self.bias is not None:
            state["bias"] = self.bias[:out]
        return state

    def forward(self, x: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        s = self.sliced(out, inp)
        return F.linear(x, s["weight"], s.get("bias"))


class SuperLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(dim_max)`` that normalises the first ``dim`` channels with ``weight[:dim]``."""

    def sliced(self, dim: int) -> State:
        return {"weight": self.weight[:dim], "bias": self.bias[:dim]}

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return F.layer_norm(x, (dim,), self.weight[:dim], self.bias[:dim], self.eps)


class SuperConv2d(nn.Conv2d):
    """A stem conv whose first ``out`` filters make the sub-network's; the stride is a
    forward argument, so one 7x7 word conv serves every word count m (stride p / sqrt(m))."""

    def sliced(self, out: int) -> State:
        return {"weight": self.weight[:out], "bias": self.bias[:out]}

    def forward(self, x: torch.Tensor, out: int, stride: int) -> torch.Tensor:
        return F.conv2d(x, self.weight[:out], self.bias[:out], stride, self.padding)


class SuperAttention(nn.Module):
    """timm's ``Attention`` (no qkv bias) for any dim and head count up to the largest.

    The qkv rows are stored interleaved (row ``3 j + t`` is channel ``j`` of q, k or v, as
    AutoFormer's ``qkv_super.py``), so the first ``3 d`` rows hold the q, k and v of width
    ``d``: one matrix product on a view. :meth:`sliced` reorders them to timm's q; k; v blocks.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = SuperLinear(dim, 3 * dim, bias=False)
        self.proj = SuperLinear(dim, dim)

    def sliced(self, dim: int) -> State:
        qkv = self.qkv.weight[:3 * dim, :dim].reshape(dim, 3, dim).transpose(0, 1).reshape(3 * dim, dim)
        return {"qkv.weight": qkv, **_prefixed("proj", self.proj.sliced(dim, dim))}

    def forward(self, x: torch.Tensor, dim: int, heads: int) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x, 3 * dim, dim).reshape(B, N, heads, dim // heads, 3).permute(4, 0, 2, 1, 3)
        q, k, v = qkv.unbind(0)
        # NOTE: the kernel tntsearch.model.TNT picks on this device, so both compute alike.
        if x.device.type != "cpu" and use_fused_attn():
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, dim), dim, dim)


class SuperMlp(nn.Module):
    """timm's ``Mlp`` (Linear, GELU, Linear) with elastic width and hidden size."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = SuperLinear(dim, hidden)
        self.fc2 = SuperLinear(hidden, dim)

    def sliced(self, dim: int, hidden: int) -> State:
        return {**_prefixed("fc1", self.fc1.sliced(hidden, dim)), **_prefixed("fc2", self.fc2.sliced(dim, hidden))}

    def forward(self, x: torch.Tensor, dim: int, hidden: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, hidden, dim)), dim, hidden)


class SuperSE(nn.Module):
    """``tntsearch.model.SE`` whose hidden size follows the sub-network's dim (``int(dim * ratio)``)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.norm = SuperLayerNorm(dim)
        self.fc1 = SuperLinear(dim, int(dim * ratio))
        self.fc2 = SuperLinear(int(dim * ratio), dim)

    def sliced(self, dim: int) -> State:
        hidden = int(dim * self.ratio)
        parts = (self.norm.sliced(dim), self.fc1.sliced(hidden, dim), self.fc2.sliced(dim, hidden))
        return {k: v for i, part in zip((0, 1, 3), parts) for k, v in _prefixed(f"fc.{i}", part).items()}

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        hidden = int(dim * self.ratio)
        s = self.norm(x.mean(dim=1, keepdim=True), dim)
        return x * torch.tanh(self.fc2(F.relu(self.fc1(s, hidden, dim)), dim, hidden))


class SuperBlock(nn.Module):
    """``tntsearch.model.Block`` (pre-norm attention + MLP, optional SE on the MLP branch)."""

    def __init__(self, dim: int, hidden: int, se_ratio: float | None) -> None:
        super().__init__()
        self.norm1 = SuperLayerNorm(dim)
        self.attn = SuperAttention(dim)
        self.norm2 = SuperLayerNorm(dim)
        self.mlp = SuperMlp(dim, hidden)
        self.se = SuperSE(dim, se_ratio) if se_ratio else None

    def sliced(self, dim: int, hidden: int, se: bool) -> State:
        state = {**_prefixed("norm1", self.norm1.sliced(dim)), **_prefixed("attn", self.attn.sliced(dim)),
                 **_prefixed("norm2", self.norm2.sliced(dim)), **_prefixed("mlp", self.mlp.sliced(dim, hidden))}
        return {**state, **_prefixed("se", self.se.sliced(dim))} if se else state

    def forward(self, x: torch.Tensor, dim: int, heads: int, hidden: int, se: bool, drop: float) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x, dim), dim, heads), drop, self.training)
        y = self.mlp(self.norm2(x, dim), dim, hidden)
        if se:
            y = y + self.se(y, dim)
        return x + drop_path(y, drop, self.training)


class SuperWordProj(nn.Module):
    """Words -> sentence for one word count m: LayerNorm(m c), Linear(m c, d), LayerNorm(d).

    The flattened words put channel ``ch`` of word ``w`` at ``w c + ch``, so a smaller c takes
    the first c of every word's C columns: not one slice, hence a gathered copy of these
    (small) weights when ``c < C``; the activations are never copied.
    """

    def __init__(self, words: int, inner_dim: int, outer_dim: int, bias: bool) -> None:
        super().__init__()
        self.words, self.inner_dim = words, inner_dim
        self.norm1_proj = SuperLayerNorm(words * inner_dim)
        self.proj = SuperLinear(words * inner_dim, outer_dim, bias=bias)
        self.norm2_proj = SuperLayerNorm(outer_dim)

    def _first_channels(self, t: torch.Tensor, c: int) -> torch.Tensor:
        return t.unflatten(-1, (self.words, self.inner_dim))[..., :c].flatten(-2)

    def sliced(self, dim: int, c: int) -> State:
        g = self._first_channels
        state = {"norm1_proj.weight": g(self.norm1_proj.weight, c), "norm1_proj.bias": g(self.norm1_proj.bias, c),
                 "proj.weight": g(self.proj.weight[:dim], c)}
        if self.proj.bias is not None:
            state["proj.bias"] = self.proj.bias[:dim]
        return {**state, **_prefixed("norm2_proj", self.norm2_proj.sliced(dim))}

    def forward(self, words: torch.Tensor, batch: int, dim: int, c: int) -> torch.Tensor:
        """(B n, m, c) words -> (B, n, d) sentence embeddings."""
        s = self.sliced(dim, c)
        x = words.reshape(batch, -1, self.words * c)
        x = F.layer_norm(x, (self.words * c,), s["norm1_proj.weight"], s["norm1_proj.bias"], self.norm1_proj.eps)
        return self.norm2_proj(F.linear(x, s["proj.weight"], s.get("proj.bias")), dim)
