"""The TNT supernet of a spec's space: every sub-network is a slice of one set of weights.

``Supernet(space)(images, arch)`` runs the sub-network ``arch`` (a ``TNTConfig`` the space
allows) exactly as ``tntsearch.model.TNT(arch)`` would with the sliced weights, and
``extract(arch)`` returns that standalone model (docs/supernet.md). What is shared:

- every width (``outer_dim`` d, ``inner_dim`` c, the MLP hidden sizes, the SE hidden size) is
  the first channels of the largest layer; head counts only regroup the same channels;
- ``depth`` L keeps the first L blocks; each block's outer transformer serves both as a
  vanilla block and as the outer half of a TNT block, whose inner transformer is extra;
- one 7x7 word conv serves every word count m by its stride (p / sqrt(m)); what depends on
  m (word position embedding, the word-to-sentence projections and their norms) is kept
  once per m value;
- a sub-network without TNT blocks uses a DeiT patch stem, as ``TNT`` does.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, trunc_normal_

from tntsearch.model import TNT, TNTConfig, _init_weights
from tntsearch.supernet.layers import SuperBlock, SuperConv2d, SuperLayerNorm, SuperLinear, SuperWordProj, _prefixed
from tntsearch.supernet.sampling import SubnetSpace

__all__ = ["Supernet", "load_supernet"]


class _SuperTNTBlock(nn.Module):
    """Block i of the supernet: the outer block, and, where some sub-network makes block i a
    TNT block, the inner block and one word-to-sentence projection per word count."""

    def __init__(self, space: SubnetSpace, tnt: bool) -> None:
        super().__init__()
        b = space.bounds
        self.outer = SuperBlock(b.outer_dim, b.outer_hidden, b.se_ratio if b.se_outer else None)
        if tnt:
            self.inner = SuperBlock(b.inner_dim, b.inner_hidden, b.se_ratio if b.se_inner else None)
            self.word_proj = nn.ModuleDict(
                {str(m): SuperWordProj(m, b.inner_dim, b.outer_dim, bias=False) for m in b.words})


class Supernet(nn.Module):
    """Weight-sharing TNT supernet; ``space`` is a loaded spec's ``space`` (or a :class:`SubnetSpace`)."""

    def __init__(self, space: Mapping[str, Any] | SubnetSpace) -> None:
        super().__init__()
        self.space = space if isinstance(space, SubnetSpace) else SubnetSpace(space)
        b = self.space.bounds
        d, c = b.outer_dim, b.inner_dim
        if b.tnt_blocks:
            self.word_embed = SuperConv2d(3, c, kernel_size=7, padding=3)
            self.word_pos = nn.ParameterDict({str(m): nn.Parameter(torch.zeros(1, m, c)) for m in b.words})
            self.word_proj = nn.ModuleDict({str(m): SuperWordProj(m, c, d, bias=True) for m in b.words})
        if b.patch_stem:
            self.patch_embed = SuperConv2d(3, d, kernel_size=b.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.sentence_pos = nn.Parameter(torch.zeros(1, (b.img_size // b.patch_size) ** 2 + 1, d))
        self.blocks = nn.ModuleList([_SuperTNTBlock(self.space, i + 1 in b.tnt_blocks) for i in range(b.depth)])
        self.norm = SuperLayerNorm(d)
        self.head = SuperLinear(d, b.num_classes)

        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.sentence_pos, std=0.02)
        for p in getattr(self, "word_pos", {}).values():
            trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def sample(self, generator: torch.Generator) -> TNTConfig:
        """A uniformly random sub-network of the space."""
        return self.space.sample(generator)

    def largest(self) -> TNTConfig:
        return self.space.largest()

    def smallest(self) -> TNTConfig:
        return self.space.smallest()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and the class token (as ``TNT.no_weight_decay``; fnmatch patterns)."""
        return {"cls_token", "sentence_pos", "word_pos.*"}

    def forward(self, images: torch.Tensor, arch: TNTConfig) -> torch.Tensor:
        """Logits of sub-network ``arch``; ValueError naming the parameter the space does not allow."""
        self.space.check(arch)
        a = arch
        d, c, m = a.outer_dim, a.inner_dim, str(a.words)
        hidden, inner_hidden = int(d * a.mlp_ratio), int(c * a.inner_mlp_ratio)
        se_out, se_in = a.se in ("outer", "both"), a.se in ("inner", "both")
        dpr = calculate_drop_path_rates(a.drop_path, a.depth)
        B, C, H, W = images.shape
        p = a.patch_size
        if a.tnt_blocks:
            x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
            words = self.word_embed(x, c, a.word_stride).flatten(2).transpose(1, 2) + self.word_pos[m][..., :c]
            sentences = self.word_proj[m](words, B, d, c)
        else:
            sentences = self.patch_embed(images, d, p).flatten(2).transpose(1, 2)
        cls = self.cls_token[..., :d].expand(B, -1, -1)
        sentences = torch.cat((cls, sentences), dim=1) + self.sentence_pos[..., :d]
        for i in range(a.depth):
            blk = self.blocks[i]
            if i + 1 in a.tnt_blocks:
                words = blk.inner(words, c, a.inner_heads, inner_hidden, se_in, dpr[i])
                sentences = sentences + F.pad(blk.word_proj[m](words, B, d, c), (0, 0, 1, 0))
            sentences = blk.outer(sentences, d, a.outer_heads, hidden, se_out, dpr[i])
        return self.head(self.norm(sentences, d)[:, 0], a.num_classes, d)

    def extract(self, arch: TNTConfig) -> TNT:
        """A standalone ``TNT(arch)`` carrying copies of the sliced weights (same device, same
        train/eval mode); its logits equal ``self(images, arch)``."""
        self.space.check(arch)
        a = arch
        d, c, m = a.outer_dim, a.inner_dim, str(a.words)
        hidden, inner_hidden = int(d * a.mlp_ratio), int(c * a.inner_mlp_ratio)
        se_out, se_in = a.se in ("outer", "both"), a.se in ("inner", "both")
        state: dict[str, torch.Tensor] = {"cls_token": self.cls_token[..., :d],
                                          "sentence_pos": self.sentence_pos[..., :d]}
        if a.tnt_blocks:
            state.update(_prefixed("word_embed.proj", self.word_embed.sliced(c)))
            state["word_pos"] = self.word_pos[m][..., :c]
            state.update(self.word_proj[m].sliced(d, c))
        else:
            state.update(_prefixed("patch_embed.proj", self.patch_embed.sliced(d)))
        for i in range(a.depth):
            blk = self.blocks[i]
            outer = blk.outer.sliced(d, hidden, se_out)
            if i + 1 in a.tnt_blocks:
                state.update(_prefixed(f"blocks.{i}.inner", blk.inner.sliced(c, inner_hidden, se_in)))
                state.update(_prefixed(f"blocks.{i}", blk.word_proj[m].sliced(d, c)))
                state.update(_prefixed(f"blocks.{i}.outer", outer))
            else:
                state.update(_prefixed(f"blocks.{i}", outer))
        state.update(_prefixed("norm", self.norm.sliced(d)))
        state.update(_prefixed("head", self.head.sliced(a.num_classes, d)))
        with torch.device("meta"):  # NOTE: no random init of weights that are overwritten next
            model = TNT(a)
        model.load_state_dict({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}, strict=True, assign=True)
        # NOTE: built on "meta", the model picked its attention kernel for that device; moving
        # it to where its weights are picks the kernel TNT uses there.
        return model.to(self.cls_token.device).train(self.training)


def load_supernet(state: Mapping[str, Any], spec: Any) -> Supernet:
    """The supernet saved in a ``fit_supernet`` state (a checkpoint's ``checkpoint.pt``), in
    eval mode on the CPU, for ``spec``'s space (a ``SearchSpec``).

    ValueError when ``state`` is not a supernet's or was trained for another space: a slice
    of another space's weights is not this space's sub-network.
    """
    if "space" not in state or "model" not in state:
        raise ValueError("the checkpoint is not a supernet's (no `space` and `model` in its state)")
    space = spec.model_dump(mode="json")["space"]
    if dict(state["space"]) != space:
        differ = sorted(k for k in set(space) | set(state["space"]) if space.get(k) != state["space"].get(k))
        raise ValueError(f"the supernet was trained for another space (space.{', space.'.join(differ)} differ)")
    net = Supernet(spec.space)
    net.load_state_dict(state["model"])
    return net.eval()
