"""The compressed KV cache: its layout (from a plan) and the object the runtime hands to users.

Layout of one layer's K under a K-channel plan: KV heads grouped by kept width, widest first; a
group of G heads keeping w channels each is one tensor (B, G, T, w). Heads that keep no channel
hold no K. V stays (B, Hkv, T, D). Nothing is padded, so `nbytes` is exactly the plan's count.

With windows (`plan.sink` or `plan.recent` > 0) a planned layer has two regions:

    key_window.{l}, value_window.{l}  (B, Hkv, Tw, D)  every channel of every head: the first
                                      `sink` tokens, then the latest ones (recent, not yet moved)
    key.{l}.w{w}                      (B, G, M, w)     the middle tokens' kept channels, per group
    value.{l}                         (B, Hm, M, D)    the middle tokens' V of the non-streaming
                                      heads (`plan.middle_value_heads`); Hm may be 0

The middle holds tokens [sink, sink + M), M = `plan.middle_length(T)`. The programs only append to
the window; after each call the runtime's `flush_windows` moves tokens from the window to the
middle, `plan.buffer` at a time, as LeanK flushes its buffer. The move is kept out of the programs:
the rule is integer arithmetic on T and attention does not depend on where the boundary lies, so
the programs keep one straight-line graph with no size-dependent branches.

The cache is a flat dict of named tensors. A program reads entry `name` as input `past_{name}` and
writes it as output `present_{name}` (program.py), so the runtime needs no knowledge of what a pass
stored beyond the window flush. Entries a program does not write (the windowed middle) stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kvcompile.kernels  # noqa: F401  (registers gather_kv_channels, which moves tokens to the middle)

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


def key_window_entry(layer: int) -> str:
    return f"key_window.{layer}"


def value_window_entry(layer: int) -> str:
    return f"value_window.{layer}"


def entry_layer(entry: str) -> int:
    """The layer of a cache entry name (`key.3.w32` -> 3)."""
    return int(entry.split(".")[1])


def entry_kind(entry: str) -> str:
    """What an entry holds: `key`, `value`, `key_window` or `value_window`."""
    return entry.partition(".")[0]


def flush_windows(cache: "CompressedKVCache", plan: Plan) -> None:
    """Move window tokens to the middle until each planned layer's middle holds
    `plan.middle_length(cache.length)` tokens: their kept K channels go to the width groups, their V
    to the middle V of the non-streaming heads. Creates the (maybe empty) middle after a prefill.
    Does nothing for plans without windows."""
    if not plan.windowed:
        return
    for layer in plan.k_channels:
        middle = cache.entries.get(value_entry(layer))
        count = plan.middle_length(cache.length) - (0 if middle is None else middle.shape[2])
        if middle is None or count > 0:
            _move_to_middle(cache.entries, plan, layer, count)


def _move_to_middle(entries: dict[str, torch.Tensor], plan: Plan, layer: int, count: int) -> None:
    """Move window tokens [sink, sink + count) of `layer` to the end of its middle region."""
    start, stop = plan.sink, plan.sink + count
    key_window, value_window = entries[key_window_entry(layer)], entries[value_window_entry(layer)]
    keys, values = key_window[:, :, start:stop], value_window[:, :, start:stop]
    device = keys.device
    moved = {
        key_entry(layer, g.width): torch.ops.kvcompile.gather_kv_channels(
            keys, g.heads_tensor().to(device), g.channels_tensor().to(device)
        )
        for g in k_groups(plan, layer)
    }
    middle_heads = torch.tensor(plan.middle_value_heads(layer), dtype=torch.int64, device=device)
    moved[value_entry(layer)] = values.index_select(1, middle_heads)
    for name, tokens in moved.items():
        entries[name] = tokens if name not in entries else torch.cat([entries[name], tokens], dim=2)
    entries[key_window_entry(layer)] = torch.cat([key_window[:, :, :start], key_window[:, :, stop:]], dim=2)
    entries[value_window_entry(layer)] = torch.cat([value_window[:, :, :start], value_window[:, :, stop:]], dim=2)


class CompressedKVCache:
    """What a transformed model keeps between calls: named K/V tensors and the token count.

    Like transformers' DynamicCache, a forward call that receives it updates it in place and
    returns it.
    """

    def __init__(self, entries: dict[str, torch.Tensor] | None = None, length: int = 0):
        self.entries: dict[str, torch.Tensor] = dict(entries or {})
        self.length = length

    def update(self, entries: dict[str, torch.Tensor], length: int) -> None:
        """Take the entries a program wrote, now holding `length` tokens (entries it did not write are kept)."""
        self.entries.update(entries)
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
        return sum(t.nbytes for name, t in self.entries.items() if entry_kind(name) in ("key", "key_window"))

    @property
    def v_nbytes(self) -> int:
        return sum(t.nbytes for name, t in self.entries.items() if entry_kind(name) in ("value", "value_window"))

    @property
    def batch_size(self) -> int:
        return next(iter(self.entries.values())).shape[0]

    def __repr__(self) -> str:
        return f"CompressedKVCache(length={self.length}, entries={len(self.entries)}, nbytes={self.nbytes})"
