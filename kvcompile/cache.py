"""The compressed KV cache: its layout (from a plan) and the object the runtime hands to users.

Layout of one layer's K under a K-channel plan: KV heads grouped by kept width, widest first; a
group of G heads keeping w channels each is one tensor (B, G, T, w). Heads that keep no channel
hold no K. V stays (B, Hkv, T, D). Nothing is padded, so `nbytes` is exactly the plan's count.

The cache is a flat dict of named tensors. A program reads entry `name` as input `past_{name}` and
writes it as output `present_{name}`, so the runtime needs no knowledge of what a pass stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan


@dataclass(frozen=True)
class KGroup:
    """KV heads of one layer that keep the same number of key channels."""

    width: int
    heads: tuple[int, ...]
    channels: tuple[tuple[int, ...], ...]  # kept channels of each head in `heads`

    def heads_tensor(self) -> torch.Tensor:
        return torch.tensor(self.heads, dtype=torch.int64)

    def channels_tensor(self) -> torch.Tensor:
        return torch.tensor(self.channels, dtype=torch.int64).view(len(self.heads), self.width)


def k_groups(plan: Plan, layer: int) -> tuple[KGroup, ...]:
    """The width groups of a planned layer, widest first; heads keeping nothing are left out."""
    per_head = plan.k_channels[layer]
    widths = sorted({len(ids) for ids in per_head if ids}, reverse=True)
    groups = []
    for width in widths:
        heads = tuple(h for h, ids in enumerate(per_head) if len(ids) == width)
        groups.append(KGroup(width, heads, tuple(per_head[h] for h in heads)))
    return tuple(groups)


def key_entry(layer: int, width: int | None = None) -> str:
    return f"key.{layer}" if width is None else f"key.{layer}.w{width}"


def value_entry(layer: int) -> str:
    return f"value.{layer}"


class CompressedKVCache:
    """What a transformed model keeps between calls: named K/V tensors and the token count.

    Like transformers' DynamicCache, a forward call that receives it updates it in place and
    returns it.
    """

    def __init__(self, entries: dict[str, torch.Tensor] | None = None, length: int = 0):
        self.entries: dict[str, torch.Tensor] = dict(entries or {})
        self.length = length

    def update(self, outputs: dict[str, torch.Tensor], length: int) -> None:
        """Take a program's `present_{entry}` outputs as the new entries, holding `length` tokens."""
        self.entries = {name.removeprefix("present_"): tensor for name, tensor in outputs.items()}
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes of K and V held."""
        return self.k_nbytes + self.v_nbytes

    @property
    def k_nbytes(self) -> int:
        return sum(t.nbytes for name, t in self.entries.items() if name.startswith("key."))

    @property
    def v_nbytes(self) -> int:
        return sum(t.nbytes for name, t in self.entries.items() if name.startswith("value."))

    @property
    def batch_size(self) -> int:
        return next(iter(self.entries.values())).shape[0]

    def __repr__(self) -> str:
        return f"CompressedKVCache(length={self.length}, entries={len(self.entries)}, nbytes={self.nbytes})"
